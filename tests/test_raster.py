"""The one GeoTIFF writer (aerialseg.raster): class maps are palette TIFFs in every stage, float
rasters keep their predictor and values, streamed rows give the pixels of a one-shot write, an
internal mask, GCPs, atomic files, one-line errors, and Cloud Optimized GeoTIFFs that validate."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from PIL import Image
from rasterio.control import GroundControlPoint
from rasterio.crs import CRS
from rio_cogeo.cogeo import cog_validate

from aerialseg.classes import CLASSES, IGNORE_INDEX
from aerialseg.datasets.tiles_table import read_tiles_table
from aerialseg.raster import TILE, GeoReference, GeoTiffRows, geotiff_writer, read_raster, write_raster

GEOREF = GeoReference(CRS.from_epsg(32632), Affine(0.09, 0.0, 496_000.0, 0.0, -0.09, 5_420_000.0))


def class_map(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, len(CLASSES), (height, width), dtype=np.uint8)


def assert_palette(path: Path) -> None:
    """PIL (which follows the TIFF's PhotometricInterpretation tag) opens it as a paletted image
    whose colours are the ISPRS legend's."""
    with Image.open(path) as image:
        assert image.mode == "P", f"{path.name}: PIL mode {image.mode}"
        palette = image.getpalette()
        assert palette is not None
        for c in CLASSES:
            assert tuple(palette[3 * c.index : 3 * c.index + 3]) == c.colour


def test_tiles_stage_label_maps_are_palette_tiffs(synthetic_tiles: Path) -> None:
    table = read_tiles_table(synthetic_tiles)
    for row in table.itertuples():
        assert_palette(synthetic_tiles / str(row.label))
        assert_palette(synthetic_tiles / str(row.label_eroded))


def test_evaluate_class_map_is_a_palette_tiff(tmp_path: Path) -> None:
    """evaluate's call: write_raster(path, (H, W) uint8 classes, georef, colormap=True)."""
    classes = class_map(300, 280)
    path = write_raster(tmp_path / "area7.tif", classes, GEOREF, colormap=True)
    assert_palette(path)
    with Image.open(path) as image:
        np.testing.assert_array_equal(np.asarray(image), classes)
    pixels, georef = read_raster(path)
    np.testing.assert_array_equal(pixels[0], classes)
    assert georef.crs == GEOREF.crs and georef.transform == GEOREF.transform


def test_streamed_class_map_with_nodata_is_a_palette_tiff(tmp_path: Path) -> None:
    """predict's class map: streamed in row blocks, nodata 255 transparent in the colour table."""
    classes = class_map(300, 300)
    classes[:10] = IGNORE_INDEX
    path = tmp_path / "predicted.tif"
    with geotiff_writer(
        path,
        height=300,
        width=300,
        count=1,
        dtype=np.uint8,
        georef=GEOREF,
        nodata=IGNORE_INDEX,
        class_map=True,
    ) as out:
        for top in range(0, 300, 70):
            out.add(classes[top : top + 70])
    assert_palette(path)
    with rasterio.open(path) as src:
        assert src.nodata == IGNORE_INDEX
        assert src.colormap(1)[IGNORE_INDEX] == (0, 0, 0, 0)
        np.testing.assert_array_equal(src.read(1), classes)


def test_float_raster_keeps_predictor_values_and_band_names(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    image = (rng.random((3, 300, 270), dtype=np.float32) * 40.0 - 5.0).astype(np.float32)
    image[2, 5, 7] = np.float32(1e-30)  # no rounding anywhere: float32 bits come back as written
    path = write_raster(tmp_path / "image.tif", image, GEOREF, band_names=["ir", "dsm", "ndsm"])
    with rasterio.open(path) as src:
        assert src.tags(ns="IMAGE_STRUCTURE")["PREDICTOR"] == "3"
        assert src.compression is not None and src.compression.name == "deflate"
        assert src.descriptions == ("ir", "dsm", "ndsm")
        assert src.block_shapes[0] == (TILE, TILE)
        assert src.read().tobytes() == image.tobytes()


def test_small_raster_stays_striped(tmp_path: Path) -> None:
    path = write_raster(tmp_path / "small.tif", class_map(100, 300), GEOREF, colormap=True)
    with rasterio.open(path) as src:
        assert not src.profile.get("tiled", False)
    assert_palette(path)


@pytest.mark.parametrize("rows", [1, 37, TILE, 300, 700])
def test_streaming_gives_the_pixels_of_one_shot(tmp_path: Path, rows: int) -> None:
    rng = np.random.default_rng(2)
    image = rng.random((2, 650, 300), dtype=np.float32)
    one_shot = write_raster(tmp_path / "one.tif", image, GEOREF, band_names=["a", "b"])
    streamed = tmp_path / "streamed.tif"
    with geotiff_writer(
        streamed, height=650, width=300, count=2, dtype=np.float32, georef=GEOREF, band_names=["a", "b"]
    ) as out:
        for top in range(0, 650, rows):
            out.add(image[:, top : top + rows])
    with rasterio.open(one_shot) as a, rasterio.open(streamed) as b:
        assert a.profile == b.profile
        assert a.read().tobytes() == b.read().tobytes() == image.tobytes()


def test_internal_mask_scales_tags_and_gcps(tmp_path: Path) -> None:
    gcps = (
        GroundControlPoint(row=0, col=0, x=496_000.0, y=5_420_000.0),
        GroundControlPoint(row=0, col=300, x=496_027.0, y=5_420_000.0),
        GroundControlPoint(row=260, col=0, x=496_000.0, y=5_419_976.6),
    )
    georef = GeoReference(None, Affine.identity(), gcps, CRS.from_epsg(32632))
    data = np.random.default_rng(3).integers(0, 256, (6, 260, 300), dtype=np.uint8)
    valid = np.ones((260, 300), bool)
    valid[100:130, 40:90] = False
    path = tmp_path / "probabilities.tif"
    with geotiff_writer(
        path,
        height=260,
        width=300,
        count=6,
        dtype=np.uint8,
        georef=georef,
        scales=[1 / 255] * 6,
        tags={"aerialseg_model": "m"},
        mask=True,
    ) as out:
        for top in range(0, 260, 50):
            out.add(data[:, top : top + 50], valid[top : top + 50])
    with rasterio.open(path) as src:
        np.testing.assert_array_equal(src.dataset_mask(), np.where(valid, 255, 0))
        assert src.scales == (1 / 255,) * 6
        assert src.tags()["aerialseg_model"] == "m"
        read_gcps, gcps_crs = src.gcps
        assert gcps_crs == CRS.from_epsg(32632)
        assert [(g.row, g.col, g.x, g.y) for g in read_gcps] == [(g.row, g.col, g.x, g.y) for g in gcps]
        assert GeoReference.of(src).gcps_crs == CRS.from_epsg(32632)


def test_bad_blocks_raise_one_line_and_leave_no_file(tmp_path: Path) -> None:
    path = tmp_path / "out.tif"

    def writer() -> contextlib.AbstractContextManager[GeoTiffRows]:
        return geotiff_writer(path, height=40, width=30, count=1, dtype=np.uint8, georef=GEOREF)

    with (
        pytest.raises(ValueError, match=r"out\.tif: a block of shape \(10, 31\) does not fit"),
        writer() as out,
    ):
        out.add(np.zeros((10, 31), np.uint8))
    with (
        pytest.raises(ValueError, match=r"out\.tif: rows 30-50 run past the raster's 40 rows"),
        writer() as out,
    ):
        out.add(np.zeros((30, 30), np.uint8))
        out.add(np.zeros((20, 30), np.uint8))
    with (
        pytest.raises(ValueError, match=r"out\.tif: 30 of 40 rows written"),
        writer() as out,
    ):
        out.add(np.zeros((30, 30), np.uint8))
    with pytest.raises(ValueError, match=r"out\.tif: a class map is one uint8 band, not 3 x uint8"):
        write_raster(path, np.zeros((3, 40, 30), np.uint8), GEOREF, colormap=True)
    assert list(tmp_path.iterdir()) == []


def test_cog_class_map_keeps_palette_nodata_and_validates(tmp_path: Path) -> None:
    # In every 2 x 2 cell one pixel of class 1 among class 2: the first overview (mode) is all 2,
    # where nearest neighbour would keep some 1s.
    rng = np.random.default_rng(5)
    classes = np.full((1100, 1300), 2, np.uint8)
    rows, cols = np.mgrid[0:1100:2, 0:1300:2]
    pick = rng.integers(0, 4, rows.shape)
    classes[rows + pick // 2, cols + pick % 2] = 1
    classes[:, :64] = IGNORE_INDEX
    path = tmp_path / "cog.tif"
    with geotiff_writer(
        path,
        height=1100,
        width=1300,
        count=1,
        dtype=np.uint8,
        georef=GEOREF,
        nodata=IGNORE_INDEX,
        class_map=True,
        cog=True,
    ) as out:
        for top in range(0, 1100, 300):
            out.add(classes[top : top + 300])
    valid, errors, warnings = cog_validate(path, quiet=True)
    assert valid and not errors and not warnings
    assert_palette(path)
    with rasterio.open(path) as src:
        assert src.overviews(1) == [2, 4]
        overview = src.read(1, out_shape=(550, 650))
        assert set(np.unique(overview[:, 32:])) == {2}
        assert src.nodata == IGNORE_INDEX
        assert src.transform == GEOREF.transform and src.crs == GEOREF.crs
        np.testing.assert_array_equal(src.read(1), classes)
    assert [p.name for p in tmp_path.iterdir()] == ["cog.tif"]  # the plain GeoTIFF is gone


def test_cog_keeps_the_internal_mask(tmp_path: Path) -> None:
    """rio-cogeo's cog_translate lost it (WarpedVRT); GDAL's COG driver keeps it."""
    data = np.random.default_rng(4).integers(0, 256, (6, 700, 600), dtype=np.uint8)
    valid = np.ones((700, 600), bool)
    valid[:40] = False
    data[:, ~valid] = 0
    path = tmp_path / "probabilities.tif"
    with geotiff_writer(
        path, height=700, width=600, count=6, dtype=np.uint8, georef=GEOREF, mask=True, cog=True
    ) as out:
        out.add(data, valid)
    assert cog_validate(path, quiet=True)[0]
    with rasterio.open(path) as src:
        np.testing.assert_array_equal(src.dataset_mask(), np.where(valid, 255, 0))
        np.testing.assert_array_equal(src.read(), data)
        assert src.overviews(1) == [2]
