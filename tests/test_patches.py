"""Band statistics and overlapped patches in HDF5."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from aerialseg.classes import IGNORE_INDEX, legend
from aerialseg.datasets.isprs import read_tiles_table
from aerialseg.datasets.synthetic import area_georeference
from aerialseg.patches import (
    BandStats,
    band_statistics,
    read_patch_info,
    read_tile_file_info,
    write_patches,
    write_validation_tiles,
)
from aerialseg.raster import read_raster, write_raster
from aerialseg.windows import stride_for, window_grid

BANDS = ["ir", "r", "g", "dsm"]
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
        images, masks = h5["image"][:], h5["mask"][:]
        tile_ids, offsets = h5["tile"][:], h5["offset"][:]
    assert images.shape == (count, len(BANDS), size, size) and images.dtype == np.float32
    assert masks.shape == (count, size, size) and masks.dtype == np.uint8
    assert tile_ids.shape == (count,) and offsets.shape == (count, 2)

    for tile_id, (row, grid) in enumerate(zip(tiles.itertuples(), grids, strict=True)):
        image, _ = read_raster(synthetic_tiles / row.image)
        label, _ = read_raster(synthetic_tiles / row.label)
        mine = np.flatnonzero(tile_ids == tile_id)
        # Every window of the grid, each once.
        assert [tuple(o) for o in offsets[mine].tolist()] == [(w.row, w.col) for w in grid]
        for i in mine:
            r, c = offsets[i]
            np.testing.assert_array_equal(images[i], image[:, r : r + size, c : c + size])
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
    with h5py.File(out, "r") as h5:
        np.testing.assert_array_equal(h5["tiles/area3/image"][:], image)
        np.testing.assert_array_equal(h5["tiles/area3/reference"][:], eroded[0])
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
        assert h5["image"].chunks == (1, len(BANDS), 64, 64)
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
