"""PatchDataset: compact samples and batches, aligned D4 augmentation, safe across worker
processes; Decode (normalised floats on the device); SpectralJitter; ValidationTiles."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from aerialseg.classes import IGNORE_INDEX, NUM_CLASSES
from aerialseg.data import Decode, PatchDataset, SpectralJitter, ValidationTiles, d4, d4_into
from aerialseg.datamodule import EpochBatches, EpochShards
from aerialseg.datasets.isprs import read_tiles_table
from aerialseg.datasets.synthetic import area_georeference
from aerialseg.patches import (
    band_codings,
    band_statistics,
    decode_bands,
    read_patch_info,
    read_tile_file_info,
    read_validation_tile,
    write_patches,
)
from aerialseg.raster import read_raster, write_raster

BANDS = ["ir", "r", "g", "dsm"]
SPECTRAL = [0, 1, 2]
HEIGHT = 3
SIZE = 64
AUGMENTED_SAMPLES = 96

# The eight symmetries of a square: what flips and 90-degree rotations can produce.
DIHEDRAL: list[Callable[[np.ndarray], np.ndarray]] = [
    *(lambda a, k=k: np.rot90(a, k, axes=(-2, -1)) for k in range(4)),
    *(lambda a, k=k: np.rot90(np.flip(a, -1), k, axes=(-2, -1)) for k in range(4)),
]


def symmetries_between(before: np.ndarray, after: np.ndarray) -> list[int]:
    """Indices into DIHEDRAL of the symmetries that turn `before` into `after`."""
    return [k for k, t in enumerate(DIHEDRAL) if np.array_equal(t(before), after)]


def stored(path: Path) -> dict[str, np.ndarray]:
    """The file's arrays as stored: image (N, 3, H, W) uint8, height (N, 1, H, W) int16, mask."""
    with h5py.File(path, "r") as h5:
        return {name: h5[name][:] for name in ("image", "height", "mask")}


def decoded(path: Path) -> np.ndarray:
    """(N, C, H, W) float32 tile values of every patch (patches.decode_bands)."""
    return decode_bands(stored(path), read_patch_info(path).codings)


