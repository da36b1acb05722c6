"""The Vaihingen participant layout (what the synthetic scenes are written in) -> model-ready tiles.

The official zip archives (rebuilt by archive_builders.py), Potsdam and the official split are tested
in test_isprs_*.py.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rasterio
from archive_builders import assert_no_output, band_names

from aerialseg.classes import IGNORE_INDEX, NUM_CLASSES, UnknownColourError, colours_to_index
from aerialseg.config import DataConfig
from aerialseg.datasets.heights import DSM_GROUND_PERCENTILE
from aerialseg.datasets.isprs import (
    TILES_CSV,
    DatasetLayoutError,
    assign_splits,
    build_tiles,
    read_tiles_table,
)
from aerialseg.datasets.isprs_files import find_tiles
from aerialseg.datasets.isprs_layout import VAIHINGEN
from aerialseg.datasets.synthetic import BUILDING, IMPERVIOUS, LOW_VEGETATION, erode_label, vaihingen_files
from aerialseg.raster import GeoReference, RasterError, read_raster, write_raster

AREAS = [1, 2, 3, 4]
TILE_IDS = [str(a) for a in AREAS]
EXPECTED_SPLITS = {"1": "train", "2": "train", "3": "val", "4": "test"}
SIZE = 128


def vaihingen_areas(raw_dir: Path) -> list[int]:
    return [int(tile_id) for tile_id in find_tiles(raw_dir, VAIHINGEN)]


# --------------------------------------------------------------------------------------
# The table


def test_table_has_one_row_per_area_split_by_area(synthetic_tiles: Path) -> None:
    table = read_tiles_table(synthetic_tiles)
    assert table["tile_id"].tolist() == TILE_IDS
    assert table["tile"].tolist() == [f"area{a}" for a in AREAS]
    assert dict(zip(table["tile_id"], table["split"], strict=True)) == EXPECTED_SPLITS
    assert (table["ndsm_source"] == "none").all()
    assert (table["snapped_pixels"] == 0).all() and (table["snapped_pixels_eroded"] == 0).all()
    assert (table["height"] == SIZE).all() and (table["width"] == SIZE).all()
    for column in ("image", "label", "label_eroded"):
        assert all((synthetic_tiles / name).is_file() for name in table[column])
    # Nothing but the table and three rasters per area.
    assert len(list(synthetic_tiles.iterdir())) == 1 + 3 * len(AREAS)


def test_read_tiles_table_by_split(synthetic_tiles: Path) -> None:
    assert read_tiles_table(synthetic_tiles, "train")["tile_id"].tolist() == ["1", "2"]
    assert read_tiles_table(synthetic_tiles, "val")["tile_id"].tolist() == ["3"]
    assert read_tiles_table(synthetic_tiles, "test")["tile_id"].tolist() == ["4"]
    with pytest.raises(DatasetLayoutError, match="bogus"):
        read_tiles_table(synthetic_tiles, "bogus")


def test_read_tiles_table_without_table(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=TILES_CSV):
        read_tiles_table(tmp_path)


def test_build_tiles_returns_the_written_table(
    synthetic_raw: Path, data_config: DataConfig, tmp_path: Path
) -> None:
    table = build_tiles(synthetic_raw, tmp_path / "tiles", data_config)
    pd.testing.assert_frame_equal(table, read_tiles_table(tmp_path / "tiles"), check_dtype=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiles"]


# --------------------------------------------------------------------------------------
# The rasters


@pytest.mark.parametrize("area", AREAS)
def test_image_bands(synthetic_raw: Path, synthetic_tiles: Path, area: int) -> None:
    raw = vaihingen_files(synthetic_raw, area)
    image, georef = read_raster(synthetic_tiles / f"area{area}_image.tif")
    top, top_georef = read_raster(raw["top"])
    dsm, _ = read_raster(raw["dsm"])
    assert image.dtype == np.float32
    assert image.shape == (4, SIZE, SIZE)
    assert band_names(synthetic_tiles / f"area{area}_image.tif") == ("ir", "r", "g", "dsm")
    # IR, R, G: reflectance in [0, 1], in the order of the orthophoto.
    spectral = image[:3]
    assert spectral.min() >= 0.0 and spectral.max() <= 1.0
    np.testing.assert_allclose(spectral, top.astype(np.float32) / 255.0, rtol=0, atol=1e-6)
    # DSM: height above the tile's ground, in metres.
    np.testing.assert_allclose(image[3], dsm[0] - np.percentile(dsm[0], DSM_GROUND_PERCENTILE), atol=1e-4)
    assert abs(np.percentile(image[3], DSM_GROUND_PERCENTILE)) < 1e-3
    assert georef == top_georef


@pytest.mark.parametrize("area", AREAS)
def test_dsm_is_height_above_ground(synthetic_tiles: Path, area: int) -> None:
    image, _ = read_raster(synthetic_tiles / f"area{area}_image.tif")
    label, _ = read_raster(synthetic_tiles / f"area{area}_label.tif")
    height, label = image[3], label[0]
    ground = np.isin(label, [IMPERVIOUS, LOW_VEGETATION])
    # Roofs stand metres above the streets and lawns (which follow a gently varying terrain).
    assert np.median(height[ground]) < 2.0
    assert np.median(height[label == BUILDING]) > np.median(height[ground]) + 4.0
    # Above ground: nothing much below the ground level, whatever the terrain's elevation.
    assert height.min() > -1.0


@pytest.mark.parametrize("area", AREAS)
def test_georeference_is_the_raw_one(synthetic_raw: Path, synthetic_tiles: Path, area: int) -> None:
    with rasterio.open(vaihingen_files(synthetic_raw, area)["top"]) as src:
        crs, transform = src.crs, src.transform
    assert crs is not None
    for kind in ("image", "label", "label_eroded"):
        with rasterio.open(synthetic_tiles / f"area{area}_{kind}.tif") as tile:
            assert tile.crs == crs
            assert tile.transform == transform
            assert (tile.height, tile.width) == (SIZE, SIZE)


@pytest.mark.parametrize("area", AREAS)
def test_labels(synthetic_raw: Path, synthetic_tiles: Path, area: int) -> None:
    raw = vaihingen_files(synthetic_raw, area)
    label, _ = read_raster(synthetic_tiles / f"area{area}_label.tif")
    eroded, _ = read_raster(synthetic_tiles / f"area{area}_label_eroded.tif")
    assert label.dtype == np.uint8 and eroded.dtype == np.uint8
    assert label.shape == eroded.shape == (1, SIZE, SIZE)
    label, eroded = label[0], eroded[0]
    assert set(np.unique(label).tolist()) <= set(range(NUM_CLASSES))
    assert set(np.unique(eroded).tolist()) <= set(range(NUM_CLASSES)) | {IGNORE_INDEX}
    assert (eroded == IGNORE_INDEX).any()
    assert (eroded != IGNORE_INDEX).mean() > 0.3
    kept = eroded != IGNORE_INDEX
    np.testing.assert_array_equal(eroded[kept], label[kept])
    # Decoded from the raw colours, pixel for pixel.
    raw_label, _ = read_raster(raw["gts"])
    np.testing.assert_array_equal(label, colours_to_index(np.moveaxis(raw_label, 0, -1)))
    np.testing.assert_array_equal(eroded, erode_label(label))


def test_band_selection_and_order(synthetic_raw: Path, synthetic_tiles: Path, tmp_path: Path) -> None:
    data = DataConfig(bands=("dsm", "g"), val_tiles=(3,), test_tiles=(4,))
    build_tiles(synthetic_raw, tmp_path / "tiles", data)
    image, _ = read_raster(tmp_path / "tiles" / "area2_image.tif")
    full, _ = read_raster(synthetic_tiles / "area2_image.tif")
    assert image.shape == (2, SIZE, SIZE)
    assert band_names(tmp_path / "tiles" / "area2_image.tif") == ("dsm", "g")
    np.testing.assert_array_equal(image[0], full[3])
    np.testing.assert_array_equal(image[1], full[2])


def test_rebuild_replaces_existing_output(
    synthetic_raw: Path, data_config: DataConfig, out_dir: Path
) -> None:
    out_dir.mkdir(parents=True)
    (out_dir / "stale.txt").write_text("from an earlier run")
    build_tiles(synthetic_raw, out_dir, data_config)
    assert not (out_dir / "stale.txt").exists()
    assert read_tiles_table(out_dir)["tile_id"].tolist() == TILE_IDS
    assert [p.name for p in out_dir.parent.iterdir()] == ["tiles"]


# --------------------------------------------------------------------------------------
# Areas and splits


def test_vaihingen_areas_ignores_other_files(raw_copy: Path) -> None:
    (raw_copy / "top" / "readme.txt").write_text("not a tile")
    (raw_copy / "top" / "top_mosaic_09cm_area7.tif.aux.xml").write_text("<xml/>")
    assert vaihingen_areas(raw_copy) == AREAS


def test_vaihingen_areas_sorts_numerically(raw_copy: Path) -> None:
    for area in (10, 21):
        (raw_copy / "top" / f"top_mosaic_09cm_area{area}.tif").write_bytes(b"")
    (raw_copy / "top" / "top_mosaic_09cm_area1.tif").rename(raw_copy / "top" / "top_mosaic_09cm_area11.tif")
    assert vaihingen_areas(raw_copy) == [2, 3, 4, 10, 11, 21]


def test_empty_top_folder(tmp_path: Path) -> None:
    (tmp_path / "raw" / "top").mkdir(parents=True)
    with pytest.raises(DatasetLayoutError, match="top_mosaic_09cm_area"):
        vaihingen_areas(tmp_path / "raw")


def test_assign_splits() -> None:
    data = DataConfig(val_tiles=(3,), test_tiles=(4, 5))
    splits = assign_splits(["1", "2", "3", "4", "5"], data)
    assert splits == {"1": "train", "2": "train", "3": "val", "4": "test", "5": "test"}


def test_assign_splits_with_train_tiles_skips_the_rest() -> None:
    data = DataConfig(train_tiles=("1",), val_tiles=("03",), test_tiles=(4,))
    assert assign_splits(["1", "2", "3", "4", "5"], data) == {"1": "train", "3": "val", "4": "test"}


# --------------------------------------------------------------------------------------
# Errors leave nothing behind


def test_missing_top_folder(tmp_path: Path, data_config: DataConfig, out_dir: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    with pytest.raises(DatasetLayoutError) as info:
        build_tiles(raw, out_dir, data_config)
    assert str(raw) in str(info.value)
    assert "top/" in str(info.value)
    assert_no_output(out_dir)


def test_missing_dsm(raw_copy: Path, data_config: DataConfig, out_dir: Path) -> None:
    # The last area: every file is checked before any tile is converted.
    dsm = vaihingen_files(raw_copy, 4)["dsm"]
    dsm.unlink()
    with pytest.raises(DatasetLayoutError) as info:
        build_tiles(raw_copy, out_dir, data_config)
    assert str(raw_copy) in str(info.value)
    assert "area4: missing dsm/dsm_09cm_matching_area4.tif" in str(info.value)
    assert_no_output(out_dir)


@pytest.mark.parametrize("kind", ["gts", "gts_eroded"])
def test_missing_label(raw_copy: Path, data_config: DataConfig, out_dir: Path, kind: str) -> None:
    path = vaihingen_files(raw_copy, 2)[kind]
    path.unlink()
    with pytest.raises(DatasetLayoutError, match=re.escape(f"area2: missing {path.name}")):
        build_tiles(raw_copy, out_dir, data_config)
    assert_no_output(out_dir)


def test_dsm_of_another_size(raw_copy: Path, data_config: DataConfig, out_dir: Path) -> None:
    path = vaihingen_files(raw_copy, 3)["dsm"]
    dsm, georef = read_raster(path)
    write_raster(path, dsm[:, :, :96], georef)
    with pytest.raises(RasterError) as info:
        build_tiles(raw_copy, out_dir, data_config)
    message = str(info.value)
    assert str(path) in message
    assert f"the DSM is 96 x {SIZE} px" in message
    assert f"is {SIZE} x {SIZE} px" in message
    assert_no_output(out_dir)


def test_label_on_another_grid(raw_copy: Path, data_config: DataConfig, out_dir: Path) -> None:
    path = vaihingen_files(raw_copy, 2)["gts"]
    label, georef = read_raster(path)
    shifted = GeoReference(georef.crs, georef.transform @ georef.transform.translation(5, 0))
    write_raster(path, label, shifted)
    with pytest.raises(RasterError, match=re.escape(str(path))):
        build_tiles(raw_copy, out_dir, data_config)
    assert_no_output(out_dir)


@pytest.mark.parametrize("kind", ["gts", "gts_eroded"])
def test_unknown_colour_in_label(raw_copy: Path, data_config: DataConfig, out_dir: Path, kind: str) -> None:
    path = vaihingen_files(raw_copy, 3)[kind]
    rgb, georef = read_raster(path)
    rgb[:, 10:13, 20:25] = np.array([12, 34, 56], dtype=np.uint8)[:, None, None]
    write_raster(path, rgb, georef)
    with pytest.raises(UnknownColourError) as info:
        build_tiles(raw_copy, out_dir, data_config)
    message = str(info.value)
    assert str(path) in message
    assert "(12, 34, 56): 15 px" in message
    assert_no_output(out_dir)


def test_boundary_black_in_full_label_is_an_error(
    raw_copy: Path, data_config: DataConfig, out_dir: Path
) -> None:
    # Black is only allowed in the eroded ground truth.
    path = vaihingen_files(raw_copy, 1)["gts"]
    rgb, georef = read_raster(path)
    rgb[:, 0, :4] = 0
    write_raster(path, rgb, georef)
    with pytest.raises(UnknownColourError, match=r"\(0, 0, 0\): 4 px"):
        build_tiles(raw_copy, out_dir, data_config)
    assert_no_output(out_dir)


@pytest.mark.parametrize(
    ("val", "test", "missing"),
    [
        ((9,), (4,), "data.val_tiles [9]"),
        ((3,), (4, 5, 6), "data.test_tiles [5, 6]"),
        ((0,), (7,), "data.val_tiles [0] and data.test_tiles [7]"),
    ],
)
def test_split_names_missing_areas(
    synthetic_raw: Path, out_dir: Path, val: tuple[int, ...], test: tuple[int, ...], missing: str
) -> None:
    with pytest.raises(DatasetLayoutError) as info:
        build_tiles(synthetic_raw, out_dir, DataConfig(val_tiles=val, test_tiles=test))
    assert missing in str(info.value)
    assert "available: [1, 2, 3, 4]" in str(info.value)
    assert_no_output(out_dir)


def test_every_area_in_val_or_test(synthetic_raw: Path, out_dir: Path) -> None:
    with pytest.raises(DatasetLayoutError, match="train split is empty"):
        build_tiles(synthetic_raw, out_dir, DataConfig(val_tiles=(1, 2), test_tiles=(3, 4)))
    assert_no_output(out_dir)


def test_failed_rebuild_keeps_previous_output(raw_copy: Path, data_config: DataConfig, out_dir: Path) -> None:
    build_tiles(raw_copy, out_dir, data_config)
    before = sorted(p.name for p in out_dir.iterdir())
    vaihingen_files(raw_copy, 4)["dsm"].unlink()
    with pytest.raises(DatasetLayoutError):
        build_tiles(raw_copy, out_dir, data_config)
    assert sorted(p.name for p in out_dir.iterdir()) == before
    assert read_tiles_table(out_dir)["tile_id"].tolist() == TILE_IDS
    assert [p.name for p in out_dir.parent.iterdir()] == ["tiles"]
