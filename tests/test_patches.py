"""Band statistics and overlapped patches in HDF5."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import hdf5plugin
import numpy as np
import pandas as pd
import pytest

from aerialseg.classes import IGNORE_INDEX, legend
from aerialseg.datasets.isprs import read_tiles_table
from aerialseg.datasets.synthetic import area_georeference
from aerialseg.patches import (
    FORMAT_VERSION,
    BandStats,
    PatchFileError,
    QuantisationWarning,
    band_codings,
    band_statistics,
    decode_bands,
    encode_bands,
    read_patch_info,
    read_tile_file_info,
    read_validation_tile,
    write_patches,
    write_validation_tiles,
)
from aerialseg.raster import read_raster, write_raster
from aerialseg.windows import stride_for, window_grid

BANDS = ["ir", "r", "g", "dsm"]
SPECTRAL, HEIGHT = slice(0, 3), slice(3, 4)
GEOREF = area_georeference(1, 128)


def train_images(tiles_dir: Path) -> list[Path]:
    return [tiles_dir / name for name in read_tiles_table(tiles_dir, "train")["image"]]


def write(
    tiles: pd.DataFrame, tiles_dir: Path, out: Path, *, size: int, overlap: float, stats: BandStats
) -> int:
    return write_patches(tiles, tiles_dir, out, size=size, overlap=overlap, stats=stats, bands=BANDS)


@pytest.fixture(scope="module")
def train_stats(synthetic_tiles: Path) -> BandStats:
    return band_statistics(train_images(synthetic_tiles))


# --------------------------------------------------------------------------------------
# band_statistics


def test_band_statistics_match_numpy(synthetic_tiles: Path, train_stats: BandStats) -> None:
    paths = train_images(synthetic_tiles)
    assert len(paths) == 2
    pixels = np.concatenate([read_raster(p)[0].reshape(len(BANDS), -1) for p in paths], axis=1)
    pixels = pixels.astype(np.float64)
    assert len(train_stats.mean) == len(train_stats.std) == len(BANDS)
    np.testing.assert_allclose(train_stats.mean, pixels.mean(axis=1), rtol=1e-9)
    np.testing.assert_allclose(train_stats.std, pixels.std(axis=1), rtol=1e-6)


def test_band_statistics_weight_every_pixel_equally(tmp_path: Path) -> None:
    # Tiles of different sizes: a mean of per-tile means would be wrong.
    small = np.full((2, 32, 32), 1.0, dtype=np.float32)
    large = np.full((2, 64, 96), 3.0, dtype=np.float32)
    large[1] = np.arange(64 * 96, dtype=np.float32).reshape(64, 96)
    write_raster(tmp_path / "small.tif", small, GEOREF)
    write_raster(tmp_path / "large.tif", large, GEOREF)
    stats = band_statistics([tmp_path / "small.tif", tmp_path / "large.tif"])
    everything = np.concatenate([small.reshape(2, -1), large.reshape(2, -1)], axis=1).astype(np.float64)
    np.testing.assert_allclose(stats.mean, everything.mean(axis=1), rtol=1e-9)
    np.testing.assert_allclose(stats.std, everything.std(axis=1), rtol=1e-6)


def test_constant_band_is_left_unscaled(tmp_path: Path) -> None:
    image = np.stack([np.full((32, 32), 0.25, np.float32), np.eye(32, dtype=np.float32)])
    write_raster(tmp_path / "a.tif", image, GEOREF)
    stats = band_statistics([tmp_path / "a.tif"])
    assert stats.mean[0] == pytest.approx(0.25)
    assert stats.std[0] == 1.0
    assert stats.std[1] == pytest.approx(np.eye(32).std())


def test_band_statistics_need_a_tile() -> None:
    with pytest.raises(ValueError, match="at least one"):
        band_statistics([])


# --------------------------------------------------------------------------------------
# write_patches


@pytest.mark.parametrize(("size", "overlap"), [(64, 0.5), (96, 0.25), (128, 0.0), (32, 0.0)])
def test_patches_are_the_tile_windows(
    synthetic_tiles: Path, train_stats: BandStats, tmp_path: Path, size: int, overlap: float
) -> None:
    tiles = read_tiles_table(synthetic_tiles, "train")
    out = tmp_path / "patches" / "train.h5"
    count = write(tiles, synthetic_tiles, out, size=size, overlap=overlap, stats=train_stats)

    grids = [window_grid(int(t.height), int(t.width), size, overlap) for t in tiles.itertuples()]
    assert count == sum(len(g) for g in grids)

    with h5py.File(out, "r") as h5:
        spectral, heights, masks = h5["image"][:], h5["height"][:], h5["mask"][:]
        tile_ids, offsets = h5["tile"][:], h5["offset"][:]
    assert spectral.shape == (count, 3, size, size) and spectral.dtype == np.uint8
    assert heights.shape == (count, 1, size, size) and heights.dtype == np.int16
    assert masks.shape == (count, size, size) and masks.dtype == np.uint8
    images = decode_bands({"image": spectral, "height": heights}, band_codings(BANDS))
    assert tile_ids.shape == (count,) and offsets.shape == (count, 2)

    for tile_id, (row, grid) in enumerate(zip(tiles.itertuples(), grids, strict=True)):
        image, _ = read_raster(synthetic_tiles / row.image)
        label, _ = read_raster(synthetic_tiles / row.label)
        mine = np.flatnonzero(tile_ids == tile_id)
        # Every window of the grid, each once.
        assert [tuple(o) for o in offsets[mine].tolist()] == [(w.row, w.col) for w in grid]
        for i in mine:
            r, c = offsets[i]
            window = image[:, r : r + size, c : c + size]
            # 8-bit spectral values come back bit for bit; heights to the nearest centimetre.
            np.testing.assert_array_equal(images[i, SPECTRAL], window[SPECTRAL])
            np.testing.assert_allclose(images[i, HEIGHT], window[HEIGHT], rtol=0, atol=0.005 + 1e-6)
            np.testing.assert_array_equal(masks[i], label[0, r : r + size, c : c + size])
    assert set(tile_ids.tolist()) == set(range(len(tiles)))


def test_masks_come_from_the_full_label_not_the_eroded_one(
    synthetic_tiles: Path, train_stats: BandStats, tmp_path: Path
) -> None:
    out = tmp_path / "train.h5"
    write(
        read_tiles_table(synthetic_tiles, "train"),
        synthetic_tiles,
        out,
        size=64,
        overlap=0.0,
        stats=train_stats,
    )
    with h5py.File(out, "r") as h5:
        assert not (h5["mask"][:] == IGNORE_INDEX).any()


def test_attributes_round_trip(synthetic_tiles: Path, train_stats: BandStats, tmp_path: Path) -> None:
    tiles = read_tiles_table(synthetic_tiles, "train")
    out = tmp_path / "train.h5"
    count = write(tiles, synthetic_tiles, out, size=64, overlap=0.25, stats=train_stats)
    info = read_patch_info(out)
    assert info.path == out
    assert info.length == count
    assert info.size == 64
    assert info.overlap == 0.25
    assert info.stride == stride_for(64, 0.25) == 48
    assert info.bands == BANDS
    assert info.tiles == ["area1", "area2"]
    assert info.stats == train_stats
    with h5py.File(out, "r") as h5:
        assert json.loads(h5.attrs["classes"]) == legend()
        assert int(h5.attrs["ignore_index"]) == IGNORE_INDEX


def test_validation_tiles_are_whole_with_the_eroded_reference_and_training_statistics(
    synthetic_tiles: Path, train_stats: BandStats, tmp_path: Path
) -> None:
    out = tmp_path / "val.h5"
    val = read_tiles_table(synthetic_tiles, "val")
    scored = write_validation_tiles(val, synthetic_tiles, out, stats=train_stats, bands=BANDS)
    info = read_tile_file_info(out)
    assert info.tiles == ["area3"]
    assert info.stats == train_stats
    assert info.bands == BANDS
    image, _ = read_raster(synthetic_tiles / val["image"].iloc[0])
    eroded, _ = read_raster(synthetic_tiles / val["label_eroded"].iloc[0])
    decoded, reference = read_validation_tile(info, "area3")
    assert decoded.dtype == np.float32 and decoded.shape == image.shape
    np.testing.assert_array_equal(decoded[SPECTRAL], image[SPECTRAL])
    np.testing.assert_allclose(decoded[HEIGHT], image[HEIGHT], rtol=0, atol=0.005 + 1e-6)
    assert not np.array_equal(decoded[HEIGHT], image[HEIGHT])  # centimetres, not the float metres
    np.testing.assert_array_equal(reference, eroded[0])
    with h5py.File(out, "r") as h5:
        assert h5["tiles/area3/image"].dtype == np.uint8 and h5["tiles/area3/height"].dtype == np.int16
    # Each pixel of the eroded reference once; its boundary pixels are not scored.
    assert 0 < scored == np.count_nonzero(eroded[0] != IGNORE_INDEX) < eroded[0].size


def test_a_patch_file_is_not_a_validation_tile_file(
    synthetic_tiles: Path, train_stats: BandStats, tmp_path: Path
) -> None:
    out = tmp_path / "train.h5"
    write(
        read_tiles_table(synthetic_tiles, "train"),
        synthetic_tiles,
        out,
        size=64,
        overlap=0.5,
        stats=train_stats,
    )
    with pytest.raises(ValueError, match=r"train\.h5: not a file of whole validation tiles"):
        read_tile_file_info(out)


def test_chunks_hold_one_patch(synthetic_tiles: Path, train_stats: BandStats, tmp_path: Path) -> None:
    out = tmp_path / "train.h5"
    write(
        read_tiles_table(synthetic_tiles, "train"),
        synthetic_tiles,
        out,
        size=64,
        overlap=0.5,
        stats=train_stats,
    )
    with h5py.File(out, "r") as h5:
        assert h5["image"].chunks == (1, 3, 64, 64)
        assert h5["height"].chunks == (1, 1, 64, 64)
        assert h5["mask"].chunks == (1, 64, 64)


def test_no_temporary_file_left(synthetic_tiles: Path, train_stats: BandStats, tmp_path: Path) -> None:
    out = tmp_path / "patches" / "train.h5"
    write(
        read_tiles_table(synthetic_tiles, "train"),
        synthetic_tiles,
        out,
        size=64,
        overlap=0.5,
        stats=train_stats,
    )
    assert [p.name for p in out.parent.iterdir()] == ["train.h5"]


def test_tile_smaller_than_patch(synthetic_tiles: Path, train_stats: BandStats, tmp_path: Path) -> None:
    out = tmp_path / "patches" / "train.h5"
    with pytest.raises(ValueError) as info:
        write(
            read_tiles_table(synthetic_tiles, "train"),
            synthetic_tiles,
            out,
            size=160,
            overlap=0.5,
            stats=train_stats,
        )
    message = str(info.value)
    assert "area1" in message
    assert "160" in message
    assert "patches.size_px" in message
    assert not out.exists()
    assert list(out.parent.iterdir()) == []


def test_band_count_mismatch_names_the_file(
    synthetic_tiles: Path, train_stats: BandStats, tmp_path: Path
) -> None:
    out = tmp_path / "train.h5"
    tiles = read_tiles_table(synthetic_tiles, "train")
    with pytest.raises(ValueError, match=r"area1_image\.tif") as info:
        write_patches(
            tiles, synthetic_tiles, out, size=64, overlap=0.5, stats=train_stats, bands=["ir", "r", "g"]
        )
    assert "expected 3" in str(info.value)
    assert not out.exists()


def test_failed_write_keeps_previous_file(
    synthetic_tiles: Path, train_stats: BandStats, tmp_path: Path
) -> None:
    out = tmp_path / "train.h5"
    tiles = read_tiles_table(synthetic_tiles, "train")
    count = write(tiles, synthetic_tiles, out, size=64, overlap=0.5, stats=train_stats)
    with pytest.raises(ValueError):
        write(tiles, synthetic_tiles, out, size=160, overlap=0.5, stats=train_stats)
    assert read_patch_info(out).length == count
    assert [p.name for p in tmp_path.iterdir()] == ["train.h5"]


def test_read_patch_info_without_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"missing\.h5"):
        read_patch_info(tmp_path / "missing.h5")


# --------------------------------------------------------------------------------------
# Compact storage: what each band is stored as, and how close it comes back


def test_8_bit_spectral_values_come_back_bit_for_bit() -> None:
    # What the `tiles` stage writes for an 8-bit orthophoto: float32(v / 255).
    values = (np.arange(256, dtype=np.float32) / 255.0).reshape(1, 16, 16)
    codings = band_codings(["r"])
    stored = encode_bands(values, codings, "tile.tif")
    assert stored["image"].dtype == np.uint8
    np.testing.assert_array_equal(stored["image"][0].ravel(), np.arange(256))
    decoded = decode_bands(stored, codings)
    assert decoded.dtype == np.float32
    np.testing.assert_array_equal(decoded, values)


def test_other_values_come_back_within_half_a_step() -> None:
    rng = np.random.default_rng(0)
    image = np.stack(
        [rng.random((32, 32), dtype=np.float32), rng.uniform(-30, 300, (32, 32)).astype(np.float32)]
    )
    codings = band_codings(["ir", "ndsm"])
    stored = encode_bands(image, codings, "tile.tif")
    assert stored["height"].dtype == np.int16
    decoded = decode_bands(stored, codings)
    error = np.abs(decoded.astype(np.float64) - image)
    assert 0 < error[0].max() <= 0.5 / 255 + 1e-7  # a 1/255 step: 1/510 at most
    assert 0 < error[1].max() <= 0.005 + 1e-5  # centimetres: 5 mm at most


def test_values_beyond_a_type_are_clipped_with_a_warning_naming_the_file_and_band() -> None:
    image = np.zeros((2, 4, 4), dtype=np.float32)
    image[0, 0, :2] = (1.2, -0.1)
    image[1, 1, 0] = 400.0  # metres: beyond int16 centimetres
    codings = band_codings(["g", "dsm"])
    with pytest.warns(QuantisationWarning) as caught:
        stored = encode_bands(image, codings, "area9_image.tif")
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2
    assert messages[0].startswith("area9_image.tif: band g: 2 pixels outside")
    assert "-0.1 to 1.2" in messages[0] and "clipped" in messages[0]
    assert messages[1].startswith("area9_image.tif: band dsm: 1 pixels outside")
    assert "-327.68 to 327.67" in messages[1]
    decoded = decode_bands(stored, codings)
    assert decoded[0, 0, :2].tolist() == [1.0, 0.0]
    assert decoded[1, 1, 0] == pytest.approx(327.67)


def test_nan_is_refused_naming_the_file_and_band() -> None:
    image = np.zeros((1, 4, 4), dtype=np.float32)
    image[0, 2, 2] = np.nan
    with pytest.raises(ValueError, match=r"^area9_image\.tif: band ndsm: 1 pixels are NaN"):
        encode_bands(image, band_codings(["ndsm"]), "area9_image.tif")


def test_a_band_of_no_known_kind_lists_the_kinds() -> None:
    with pytest.raises(ValueError, match=r"band 'nir'.*'ir', 'r', 'g', 'b', 'dsm', 'ndsm'"):
        band_codings(["r", "nir"])


def test_files_describe_how_each_band_is_stored(
    synthetic_tiles: Path, train_stats: BandStats, tmp_path: Path
) -> None:
    train, val = tmp_path / "train.h5", tmp_path / "val.h5"
    write(
        read_tiles_table(synthetic_tiles, "train"),
        synthetic_tiles,
        train,
        size=64,
        overlap=0.5,
        stats=train_stats,
    )
    write_validation_tiles(
        read_tiles_table(synthetic_tiles, "val"), synthetic_tiles, val, stats=train_stats, bands=BANDS
    )
    assert read_patch_info(train).codings == read_tile_file_info(val).codings == band_codings(BANDS)
    for path in (train, val):
        with h5py.File(path, "r") as h5:
            attrs = h5.attrs
            assert attrs["format_version"] == FORMAT_VERSION == 2
            assert json.loads(attrs["band_dataset"]) == ["image", "image", "image", "height"]
            assert attrs["band_channel"].tolist() == [0, 1, 2, 0]
            assert json.loads(attrs["band_dtype"]) == ["uint8", "uint8", "uint8", "int16"]
            np.testing.assert_array_equal(attrs["band_scale"], [1 / 255, 1 / 255, 1 / 255, 0.01])
            np.testing.assert_array_equal(attrs["band_offset"], [0, 0, 0, 0])
            assert json.loads(attrs["band_units"])[3] == "m"
            assert "lz4" in attrs["compression"]
            # Every stored array goes through the Blosc filter (hdf5plugin).
            names = (
                ["image", "height", "mask"]
                if path == train
                else [f"tiles/area3/{n}" for n in ("image", "height", "reference")]
            )
            for name in names:
                assert h5[name].id.get_create_plist().get_filter(0)[0] == hdf5plugin.BLOSC_ID, name


def _old_float32_file(path: Path, val: bool) -> None:
    """What the `patches` stage wrote before the compact format: float32 bands, no format_version."""
    with h5py.File(path, "w") as h5:
        name = "tiles/area3/image" if val else "image"
        h5.create_dataset(name, data=np.zeros((1, 4, 8, 8) if not val else (4, 8, 8), np.float32))
        h5.create_dataset("mask" if not val else "tiles/area3/reference", data=np.zeros((1, 8, 8), np.uint8))
        h5.attrs.update(
            size=8,
            overlap=0.5,
            stride=4,
            bands=json.dumps(BANDS),
            tiles='["area3"]',
            mean=np.zeros(4),
            std=np.ones(4),
        )
        if val:
            h5.attrs["kind"] = "tiles"


@pytest.mark.parametrize("val", [False, True], ids=["train", "val"])
def test_an_old_float32_file_is_refused_in_one_line(tmp_path: Path, val: bool) -> None:
    path = tmp_path / ("val.h5" if val else "train.h5")
    _old_float32_file(path, val)
    with pytest.raises(PatchFileError) as info:
        (read_tile_file_info if val else read_patch_info)(path)
    message = str(info.value)
    assert message.startswith(
        f"{path}: written in another patch format (no attribute `format_version`: float32 bands"
    )
    assert message.endswith(
        "rerun the `patches` stage (`dvc repro patches`, or `dvc checkout` for the stored one)"
    )
    assert "\n" not in message


# --------------------------------------------------------------------------------------
# build_patches: the `patches` stage's sequence (conftest's `patches_dir` is its output)


def test_build_patches_takes_the_statistics_from_the_training_tiles_only(
    synthetic_tiles: Path, train_stats: BandStats, patches_dir: Path
) -> None:
    every_tile = band_statistics(
        [synthetic_tiles / name for name in read_tiles_table(synthetic_tiles)["image"]]
    )
    assert every_tile != train_stats  # the rule shows on these tiles
    train, val = read_patch_info(patches_dir / "train.h5"), read_tile_file_info(patches_dir / "val.h5")
    assert train.stats == val.stats == train_stats
    assert train.tiles == ["area1", "area2"] and val.tiles == ["area3"]
    assert (train.size, train.overlap) == (64, 0.5)
