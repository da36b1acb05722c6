"""predict's outputs for GIS users: class maps as palette TIFFs, Cloud Optimized GeoTIFFs (--cog,
validated by rio-cogeo) and polygons per class in a GeoPackage (--vector), georeferenced like the
input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyogrio.raw
import pytest
import rasterio
import shapely
import torch
from affine import Affine
from PIL import Image
from rasterio.control import GroundControlPoint
from rasterio.crs import CRS
from rio_cogeo.cogeo import cog_validate
from typer.testing import CliRunner

from aerialseg import vectors
from aerialseg.checkpoint import save_checkpoint
from aerialseg.classes import CLASS_NAMES, CLASSES, IGNORE_INDEX
from aerialseg.cli import app
from aerialseg.model import build_model, model_args
from aerialseg.model_card import ModelCard
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


@pytest.mark.parametrize("batch_vertices", [vectors.WRITE_BATCH_VERTICES, 1])
def test_a_building_comes_back_as_one_polygon_of_its_area(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, batch_vertices: int
) -> None:
    """Also with one polygon per batch: every batch after the first is appended to the layer."""
    monkeypatch.setattr(vectors, "WRITE_BATCH_VERTICES", batch_vertices)
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


# --------------------------------------------------------------------------- aerialseg predict

BANDS = ("ir", "r", "g", "dsm")
# Another projected CRS than the synthetic scenes', non-square pixels, north up.
LAEA = GeoReference(CRS.from_epsg(3035), Affine(0.3, 0.0, 4_321_000.0, 0.0, -0.2, 3_210_000.0))
HEIGHT, WIDTH, NODATA_ROWS = 700, 600, 40


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained ResNet18 fcn_skip (the cheapest network with context on a CPU) and its card."""
    torch.manual_seed(0)
    args = model_args("fcn_skip", "resnet18", len(BANDS), len(CLASSES))
    card = ModelCard.for_training(
        args, bands=BANDS, mean=(0.45, 0.35, 0.3, 2.0), std=(0.2, 0.15, 0.15, 3.0), window=64
    )
    path = tmp_path_factory.mktemp("models") / "model.ckpt"
    save_checkpoint(path, build_model(args).eval(), card)
    return path


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Smooth scene-like bands (so the classes form regions), the top rows nodata."""
    rng = np.random.default_rng(0)
    coarse = rng.uniform(0, 1, (len(BANDS), HEIGHT // 32 + 1, WIDTH // 32 + 1)).astype(np.float32)
    pixels = coarse.repeat(32, axis=1).repeat(32, axis=2)[:, :HEIGHT, :WIDTH].copy()
    pixels[3] *= 10.0  # heights in metres
    pixels[:, :NODATA_ROWS] = -1.0
    return write_raster(tmp_path_factory.mktemp("in") / "scene.tif", pixels, LAEA, nodata=-1.0)


def predict(image: Path, checkpoint: Path, out: Path, *options: str) -> None:
    args = ["predict", str(image), "-m", str(checkpoint), "-o", str(out), "--window", "128"]
    result = CliRunner().invoke(app, [*args, "--overlap", "0.25", "--no-progress", *options])
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def outputs(tmp_path_factory: pytest.TempPathFactory, image: Path, checkpoint: Path) -> dict[str, Path]:
    """The same input predicted plain and with --cog --vector --probabilities."""
    plain, gis = tmp_path_factory.mktemp("plain"), tmp_path_factory.mktemp("gis")
    predict(image, checkpoint, plain, "--probabilities")
    predict(image, checkpoint, gis, "--probabilities", "--cog", "--vector")
    return {"plain": plain, "gis": gis}


def test_predict_writes_the_gis_outputs_and_nothing_else(outputs: dict[str, Path]) -> None:
    assert sorted(p.name for p in outputs["plain"].iterdir()) == [
        "scene.png",
        "scene.tif",
        "scene_probabilities.tif",
    ]
    assert sorted(p.name for p in outputs["gis"].iterdir()) == [
        "scene.gpkg",
        "scene.png",
        "scene.tif",
        "scene_probabilities.tif",
    ]


def test_predicted_class_maps_are_palette_tiffs(outputs: dict[str, Path]) -> None:
    for folder in outputs.values():
        with Image.open(folder / "scene.tif") as image:
            assert image.mode == "P"


@pytest.mark.parametrize("name", ["scene.tif", "scene_probabilities.tif"])
def test_cog_outputs_validate_and_hold_the_plain_outputs_pixels(outputs: dict[str, Path], name: str) -> None:
    cog, plain = outputs["gis"] / name, outputs["plain"] / name
    valid, errors, warnings = cog_validate(cog, quiet=True)
    assert valid and not errors and not warnings, (errors, warnings)
    with rasterio.open(cog) as c, rasterio.open(plain) as p:
        assert c.overviews(1) == [2] and p.overviews(1) == []
        assert (c.crs, c.transform, c.nodata, c.descriptions) == (
            p.crs,
            p.transform,
            p.nodata,
            p.descriptions,
        )
        assert c.read().tobytes() == p.read().tobytes()
        np.testing.assert_array_equal(c.dataset_mask(), p.dataset_mask())
        assert c.tags()["aerialseg_window"] == "128"
        if name == "scene.tif":
            assert c.nodata == IGNORE_INDEX
            assert c.colormap(1) == p.colormap(1)
            assert c.colormap(1)[IGNORE_INDEX] == (0, 0, 0, 0)
        else:
            assert c.scales == p.scales == (1 / 255,) * len(CLASSES)


def test_polygons_cover_the_class_map_in_the_inputs_crs_and_bounds(
    outputs: dict[str, Path], image: Path
) -> None:
    meta, polygons, names, index = read_polygons(outputs["gis"] / "scene.gpkg")
    assert meta["crs"] == "EPSG:3035"
    with rasterio.open(image) as src:
        left, bottom, right, top = src.bounds
    with rasterio.open(outputs["gis"] / "scene.tif") as src:
        classes = src.read(1)
    xmin, ymin, xmax, ymax = shapely.total_bounds(polygons)
    assert left <= xmin < xmax <= right and bottom <= ymin < ymax <= top
    assert ymax == pytest.approx(top - NODATA_ROWS * 0.2)  # the nodata rows are left out
    pixel_area = 0.3 * 0.2
    areas = np.bincount(index, weights=shapely.area(polygons), minlength=len(CLASSES))
    pixels = np.bincount(classes.ravel(), minlength=256)[: len(CLASSES)]
    assert len(set(index)) > 1  # the untrained network still predicts several classes
    np.testing.assert_allclose(areas, pixels * pixel_area, rtol=1e-9)
    assert names == [CLASS_NAMES[i] for i in index]
