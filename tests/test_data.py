"""PatchDataset: normalised samples, aligned augmentation, safe across worker processes."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from aerialseg.classes import IGNORE_INDEX, NUM_CLASSES
from aerialseg.data import PatchDataset, SpectralJitter
from aerialseg.datasets.isprs import read_tiles_table
from aerialseg.datasets.synthetic import area_georeference
from aerialseg.patches import band_statistics, read_patch_info, write_patches
from aerialseg.raster import write_raster

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


def stored(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with h5py.File(path, "r") as h5:
        return h5["image"][:], h5["mask"][:]


def normalised(path: Path, image: np.ndarray) -> np.ndarray:
    """What the dataset should return for a raw image: (x - mean) / std, in float32."""
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

    The height band holds distinct values: after augmentation it identifies which of the eight
    square symmetries was applied, and the mask and spectral bands must have moved the same way.
    Spectral values are distinct and evenly spaced in [0.3, 0.7], far from zero, so photometric
    jitter (monotonic) keeps their order.
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
# Samples without augmentation


def test_sample_types_and_shapes(patch_file: Path) -> None:
    dataset = PatchDataset(patch_file)
    assert len(dataset) == read_patch_info(patch_file).length == 18
    sample = dataset[0]
    assert set(sample) == {"image", "mask"}
    assert isinstance(sample["image"], torch.Tensor) and isinstance(sample["mask"], torch.Tensor)
    assert sample["image"].dtype == torch.float32
    assert sample["image"].shape == (len(BANDS), SIZE, SIZE)
    assert sample["mask"].dtype == torch.int64
    assert sample["mask"].shape == (SIZE, SIZE)


def test_samples_are_normalised_with_the_file_statistics(patch_file: Path) -> None:
    dataset = PatchDataset(patch_file, augment=False)
    images, masks = stored(patch_file)
    expected = normalised(patch_file, images)
    for i in range(len(dataset)):
        sample = dataset[i]
        np.testing.assert_allclose(sample["image"].numpy(), expected[i], rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(sample["mask"].numpy(), masks[i].astype(np.int64))
    # Normalisation actually happened: the stored values are not already standardised.
    assert not np.allclose(images, expected, atol=1e-2)
    # Over the training tiles' patches, every band is roughly standardised.
    batch = expected.transpose(1, 0, 2, 3).reshape(len(BANDS), -1)
    np.testing.assert_allclose(batch.mean(axis=1), 0.0, atol=0.3)
    np.testing.assert_allclose(batch.std(axis=1), 1.0, atol=0.3)


def test_without_augmentation_samples_repeat(patch_file: Path) -> None:
    dataset = PatchDataset(patch_file, augment=False)
    first, second = dataset[5], dataset[5]
    assert torch.equal(first["image"], second["image"])
    assert torch.equal(first["mask"], second["mask"])


# --------------------------------------------------------------------------------------
# Augmentation


def test_augmentation_keeps_bands_and_mask_aligned(marked_file: Path) -> None:
    dataset = PatchDataset(marked_file, augment=True)
    assert dataset.augment is not None
    dataset.augment.set_random_seed(0)
    images, masks = stored(marked_file)
    expected = normalised(marked_file, images)
    symmetries: set[int] = set()

    for draw in range(AUGMENTED_SAMPLES):
        i = draw % len(dataset)
        sample = dataset[i]
        image, mask = sample["image"].numpy(), sample["mask"].numpy()
        assert image.shape == (len(BANDS), SIZE, SIZE) and image.dtype == np.float32
        assert mask.shape == (SIZE, SIZE) and mask.dtype == np.int64

        # Heights: untouched by photometric jitter, so an exact permutation of the originals...
        np.testing.assert_array_equal(
            np.sort(image[HEIGHT], axis=None), np.sort(expected[i, HEIGHT], axis=None)
        )
        # ...and exactly one of the eight symmetries of the stored patch.
        matches = symmetries_between(expected[i, HEIGHT], image[HEIGHT])
        assert len(matches) == 1, f"sample {draw}: heights are not a flip/rotation of the stored patch"
        transform = DIHEDRAL[matches[0]]
        symmetries.add(matches[0])

        # The mask moved with the heights (ignored pixels included).
        np.testing.assert_array_equal(mask, transform(masks[i]).astype(np.int64))

        # Spectral bands moved the same way and are otherwise untouched (jitter is on the batch).
        np.testing.assert_allclose(image[SPECTRAL], transform(expected[i, SPECTRAL]), rtol=0, atol=1e-6)

    assert len(symmetries) >= 6, f"only symmetries {sorted(symmetries)} seen"


def test_augmentation_on_real_patches_keeps_label_values(patch_file: Path) -> None:
    dataset = PatchDataset(patch_file, augment=True)
    _, masks = stored(patch_file)
    for i in range(len(dataset)):
        mask = dataset[i]["mask"].numpy()
        # A flip or rotation moves labels, never changes their counts.
        np.testing.assert_array_equal(
            np.bincount(mask.ravel(), minlength=256), np.bincount(masks[i].ravel(), minlength=256)
        )


def test_spectral_jitter_changes_some_samples_monotonically_and_never_the_heights(
    marked_file: Path,
) -> None:
    info = read_patch_info(marked_file)
    jitter = SpectralJitter(info.bands, info.stats.mean, info.stats.std)
    images, _ = stored(marked_file)
    batch = torch.from_numpy(normalised(marked_file, images))
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
    assert torch.equal(before["image"], after["image"])
    assert torch.equal(before["mask"], after["mask"])
    # The original keeps working after being pickled.
    assert torch.equal(dataset[4]["mask"], clone[4]["mask"])


def test_dataloader_with_workers_reads_every_patch(patch_file: Path) -> None:
    dataset = PatchDataset(patch_file)
    images, masks = stored(patch_file)
    loader = DataLoader(dataset, batch_size=4, num_workers=2, shuffle=False)
    batches = list(loader)
    assert len(batches) == 5
    got_images = torch.cat([b["image"] for b in batches]).numpy()
    got_masks = torch.cat([b["mask"] for b in batches]).numpy()
    assert got_masks.shape == (len(dataset), SIZE, SIZE)
    np.testing.assert_array_equal(got_masks, masks.astype(np.int64))
    np.testing.assert_allclose(got_images, normalised(patch_file, images), rtol=1e-6, atol=1e-6)


def test_workers_draw_different_augmentations(marked_file: Path) -> None:
    dataset = PatchDataset(marked_file, augment=True)
    images, _ = stored(marked_file)
    expected = normalised(marked_file, images)
    torch.manual_seed(0)
    order = [i % len(dataset) for i in range(32)]
    loader = DataLoader(dataset, batch_size=1, num_workers=2, sampler=order)
    drawn = []
    for i, batch in zip(order, loader, strict=True):
        (symmetry,) = symmetries_between(expected[i, HEIGHT], batch["image"][0, HEIGHT].numpy())
        drawn.append(symmetry)
    # Batches go to the two workers in turn: 16 draws each, which independent workers would
    # repeat with probability 8**-16.
    assert len(drawn[0::2]) == len(drawn[1::2]) == 16
    assert drawn[0::2] != drawn[1::2]
