"""predict's outputs for GIS users: class maps as palette TIFFs, Cloud Optimized GeoTIFFs (--cog,
validated by rio-cogeo) and polygons per class in a GeoPackage (--vector), georeferenced like the
input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyogrio.raw
import pytest
import shapely
from affine import Affine
from rasterio.control import GroundControlPoint
from rasterio.crs import CRS

from aerialseg.classes import CLASS_NAMES, IGNORE_INDEX
from aerialseg.raster import GeoReference, write_raster
from aerialseg.vectors import LAYER, write_class_polygons

PIXEL_M = 0.09
UTM = GeoReference(CRS.from_epsg(32632), Affine(PIXEL_M, 0.0, 496_000.0, 0.0, -PIXEL_M, 5_420_000.0))
BUILDING, TREE, CAR = 1, 3, 4


def read_polygons(path: Path) -> tuple[dict[str, object], list[shapely.Geometry], list[str], np.ndarray]:
    meta, _, wkb, (names, index) = pyogrio.raw.read(path, layer=LAYER)
    return meta, list(shapely.from_wkb(wkb)), list(names), np.asarray(index)


def scene() -> np.ndarray:
    """Impervious ground, a 50 x 60 px building with a 4 x 4 px tree over its roof, a car, and a
    nodata strip along the top."""
    classes = np.zeros((300, 400), np.uint8)
    classes[100:150, 200:260] = BUILDING
    classes[120:124, 220:224] = TREE
    classes[200:210, 10:30] = CAR
    classes[:5] = IGNORE_INDEX
    return classes


def test_a_building_comes_back_as_one_polygon_of_its_area(tmp_path: Path) -> None:
    class_map = write_raster(tmp_path / "map.tif", scene(), UTM, colormap=True, nodata=IGNORE_INDEX)
    counts = write_class_polygons(class_map, tmp_path / "map.gpkg", CLASS_NAMES)
    assert counts == {
        **dict.fromkeys(CLASS_NAMES, 0),
        "impervious_surfaces": 1,
        "building": 1,
        "tree": 1,
        "car": 1,
    }
    meta, polygons, names, index = read_polygons(tmp_path / "map.gpkg")
    assert meta["crs"] == "EPSG:32632"
    assert list(meta["fields"]) == ["class", "class_index"]
    assert [CLASS_NAMES[i] for i in index] == names
    by_class = {int(i): p for i, p in zip(index, polygons, strict=True)}
    pixel_area = PIXEL_M * PIXEL_M
    building = by_class[BUILDING]
    # 50 x 60 px less the tree's 4 x 4 px, which is a hole in it
    assert building.area == pytest.approx((50 * 60 - 16) * pixel_area, rel=1e-9)
    assert len(building.interiors) == 1
    left, bottom, right, top = building.bounds
    assert (left, top) == pytest.approx(UTM.transform @ (200, 100))
    assert (right, bottom) == pytest.approx(UTM.transform @ (260, 150))
    assert by_class[TREE].area == pytest.approx(16 * pixel_area, rel=1e-9)
    assert by_class[CAR].area == pytest.approx(200 * pixel_area, rel=1e-9)
    # nodata gives no polygon: all polygons together cover the raster less its nodata strip
    assert sum(p.area for p in polygons) == pytest.approx((295 * 400) * pixel_area, rel=1e-9)
    assert max(p.bounds[3] for p in polygons) == pytest.approx(UTM.transform.f - 5 * PIXEL_M)


def test_all_nodata_gives_an_empty_layer(tmp_path: Path) -> None:
    classes = np.full((20, 30), IGNORE_INDEX, np.uint8)
    class_map = write_raster(tmp_path / "map.tif", classes, UTM, colormap=True, nodata=IGNORE_INDEX)
    assert sum(write_class_polygons(class_map, tmp_path / "map.gpkg", CLASS_NAMES).values()) == 0
    meta, polygons, _, _ = read_polygons(tmp_path / "map.gpkg")
    assert polygons == [] and meta["crs"] == "EPSG:32632"


def test_a_class_map_georeferenced_by_gcps_gives_map_coordinates(tmp_path: Path) -> None:
    transform = UTM.transform
    gcps = tuple(
        GroundControlPoint(row=r, col=c, x=(transform @ (c, r))[0], y=(transform @ (c, r))[1])
        for r, c in ((0, 0), (0, 400), (300, 0), (300, 400))
    )
    georef = GeoReference(None, Affine.identity(), gcps, CRS.from_epsg(32632))
    class_map = write_raster(tmp_path / "map.tif", scene(), georef, colormap=True, nodata=IGNORE_INDEX)
    write_class_polygons(class_map, tmp_path / "map.gpkg", CLASS_NAMES)
    meta, polygons, _, index = read_polygons(tmp_path / "map.gpkg")
    assert meta["crs"] == "EPSG:32632"
    building = polygons[list(index).index(BUILDING)]
    assert building.bounds == pytest.approx((*(transform @ (200, 150)), *(transform @ (260, 100))))


def test_a_value_that_is_no_class_is_named(tmp_path: Path) -> None:
    classes = scene()
    classes[50, 50] = 17
    class_map = write_raster(tmp_path / "map.tif", classes, UTM, colormap=True, nodata=IGNORE_INDEX)
    with pytest.raises(
        ValueError, match=r"map\.tif: class value 17 is neither a class index \(0-5\) nor nodata"
    ):
        write_class_polygons(class_map, tmp_path / "map.gpkg", CLASS_NAMES)
    assert not (tmp_path / "map.gpkg").exists()