def normalised(path: Path, image: np.ndarray) -> np.ndarray:
    """What the network should get for tile values: (x - mean) / std, in float32."""
    stats = read_patch_info(path).stats
    mean = np.asarray(stats.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(stats.std, dtype=np.float32)[:, None, None]
    return (image - mean) / std


@pytest.fixture(scope="module")
def patch_file(tmp_path_factory: pytest.TempPathFactory, synthetic_tiles: Path) -> Path:
    """18 patches of 64 px from the two synthetic training tiles."""
    tiles = read_tiles_table(synthetic_tiles, "train")
    stats = band_statistics([synthetic_tiles / name for name in tiles["image"]])
    out = tmp_path_factory.mktemp("patches") / "train.h5"
    write_patches(tiles, synthetic_tiles, out, size=SIZE, overlap=0.5, stats=stats, bands=BANDS)
    return out


@pytest.fixture(scope="module")
def marked_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Patches of a tile whose every band value is unique, so any pixel can be traced.

    The height band holds distinct values (whole centimetres, so stored exactly): after
    augmentation it identifies which of the eight square symmetries was applied, and the mask and
    spectral bands must have moved the same way. Spectral values are evenly spread in [0.3, 0.7],
    far from zero, so photometric jitter (monotonic) keeps their order.
    """
    rng = np.random.default_rng(0)
    side = 2 * SIZE
    n = side * side
    spectral = [0.3 + 0.4 * rng.permutation(n).reshape(side, side) / n for _ in SPECTRAL]
    height = rng.permutation(n).reshape(side, side) * 0.01
    image = np.stack([*spectral, height]).astype(np.float32)
    mask = rng.integers(0, NUM_CLASSES, size=(side, side)).astype(np.uint8)
    mask[rng.random(mask.shape) < 0.05] = IGNORE_INDEX

    root = tmp_path_factory.mktemp("marked")
    georef = area_georeference(1, side)
    write_raster(root / "area1_image.tif", image, georef, band_names=BANDS)
    write_raster(root / "area1_label.tif", mask, georef)
    tiles = pd.DataFrame(
        [
            {
                "tile": "area1",
                "image": "area1_image.tif",
                "label": "area1_label.tif",
                "height": side,
                "width": side,
            }
        ]
    )
    stats = band_statistics([root / "area1_image.tif"])
    out = root / "marked.h5"
    write_patches(tiles, root, out, size=SIZE, overlap=0.5, stats=stats, bands=BANDS)
    return out


# --------------------------------------------------------------------------------------
# Samples without augmentation: the stored arrays, compact


def test_sample_types_and_shapes(patch_file: Path) -> None:
    dataset = PatchDataset(patch_file)
    assert len(dataset) == read_patch_info(patch_file).length == 18
    sample = dataset[0]
    assert set(sample) == {"image", "height", "mask"}
    assert all(isinstance(v, torch.Tensor) for v in sample.values())
    assert sample["image"].dtype == torch.uint8 and sample["image"].shape == (3, SIZE, SIZE)
    assert sample["height"].dtype == torch.int16 and sample["height"].shape == (1, SIZE, SIZE)
    assert sample["mask"].dtype == torch.uint8 and sample["mask"].shape == (SIZE, SIZE)


def test_samples_are_the_stored_arrays(patch_file: Path) -> None:
    dataset = PatchDataset(patch_file, augment=False)
    arrays = stored(patch_file)
    for i in range(len(dataset)):
        sample = dataset[i]
        for key, values in arrays.items():
            np.testing.assert_array_equal(sample[key].numpy(), values[i])


def test_a_list_of_indices_reads_a_packed_batch(patch_file: Path) -> None:
    dataset = PatchDataset(patch_file, augment=True, seed=4)
    indices = [(2, 7), (2, 0), (2, 7), (2, 17)]
    batch = dataset[indices]
    assert set(batch) == {"packed"}
    packed = batch["packed"]
    assert packed.dtype == torch.uint8 and packed.shape == (len(indices), dataset.layout.row_bytes)
    # One row a patch: 3 x 64 x 64 uint8, 64 x 64 int16, 64 x 64 uint8 mask (64-byte aligned).
    assert dataset.layout.row_bytes == SIZE * SIZE * (3 + 2 + 1)
    unpacked = dataset.layout.unpack(packed)
    for row, index in enumerate(indices):
        sample = dataset[index]
        for key in ("image", "height", "mask"):
            assert unpacked[key].shape == (len(indices), *sample[key].shape)
            assert unpacked[key].dtype == sample[key].dtype
            assert torch.equal(unpacked[key][row], sample[key])


def test_without_augmentation_samples_repeat(patch_file: Path) -> None:
    dataset = PatchDataset(patch_file, augment=False)
    first, second = dataset[5], dataset[5]
    assert all(torch.equal(first[k], second[k]) for k in first)


# --------------------------------------------------------------------------------------
# Decode: compact batch -> normalised float, on the training device


def test_decode_gives_the_normalised_tile_values(patch_file: Path, synthetic_tiles: Path) -> None:
    info = read_patch_info(patch_file)
    dataset = PatchDataset(patch_file)
    batch = dataset[list(range(len(dataset)))]
    image, mask = Decode.from_info(info)(batch)
    assert mask.dtype == torch.int64
    np.testing.assert_array_equal(mask.numpy(), stored(patch_file)["mask"])
    assert image.dtype == torch.float32 and image.shape == (len(dataset), len(BANDS), SIZE, SIZE)
    expected = normalised(patch_file, decoded(patch_file))
    np.testing.assert_allclose(image.numpy(), expected, rtol=0, atol=1e-5)
    # Against the tiles themselves: spectral values exact (8-bit sources), heights to 5 mm.
    with h5py.File(patch_file, "r") as h5:
        tile_ids, offsets = h5["tile"][:], h5["offset"][:]
    tiles = read_tiles_table(synthetic_tiles, "train")
    values = [read_raster(synthetic_tiles / name)[0] for name in tiles["image"]]
    windows = np.stack(
        [values[t][:, r : r + SIZE, c : c + SIZE] for t, (r, c) in zip(tile_ids, offsets, strict=True)]
    )
    std = np.asarray(info.stats.std)
    truth = normalised(patch_file, windows)
    np.testing.assert_allclose(image.numpy()[:, SPECTRAL], truth[:, SPECTRAL], rtol=0, atol=1e-5)
    np.testing.assert_allclose(
        image.numpy()[:, HEIGHT], truth[:, HEIGHT], rtol=0, atol=0.005 / std[HEIGHT] + 1e-5
    )
    # Normalisation happened: over the training patches every band is roughly standardised.
    bands = image.numpy().transpose(1, 0, 2, 3).reshape(len(BANDS), -1)
    np.testing.assert_allclose(bands.mean(axis=1), 0.0, atol=0.3)
    np.testing.assert_allclose(bands.std(axis=1), 1.0, atol=0.3)


def test_decode_puts_the_bands_back_in_the_file_order() -> None:
    bands = ["dsm", "r", "ndsm", "g"]
    codings = band_codings(bands)
    mean, std = (1.0, 0.5, 2.0, 0.25), (2.0, 0.25, 4.0, 0.5)
    rng = np.random.default_rng(0)
    arrays = {
        "image": rng.integers(0, 256, (2, 2, 8, 8), dtype=np.uint8),
        "height": rng.integers(-500, 3000, (2, 2, 8, 8)).astype(np.int16),
    }
    arrays["mask"] = rng.integers(0, 6, (2, 8, 8), dtype=np.uint8)
    out, mask = Decode(codings, mean, std)({k: torch.from_numpy(v) for k, v in arrays.items()})
    assert torch.equal(mask, torch.from_numpy(arrays["mask"]).long())
    values = decode_bands(arrays, codings)
    assert values[:, 0].tolist() == (arrays["height"][:, 0] * 0.01).astype(np.float32).tolist()
    expected = (values - np.asarray(mean, np.float32)[:, None, None]) / np.asarray(std, np.float32)[
        :, None, None
    ]
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=1e-5)


def test_a_file_of_heights_only_packs_and_decodes(tmp_path: Path) -> None:
    """No spectral band (data.bands: [dsm]): no `image` dataset, 0 channels in the batch."""
    heights = (np.arange(2 * 64 * 64, dtype=np.float32).reshape(1, 128, 64) % 500) * 0.07
    georef = area_georeference(1, 128)
    write_raster(tmp_path / "a_image.tif", heights, georef, band_names=["dsm"])
    write_raster(tmp_path / "a_label.tif", np.zeros((1, 128, 64), np.uint8), georef)
    tiles = pd.DataFrame([{"tile": "a", "image": "a_image.tif", "label": "a_label.tif"}])
    stats = band_statistics([tmp_path / "a_image.tif"])
    out = tmp_path / "train.h5"
    write_patches(tiles, tmp_path, out, size=SIZE, overlap=0.0, stats=stats, bands=["dsm"])
    with h5py.File(out, "r") as h5:
        assert set(h5) == {"height", "mask", "tile", "offset"}
    dataset = PatchDataset(out)
    assert dataset[0]["image"].shape == (0, SIZE, SIZE)
    image, _ = Decode.from_info(read_patch_info(out))(dataset[[0, 1]])
    expected = (heights.reshape(1, 2, SIZE, SIZE).transpose(1, 0, 2, 3) - stats.mean[0]) / stats.std[0]
    np.testing.assert_allclose(image.numpy(), expected, rtol=0, atol=0.005 / stats.std[0] + 1e-5)


def test_validation_tiles_are_normalised_float32_tiles(patches_dir: Path) -> None:
    tiles = ValidationTiles(patches_dir / "val.h5")
    item = tiles[0]
    info = read_tile_file_info(patches_dir / "val.h5")
    values, reference = read_validation_tile(info, "area3")
    assert item["tile"] == "area3"
    assert item["image"].dtype == np.float32 and item["image"].shape == values.shape
    mean = np.asarray(info.stats.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(info.stats.std, dtype=np.float32)[:, None, None]
    np.testing.assert_allclose(item["image"], (values - mean) / std, rtol=1e-6, atol=1e-6)
    assert item["reference"].dtype == np.uint8
    np.testing.assert_array_equal(item["reference"], reference)
    assert tiles[-1] == {"tile": None}


# --------------------------------------------------------------------------------------
# Augmentation


def test_d4_gives_the_eight_symmetries() -> None:
    square = np.arange(16).reshape(4, 4)
    found = [symmetries_between(square, d4(square, k)) for k in range(8)]
    assert sorted(m for (m,) in found) == list(range(8))


@pytest.mark.parametrize("dtype", [np.uint8, np.int16])
def test_d4_into_writes_the_symmetry_into_the_batch(dtype: type) -> None:
    array = np.random.default_rng(0).integers(-100, 200, (3, 5, 5)).astype(dtype)
    for k in range(8):
        out = np.zeros_like(array)
        d4_into(array, k, out)
        np.testing.assert_array_equal(out, d4(array, k))
        d4_into(array[0], k, out[1])  # one plane
        np.testing.assert_array_equal(out[1], d4(array[0], k))


def test_augmentation_keeps_bands_and_mask_aligned(marked_file: Path) -> None:
    torch.manual_seed(0)
    dataset = PatchDataset(marked_file, augment=True)
    arrays = stored(marked_file)
    symmetries: set[int] = set()

    for draw in range(AUGMENTED_SAMPLES):
        i = draw % len(dataset)
        sample = {k: v.numpy() for k, v in dataset[i].items()}
        # The heights are exactly one of the eight symmetries of the stored patch...
        matches = symmetries_between(arrays["height"][i, 0], sample["height"][0])
        assert len(matches) == 1, f"sample {draw}: heights are not a flip/rotation of the stored patch"
        transform = DIHEDRAL[matches[0]]
        symmetries.add(matches[0])
        # ...and the mask (ignored pixels included) and spectral bands moved the same way.
        np.testing.assert_array_equal(sample["mask"], transform(arrays["mask"][i]))
        np.testing.assert_array_equal(sample["image"], transform(arrays["image"][i]))

    assert len(symmetries) >= 6, f"only symmetries {sorted(symmetries)} seen"


def test_augmentation_on_real_patches_keeps_label_values(patch_file: Path) -> None:
    dataset = PatchDataset(patch_file, augment=True)
    masks = stored(patch_file)["mask"]
    for i in range(len(dataset)):
        mask = dataset[i]["mask"].numpy()
        # A flip or rotation moves labels, never changes their counts.
        np.testing.assert_array_equal(
            np.bincount(mask.ravel(), minlength=256), np.bincount(masks[i].ravel(), minlength=256)
        )


# --------------------------------------------------------------------------------------
# Photometric jitter (on the batch, on the device)


def test_spectral_jitter_changes_some_samples_monotonically_and_never_the_heights(
    marked_file: Path,
) -> None:
    info = read_patch_info(marked_file)
    jitter = SpectralJitter(info.bands, info.stats.mean, info.stats.std)
    batch = torch.from_numpy(normalised(marked_file, decoded(marked_file)))
    torch.manual_seed(0)
    out = jitter(batch)
    assert out.shape == batch.shape and out.dtype == batch.dtype
    assert torch.equal(out[:, HEIGHT], batch[:, HEIGHT])
    changed = 0
    for before, after in zip(batch[:, SPECTRAL], out[:, SPECTRAL], strict=True):
        for band_before, band_after in zip(before, after, strict=True):
            # Brightness/contrast and gamma are increasing functions: pixel order survives.
            assert torch.equal(
                torch.argsort(band_before.flatten(), stable=True),
                torch.argsort(band_after.flatten(), stable=True),
            )
        changed += not torch.allclose(before, after, atol=1e-5)
    # p = 0.5 and 0.3: some samples keep their colours, some do not.
    assert 0 < changed < len(batch)
    # Drawn from torch's generator: the same seed gives the same batch.
    torch.manual_seed(0)
    assert torch.equal(jitter(batch), out)


def test_spectral_jitter_undoes_the_normalisation_before_jittering() -> None:
    """A gamma on normalised values would be meaningless: the jitter works on reflectances."""
    jitter = SpectralJitter(["ir", "dsm"], (0.5, 10.0), (0.25, 5.0), p_brightness_contrast=0.0, p_gamma=1.0)
    jitter.gamma = (2.0, 2.0)
    reflectance = torch.full((1, 1, 2, 2), 0.5)
    normalised_batch = torch.cat([(reflectance - 0.5) / 0.25, torch.zeros(1, 1, 2, 2)], dim=1)
    out = jitter(normalised_batch)
    # 0.5 ** 2 = 0.25, normalised: (0.25 - 0.5) / 0.25 = -1.
    torch.testing.assert_close(out[:, 0], torch.full((1, 2, 2), -1.0))
    assert torch.equal(out[:, 1], normalised_batch[:, 1])


# --------------------------------------------------------------------------------------
# Worker processes


def test_pickles_without_an_open_file(patch_file: Path) -> None:
    dataset = PatchDataset(patch_file)
    before = dataset[3]  # opens the HDF5 file in this process
    clone = pickle.loads(pickle.dumps(dataset))
    assert not any(isinstance(v, h5py.File | h5py.Dataset) for v in vars(clone).values())
    after = clone[3]
    assert all(torch.equal(before[k], after[k]) for k in before)
    # The original keeps working after being pickled.
    assert torch.equal(dataset[4]["mask"], clone[4]["mask"])


def test_dataloader_with_workers_reads_every_patch(patch_file: Path) -> None:
    dataset = PatchDataset(patch_file)
    arrays = stored(patch_file)
    loader = DataLoader(dataset, batch_size=4, num_workers=2, shuffle=False)
    batches = list(loader)
    assert len(batches) == 5
    for key, values in arrays.items():
        np.testing.assert_array_equal(torch.cat([b[key] for b in batches]).numpy(), values)


def test_epoch_batches_through_workers_are_the_batches_read_here(patch_file: Path) -> None:
    """The training loader's way (datamodule.PatchData): lists of (epoch, patch) to the dataset,
    which writes each batch into shared memory in the worker; the same batches as read here."""
    shards = EpochShards(PatchDataset(patch_file), 1, 0, seed=3)
    shards.set_epoch(2)
    batches = EpochBatches(shards, 4)
    assert len(batches) == 5 and [len(b) for b in batches] == [4, 4, 4, 4, 2]
    here = PatchDataset(patch_file, augment=True, seed=3)
    loader = DataLoader(
        PatchDataset(patch_file, augment=True, seed=3), batch_size=None, sampler=batches, num_workers=2
    )
    seen = 0
    for indices, batch in zip(batches, loader, strict=True):
        expected = here[indices]
        assert set(batch) == {"packed"} and torch.equal(batch["packed"], expected["packed"])
        assert batch["packed"].is_shared()
        seen += len(indices)
    assert seen == len(shards)


def _ring_loader(patch_file: Path, buffers: int) -> tuple[EpochBatches, DataLoader[Any]]:
    shards = EpochShards(PatchDataset(patch_file), 1, 0, seed=3)
    shards.set_epoch(1)
    batches = EpochBatches(shards, 2)
    dataset = PatchDataset(patch_file, augment=True, seed=3, buffers=buffers)
    return batches, DataLoader(dataset, batch_size=None, sampler=batches, num_workers=1, prefetch_factor=1)


def test_workers_reuse_a_ring_of_shared_blocks_and_hand_over_the_same_batches(patch_file: Path) -> None:
    """datamodule.PatchData's loader: each worker writes into a ring of reused blocks (SharedRing);
    consumed one at a time, as training does, every batch is the one read here."""
    batches, loader = _ring_loader(patch_file, buffers=3)
    here = PatchDataset(patch_file, augment=True, seed=3)
    decode = Decode.from_info(read_patch_info(patch_file))
    blocks = set()
    for indices, batch in zip(batches, loader, strict=True):
        assert torch.equal(batch["packed"], here[indices]["packed"])
        image, mask = decode(batch)  # checks the block still holds this batch
        expected_image, expected_mask = decode(here[indices])
        assert torch.equal(image, expected_image) and torch.equal(mask, expected_mask)
        blocks.add(batch["packed"].untyped_storage().data_ptr())
    assert len(blocks) <= 3 + 1  # the ring (+ the shorter last batch's own block)
    assert len(batches) > 3 + 1  # so blocks were reused


def test_a_ring_block_overwritten_while_its_batch_is_held_is_an_error(patch_file: Path) -> None:
    """Holding more batches than the ring is long (here: all of them) lets the worker write a held
    batch's block again: decoding it then fails with the reason instead of giving other data."""
    _, loader = _ring_loader(patch_file, buffers=2)
    decode = Decode.from_info(read_patch_info(patch_file))
    held = list(loader)
    with pytest.raises(RuntimeError, match="overwritten by its loader worker while in use"):
        decode(held[0])
    decode(held[-1])  # the newest batch of its block is intact


def test_workers_draw_different_augmentations(marked_file: Path) -> None:
    dataset = PatchDataset(marked_file, augment=True)
    heights = stored(marked_file)["height"]
    torch.manual_seed(0)
    order = [i % len(dataset) for i in range(32)]
    loader = DataLoader(dataset, batch_size=1, num_workers=2, sampler=order)
    drawn = []
    for i, batch in zip(order, loader, strict=True):
        (symmetry,) = symmetries_between(heights[i, 0], batch["height"][0, 0].numpy())
        drawn.append(symmetry)
    # Batches go to the two workers in turn: 16 draws each, which independent workers would
    # repeat with probability 8**-16.
    assert len(drawn[0::2]) == len(drawn[1::2]) == 16
    assert drawn[0::2] != drawn[1::2]
