"""`aerialseg predict`: streaming = in-memory prediction, the evaluate stage's classes, the input's
grid, nodata, bounded reads, MLflow URIs, and a clear error (and no output) for each bad input."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytest
import rasterio
import torch
from affine import Affine
from PIL import Image
from rasterio.crs import CRS
from rasterio.enums import ColorInterp
from rasterio.windows import Window
from torch import nn
from typer.testing import CliRunner

from aerialseg.checkpoint import save_checkpoint
from aerialseg.classes import CLASSES
from aerialseg.cli import app
from aerialseg.config import Params
from aerialseg.datasets.isprs_convert import TilePlan, _ImageBlocks, ndsm_metres_from_grey
from aerialseg.datasets.isprs_layout import NDSM, POTSDAM
from aerialseg.datasets.tiles_table import read_tiles_table
from aerialseg.evaluation import evaluate
from aerialseg.inference import ArrayRows, Settings, predict_probabilities, stream_blocks
from aerialseg.model import build_model, model_args
from aerialseg.model_card import ModelCard
from aerialseg.patches import BandStats
from aerialseg.raster import GeoReference, write_raster
from aerialseg.tracking import RunRef, log_model

BANDS = ["ir", "r", "g", "dsm"]
STATS = BandStats(mean=(0.45, 0.35, 0.3, 2.0), std=(0.2, 0.15, 0.15, 3.0))
PATCH = 64
# A projected CRS other than the synthetic scenes' and a rotated grid with non-square pixels:
# the output must keep both exactly.
CRS_3035 = CRS.from_epsg(3035)
ROTATED = Affine.translation(4_321_000.5, 3_210_000.25) @ Affine.rotation(20) @ Affine.scale(0.3, -0.2)

runner = CliRunner()


class Pixelwise(nn.Module):
    """A 1x1 convolution: no context, so flips and rotations must not change its answer."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(len(BANDS), len(CLASSES), kernel_size=1)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += len(x)
        return self.conv(x)


@pytest.fixture(scope="module")
def network() -> tuple[nn.Module, dict[str, Any], ModelCard]:
    """An untrained network with context (ResNet18 encoder, batch norm, bilinear upsampling; the
    decoder-less fcn_skip, the cheapest on a CPU), its model args and its model card."""
    torch.manual_seed(0)
    args = model_args("fcn_skip", "resnet18", len(BANDS), len(CLASSES))
    return build_model(args).eval(), args, _card(args, BANDS, STATS)


def _card(args: dict[str, Any], bands: list[str], stats: BandStats) -> ModelCard:
    return ModelCard.for_training(args, bands=bands, mean=stats.mean, std=stats.std, window=PATCH)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, network: Any) -> Path:
    model, _, card = network
    path = tmp_path_factory.mktemp("models") / "model.ckpt"
    save_checkpoint(path, model, card)
    return path


def _image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Smooth, scene-like bands (a random field, blurred), so classes vary over the raster."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 1, (len(BANDS), height // 16 + 2, width // 16 + 2)).astype(np.float32)
    image = coarse.repeat(16, axis=1).repeat(16, axis=2)[:, :height, :width]
    image += rng.normal(0, 0.05, image.shape).astype(np.float32)
    image[3] *= 10.0  # heights in metres
    return image


def _normalised(image: np.ndarray) -> np.ndarray:
    mean = np.asarray(STATS.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(STATS.std, dtype=np.float32)[:, None, None]
    return (image - mean) / std


def _write(path: Path, image: np.ndarray, nodata: float | None = None) -> Path:
    return write_raster(path, image, GeoReference(CRS_3035, ROTATED), nodata=nodata)


def _predict(*args: str) -> Any:
    return runner.invoke(app, ["predict", *args, "--no-progress"])


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# --------------------------------------------------------------------------- the streaming core


class RecordingRows(ArrayRows):
    def __init__(self, image: np.ndarray) -> None:
        super().__init__(image)
        self.reads: list[tuple[int, int]] = []

    def read(self, top: int, bottom: int) -> tuple[np.ndarray, np.ndarray | None]:
        self.reads.append((top, bottom))
        return super().read(top, bottom)


def test_rows_are_read_once_and_handed_on_as_soon_as_they_are_final() -> None:
    """Bounded memory, structurally: a tall raster is read in increasing, non-overlapping row
    ranges, and each block of finished rows comes out while the reader is at most about one
    window (+ one stride) below it, however tall the raster."""
    height, width, window = 2048, 96, 64
    rows = RecordingRows(np.random.default_rng(0).standard_normal((4, height, width)).astype(np.float32))
    net = Pixelwise().eval()
    covered = 0
    for block in stream_blocks(net, rows, Settings(window=window, overlap=0.5, batch_size=4)):
        assert block.row == covered
        covered += block.probabilities.shape[1]
        read_to = max(bottom for _, bottom in rows.reads)
        assert read_to - covered <= window + window // 2
    assert covered == height
    assert [top for top, _ in rows.reads[1:]] == [bottom for _, bottom in rows.reads[:-1]]
    assert rows.reads[-1][1] == height


# --------------------------------------------------------------------------- GeoTIFF in, GeoTIFF out


def test_predict_keeps_the_grid_and_gives_the_in_memory_classes(
    tmp_path: Path, network: Any, checkpoint: Path
) -> None:
    """A raster of several windows (and two output tile rows) on a rotated EPSG:3035 grid."""
    image = _image(272, 288)
    source = _write(tmp_path / "scene.tif", image)
    out = tmp_path / "out"
    result = _predict(str(source), "--model", str(checkpoint), "--output", str(out), "--probabilities",
                      "--preview-size", "100", "--overlap", "0.25", "--precision", "32")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert _listing(out) == ["scene.png", "scene.tif", "scene_probabilities.tif"]

    probs = predict_probabilities(network[0], _normalised(image), Settings(window=PATCH, overlap=0.25))
    with rasterio.open(out / "scene.tif") as dst, rasterio.open(source) as src:
        assert (dst.crs, dst.transform, dst.width, dst.height) == (src.crs, src.transform, 288, 272)
        assert dst.crs == CRS_3035 and dst.transform == ROTATED
        assert dst.count == 1 and dst.dtypes[0] == "uint8" and dst.nodata == 255
        assert dst.profile["tiled"] and dst.block_shapes[0] == (256, 256)
        assert dst.compression is not None and dst.compression.value == "DEFLATE"
        colormap = dst.colormap(1)
        assert all(colormap[c.index][:3] == c.colour for c in CLASSES)
        classes = dst.read(1)
    assert np.array_equal(classes, probs.argmax(axis=0))
    assert len(np.unique(classes)) > 1  # a meaningful comparison
    with rasterio.open(out / "scene_probabilities.tif") as pdst:
        assert (pdst.count, pdst.dtypes[0], pdst.transform) == (len(CLASSES), "uint8", ROTATED)
        assert pdst.scales == (1 / 255,) * len(CLASSES)
        assert pdst.descriptions == tuple(c.name for c in CLASSES)
        assert np.array_equal(pdst.read(), np.rint(probs * 255).astype(np.uint8))
    with Image.open(out / "scene.png") as png:
        assert png.size == (96, 91)  # every 3rd pixel of 288 x 272


def test_nodata_pixels_get_class_255_and_zero_probability(
    tmp_path: Path, network: Any, checkpoint: Path
) -> None:
    image = _image(96, 160, seed=5)
    invalid = np.zeros(image.shape[1:], bool)
    image[:, 10:40, 20:70] = -9999.0  # nodata in every band
    image[1, 80, 150] = -9999.0  # in one band only: the pixel cannot be predicted either
    image[3, 5, 5] = np.nan  # not a number
    invalid[10:40, 20:70] = invalid[80, 150] = invalid[5, 5] = True
    source = _write(tmp_path / "holes.tif", image, nodata=-9999.0)
    out = tmp_path / "out"
    result = _predict(str(source), "-m", str(checkpoint), "-o", str(out), "--probabilities",
                      "--no-preview", "--precision", "32")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"{invalid.sum()} nodata px" in result.output

    # The network sees the band mean (0 after normalisation) where the input has no data.
    filled = _normalised(image)
    filled[:, invalid] = 0.0
    expected = predict_probabilities(network[0], filled, Settings(window=PATCH)).argmax(axis=0)
    expected[invalid] = 255
    with rasterio.open(out / "holes.tif") as dst:
        assert dst.nodata == 255
        assert np.array_equal(dst.read(1), expected)
    with rasterio.open(out / "holes_probabilities.tif") as pdst:
        probs = pdst.read()
        assert not probs[:, invalid].any()
        assert np.array_equal(pdst.dataset_mask() == 0, invalid)


def test_a_folder_is_predicted_file_by_file(tmp_path: Path, checkpoint: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    _write(folder / "a.tif", _image(70, 90, seed=1))
    _write(folder / "b.tiff", _image(64, 64, seed=2))
    (folder / "notes.txt").write_text("not a raster, not a .tif: ignored\n")
    out = tmp_path / "out"
    result = _predict(str(folder), "-m", str(checkpoint), "-o", str(out), "--tta", "d4")
    assert result.exit_code == 0, result.output
    assert _listing(out) == ["a.png", "a.tif", "b.png", "b.tif"]
    with rasterio.open(out / "a.tif") as a, rasterio.open(out / "b.tif") as b:
        assert (a.height, a.width, b.height, b.width) == (70, 90, 64, 64)


# --------------------------------------------------------------------------- the pipeline and MLflow


@pytest.fixture(scope="module")
def evaluated(
    tmp_path_factory: pytest.TempPathFactory, synthetic_tiles: Path, network: Any
) -> Iterator[dict[str, Any]]:
    """The `evaluate` stage run on the synthetic test tile with the untrained network, whose MLflow
    run also holds the network as a logged, registered model (alias `candidate`)."""
    model, _, card = network
    root = tmp_path_factory.mktemp("evaluated")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        # MLflow infers a model's pip requirements by loading it in a subprocess (~30 s here); the
        # fallback list is as good for a test, and loading does not depend on it.
        mp.setenv("MLFLOW_REQUIREMENTS_INFERENCE_TIMEOUT", "1")
        mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
        experiment = mlflow.create_experiment("predict", artifact_location=(root / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=experiment) as run:
            pass
        models = root / "models"
        save_checkpoint(models / "model.ckpt", model, card)
        RunRef(run.info.run_id, experiment, "predict").save(models / "mlflow_run.json")
        params = Params.model_validate(
            {
                "paths": {
                    "tiles": str(synthetic_tiles),
                    "models": str(models),
                    "reports": str(root / "reports"),
                },
                "data": {"val_tiles": [3], "test_tiles": [4]},
                "evaluate": {"overlap": 0.5, "batch_size": 4, "tta": "none"},
            }
        )
        evaluate(params)
        log_model(run.info.run_id, model, card, registered_model="aerialseg-test", alias="candidate")
        tile = read_tiles_table(synthetic_tiles, "test").iloc[0]
        yield {
            "root": root,
            "checkpoint": models / "model.ckpt",
            "run_id": run.info.run_id,
            "image": synthetic_tiles / str(tile["image"]),
            "evaluated": root / "reports" / "predictions" / f"{tile['tile']}.tif",
        }


def test_predict_gives_the_classes_of_the_evaluate_stage(evaluated: dict[str, Any], tmp_path: Path) -> None:
    image: Path = evaluated["image"]
    result = _predict(str(image), "-m", str(evaluated["checkpoint"]), "-o", str(tmp_path), "--no-preview")
    assert result.exit_code == 0, result.output
    with rasterio.open(evaluated["evaluated"]) as ref, rasterio.open(tmp_path / f"{image.stem}.tif") as got:
        assert (got.crs, got.transform, got.shape) == (ref.crs, ref.transform, ref.shape)
        assert np.array_equal(got.read(1), ref.read(1))


def test_isprs_units_are_converted_like_the_tiles_stage(evaluated: dict[str, Any], tmp_path: Path) -> None:
    """The same tile in the products' own units: spectral 0-255, DSM in metres above sea level."""
    image: Path = evaluated["image"]
    with rasterio.open(image) as src:
        tile, profile = src.read(), src.profile
    raw = tile.copy()
    raw[:3] *= 255.0  # ir, r, g
    raw[3] += 263.5  # the tile's dsm is height above its 1st percentile: back to altitudes
    raw_path = tmp_path / "raw" / "area_raw.tif"
    raw_path.parent.mkdir()
    with rasterio.open(raw_path, "w", **profile) as dst:
        dst.write(raw)
    out = tmp_path / "out"
    result = _predict(str(raw_path), "-m", str(evaluated["checkpoint"]), "-o", str(out), "--units", "isprs")
    assert result.exit_code == 0, result.output
    with rasterio.open(evaluated["evaluated"]) as ref, rasterio.open(out / "area_raw.tif") as got:
        same = np.mean(got.read(1) == ref.read(1))
    # Equal up to float rounding of x * 255 / 255 and of the percentile (a tie may flip).
    assert same > 0.999, same
    # Read as tiles-stage units instead, the same file would give another map: it stops instead.
    result = _predict(str(raw_path), "-m", str(evaluated["checkpoint"]), "-o", str(tmp_path / "as-tiles"))
    assert result.exit_code == 1
    assert f"{raw_path} band 1 (ir): float32 values" in result.output
    assert "pass --units isprs" in result.output
    assert _listing(tmp_path / "as-tiles") == []


@pytest.mark.parametrize("uri", ["runs:/{run_id}/model", "models:/aerialseg-test@candidate"])
def test_an_mlflow_model_uri_predicts_like_the_checkpoint(
    evaluated: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, uri: str
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{evaluated['root'] / 'mlflow.db'}")
    image: Path = evaluated["image"]
    result = _predict(str(image), "-m", uri.format(run_id=evaluated["run_id"]), "-o", str(tmp_path))
    assert result.exit_code == 0, result.output
    with rasterio.open(evaluated["evaluated"]) as ref, rasterio.open(tmp_path / f"{image.stem}.tif") as got:
        assert np.array_equal(got.read(1), ref.read(1))
        assert json.loads(got.tags()["aerialseg_classes"])[1]["name"] == "building"


# --------------------------------------------------------------------------- bad input


def _missing(folder: Path) -> Path:
    return folder / "missing.tif"


def _text(folder: Path) -> Path:
    path = folder / "text.tif"
    path.write_text("hello, not a raster\n")
    return path


def _truncated(folder: Path) -> Path:
    path = _write(
        folder / "cut.tif", np.random.default_rng(0).uniform(0, 1, (4, 300, 300)).astype(np.float32)
    )
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 6 // 10])  # the header is intact, tiles are gone
    return path


def _three_bands(folder: Path) -> Path:
    return _write(folder / "rgb.tif", np.zeros((3, 80, 80), np.float32))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (_missing, "no such file"),
        (_text, "not a readable raster"),
        (_truncated, "truncated or corrupt"),
        (_three_bands, "3 band(s), but the model expects"),
    ],
    ids=["missing", "not-a-raster", "truncated", "wrong-band-count"],
)
def test_bad_input_fails_naming_the_file_and_leaves_no_output(
    tmp_path: Path, checkpoint: Path, make: Any, message: str
) -> None:
    source: Path = make(tmp_path)
    out = tmp_path / "out"
    result = _predict(str(source), "-m", str(checkpoint), "-o", str(out), "--probabilities")
    assert result.exit_code == 1
    assert str(source) in result.output and message in result.output
    assert "4 bands (ir, r, g, dsm, in that order)" in result.output
    assert _listing(out) == []  # not even a temporary file


def test_a_bad_file_in_a_folder_stops_before_anything_is_written(tmp_path: Path, checkpoint: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    _write(folder / "a.tif", _image(64, 64))
    (folder / "b.tif").write_text("not a raster")
    result = _predict(str(folder), "-m", str(checkpoint), "-o", str(tmp_path / "out"))
    assert result.exit_code == 1 and "b.tif" in result.output
    assert _listing(tmp_path / "out") == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-m", "nowhere.ckpt"], "nowhere.ckpt: no such file"),
        (["--window", "100"], "multiple of 32"),
        pytest.param(
            ["--device", "cuda"],
            "no CUDA device",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU"),
        ),
    ],
)
def test_bad_options_fail_clearly(tmp_path: Path, checkpoint: Path, args: list[str], message: str) -> None:
    source = _write(tmp_path / "ok.tif", _image(64, 64))
    result = _predict(str(source), "-m", str(checkpoint), "-o", str(tmp_path / "out"), *args)
    assert result.exit_code == 1 and message in result.output
    assert _listing(tmp_path / "out") == []


# --------------------------------------------------------------------------- units and alpha


def _write_bands(path: Path, bands: np.ndarray, colorinterp: list[ColorInterp] | None = None) -> Path:
    profile = {"driver": "GTiff", "height": bands.shape[1], "width": bands.shape[2], "count": len(bands),
               "dtype": bands.dtype.name, "crs": CRS_3035, "transform": ROTATED}  # fmt: skip
    with rasterio.open(path, "w", **profile) as dst:
        if colorinterp is not None:
            dst.colorinterp = colorinterp
        dst.write(bands)
    return path


def _uint8_stack(height: int = 80, width: int = 80) -> np.ndarray:
    """ir, r, g as 8-bit values 0-255, dsm as integer metres: integer spectral bands for a model
    with a height band (whose band mean, in metres, is above 1)."""
    image = _image(height, width)
    image[:3] = np.clip(image[:3], 0, 1) * 255
    image[:3, 0, 0], image[:3, 0, 1] = 0, 255
    return np.rint(image).astype(np.uint8)


def _float_0_255_stack(height: int = 80, width: int = 80) -> np.ndarray:
    """The same 8-bit values stored as float32 next to a DSM in metres above sea level."""
    image = _uint8_stack(height, width).astype(np.float32)
    image[3] += 263.5
    return image


def _uint16_stack(height: int = 80, width: int = 80) -> np.ndarray:
    """12-bit imagery in 16 bits (values 0-4095), DSM in metres."""
    image = _image(height, width)
    image[:3] = np.clip(image[:3], 0, 1) * 4095
    image[:3, 0, 0], image[:3, 0, 1] = 0, 4095
    image[3] += 263.5
    return np.rint(image).astype(np.uint16)


def _reflectances(height: int = 80, width: int = 80) -> np.ndarray:
    return _image(height, width)  # tiles units, given --units isprs


@pytest.mark.parametrize(
    ("make", "units", "message"),
    [
        (
            _uint8_stack,
            "tiles",
            "band 1 (ir): uint8 values in [0, 255] (sampled), but the model expects reflectances in "
            "[0, 1] as the tiles stage writes them (float32); pass --units isprs to convert the ISPRS "
            "products' 8-bit values",
        ),
        (
            _float_0_255_stack,
            "tiles",
            "band 1 (ir): float32 values in [0, 255] (sampled), but the model expects reflectances in [0, 1]",
        ),
        (
            _uint16_stack,
            "tiles",
            "band 1 (ir): uint16 values in [0, 4095] (sampled), but the model expects reflectances in [0, 1] "
            "as the tiles stage writes them (float32); scale the band to [0, 1] first",
        ),
        (
            _uint16_stack,
            "isprs",
            "band 1 (ir): uint16 values in [0, 4095] (sampled), but --units isprs expects the ISPRS "
            "products' 8-bit values 0-255; convert 16-bit or 12-bit imagery to 0-255 first",
        ),
        (
            _reflectances,
            "isprs",
            "band 1 (ir): float32 values",  # checked below: "look like reflectances"
        ),
    ],
    ids=[
        "uint8-as-tiles",
        "float-0-255-as-tiles",
        "uint16-as-tiles",
        "uint16-as-isprs",
        "reflectances-as-isprs",
    ],
)
def test_spectral_bands_in_the_wrong_units_stop_naming_file_band_and_range(
    tmp_path: Path, checkpoint: Path, make: Any, units: str, message: str
) -> None:
    """Whatever other bands the model has (here a DSM in metres), and before anything is written."""
    source = _write_bands(tmp_path / "in.tif", make())
    out = tmp_path / "out"
    result = _predict(str(source), "-m", str(checkpoint), "-o", str(out), "--units", units, "--probabilities")
    assert result.exit_code == 1, result.output
    assert f"error: {source} {message}" in result.output
    if make is _reflectances:
        assert "look like reflectances in [0, 1] already: leave out --units isprs" in result.output
    assert _listing(out) == []


def test_a_bad_file_in_a_folder_stops_on_its_units_before_anything_is_written(
    tmp_path: Path, checkpoint: Path
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    _write(folder / "a.tif", _image(64, 64))
    _write_bands(folder / "b.tif", _uint8_stack(64, 64))
    result = _predict(str(folder), "-m", str(checkpoint), "-o", str(tmp_path / "out"))
    assert result.exit_code == 1 and f"{folder / 'b.tif'} band 1 (ir): uint8" in result.output
    assert _listing(tmp_path / "out") == []


def test_isprs_units_accept_8_bit_values_in_any_integer_type(tmp_path: Path, checkpoint: Path) -> None:
    """uint16 holding 0-255 is 8-bit imagery: predicted, and like the same values as uint8 would be."""
    stack = _uint16_stack()
    stack[:3] //= 16  # 0-255
    source = _write_bands(tmp_path / "in.tif", stack)
    result = _predict(str(source), "-m", str(checkpoint), "-o", str(tmp_path / "out"), "--units", "isprs")
    assert result.exit_code == 0, result.output


RGB = ["r", "g", "b"]
RGB_STATS = BandStats(mean=(0.4, 0.35, 0.3), std=(0.2, 0.2, 0.2))


@pytest.fixture(scope="module")
def rgb_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(1)
    args = model_args("fcn_skip", "resnet18", len(RGB), len(CLASSES))
    path = tmp_path_factory.mktemp("rgb_model") / "model.ckpt"
    save_checkpoint(path, build_model(args).eval(), _card(args, RGB, RGB_STATS))
    return path


@pytest.mark.parametrize(("dtype", "units"), [("uint8", "isprs"), ("float32", "tiles")])
def test_an_alpha_band_is_nodata_and_not_fed_to_the_network(
    tmp_path: Path, rgb_checkpoint: Path, dtype: str, units: str
) -> None:
    """RGBA for an RGB model: alpha 0 -> 255 in the output; elsewhere the classes of the RGB bands
    alone (with the same pixels masked, since the network sees the band mean in nodata); partial
    alpha counts as data. Fully opaque, the output is that of the RGB file."""
    height, width = 96, 128
    rgb = np.clip(_image(height, width, seed=7)[:3], 0, 1)
    rgb = np.rint(rgb * 255).astype(np.uint8) if dtype == "uint8" else rgb.astype(np.float32)
    alpha = np.full((height, width), 255, rgb.dtype)
    alpha[20:50, 30:90] = 0
    alpha[70, 5] = alpha[0, 127] = 0
    alpha[60:90, 100:120] = 128  # semi-transparent: still data
    transparent = alpha == 0
    interp = [ColorInterp.red, ColorInterp.green, ColorInterp.blue, ColorInterp.alpha]
    rgba = _write_bands(tmp_path / "rgba.tif", np.concatenate([rgb, alpha[None]]), interp)
    masked_rgb = _write_bands(tmp_path / "rgb.tif", rgb)
    with rasterio.open(masked_rgb, "r+") as dst:
        dst.write_mask(np.where(transparent, 0, 255).astype(np.uint8))
    opaque = _write_bands(
        tmp_path / "opaque.tif", np.concatenate([rgb, np.full_like(alpha, 255)[None]]), interp
    )
    plain_rgb = _write_bands(tmp_path / "plain.tif", rgb)

    out = tmp_path / "out"
    for source in (rgba, masked_rgb, opaque, plain_rgb):
        result = _predict(
            str(source), "-m", str(rgb_checkpoint), "-o", str(out), "--units", units, "--no-preview"
        )
        assert result.exit_code == 0, result.output
    assert (
        f"{transparent.sum()} nodata px"
        in _predict(
            str(rgba),
            "-m",
            str(rgb_checkpoint),
            "-o",
            str(tmp_path / "again"),
            "--units",
            units,
            "--no-preview",
        ).output
    )
    with rasterio.open(out / "rgba.tif") as a, rasterio.open(out / "rgb.tif") as b:
        got, alone = a.read(1), b.read(1)
    assert np.array_equal(got == 255, transparent)
    assert np.array_equal(got, alone)
    assert len(np.unique(got[~transparent])) > 1  # a meaningful comparison
    with rasterio.open(out / "opaque.tif") as a, rasterio.open(out / "plain.tif") as b:
        assert np.array_equal(a.read(1), b.read(1))
        assert not (a.read(1) == 255).any()


def test_one_band_more_that_is_not_alpha_is_still_rejected(tmp_path: Path, rgb_checkpoint: Path) -> None:
    source = _write_bands(tmp_path / "four.tif", np.zeros((4, 64, 64), np.float32))
    result = _predict(str(source), "-m", str(rgb_checkpoint), "-o", str(tmp_path / "out"))
    assert result.exit_code == 1
    assert f"{source}: 4 band(s), but the model expects a GeoTIFF with 3 bands (r, g, b" in result.output
    assert "only when it is an alpha band, and none is" in result.output
    assert _listing(tmp_path / "out") == []


NDSM_STATS = BandStats(mean=(8.0,), std=(6.0,))


@pytest.fixture(scope="module")
def ndsm_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(2)
    args = model_args("fcn_skip", "resnet18", 1, len(CLASSES))
    path = tmp_path_factory.mktemp("ndsm_model") / "model.ckpt"
    save_checkpoint(path, build_model(args).eval(), _card(args, ["ndsm"], NDSM_STATS))
    return path


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")  # the JPEG, as distributed
def test_potsdam_ndsm_grey_values_are_decimetres_in_predict_as_in_the_tiles_stage(
    tmp_path: Path, ndsm_checkpoint: Path
) -> None:
    """Potsdam's `*_normalized_lastools.jpg` itself, predicted with --units isprs, gives exactly what
    the tiles stage's ndsm band (grey 120 -> 12.0 m) gives with --units tiles, not what 120 m gives."""
    height, width = 96, 128
    grey = np.tile(np.linspace(0, 255, width).astype(np.uint8), (height, 1))
    grey[16:80, 40:100] = 120  # a 12 m building, large enough to come through the JPEG exactly
    jpeg = tmp_path / "dsm_potsdam_02_10_normalized_lastools.jpg"
    with rasterio.open(jpeg, "w", driver="JPEG", height=height, width=width, count=1, dtype="uint8") as dst:
        dst.write(grey[None])

    # The tiles stage's ndsm band of this JPEG, by its own reading code.
    plan = TilePlan(spectral={}, reference_role=NDSM, needs_dsm=False, ndsm_from_archive=True)
    with rasterio.open(jpeg) as src:
        decoded = src.read(1)
        tiles_band = _ImageBlocks(plan, POTSDAM, ("ndsm",), {NDSM: src}).read(Window(0, 0, width, height))[0]
    assert (decoded == 120).sum() > 1000
    assert np.all(tiles_band[decoded == 120] == np.float32(12.0))
    assert np.array_equal(tiles_band, ndsm_metres_from_grey(decoded))
    metres = _write_bands(tmp_path / "metres.tif", tiles_band[None])
    as_metres = _write_bands(tmp_path / "grey_as_metres.tif", decoded[None].astype(np.float32))

    out = tmp_path / "out"
    for source, units in ((jpeg, "isprs"), (metres, "tiles"), (as_metres, "tiles")):
        result = _predict(str(source), "-m", str(ndsm_checkpoint), "-o", str(out), "--units", units,
                          "--probabilities", "--no-preview")  # fmt: skip
        assert result.exit_code == 0, result.output
    with (
        rasterio.open(out / f"{jpeg.stem}_probabilities.tif") as isprs,
        rasterio.open(out / "metres_probabilities.tif") as tiles,
        rasterio.open(out / "grey_as_metres_probabilities.tif") as misread,
    ):
        assert np.array_equal(isprs.read(), tiles.read())
        assert not np.array_equal(isprs.read(), misread.read())


def test_the_help_lists_every_choice_of_the_engine_registries() -> None:
    """The options are plain text (the CLI does not import torch to start); the help must still
    name every key of the registries the engine checks them against."""
    from aerialseg.devices import DEVICE_CHOICES, INFERENCE_PRECISIONS
    from aerialseg.inference import BLENDS, TTA

    result = runner.invoke(app, ["predict", "--help"], terminal_width=200)
    text = " ".join(result.output.split())
    for key in [*TTA, *BLENDS, *DEVICE_CHOICES, *INFERENCE_PRECISIONS]:
        assert key in text, key


def test_a_choice_not_in_its_registry_is_one_line_naming_the_options(
    tmp_path: Path, checkpoint: Path
) -> None:
    source = _write(tmp_path / "scene.tif", _image(64, 64))
    result = _predict(str(source), "-m", str(checkpoint), "-o", str(tmp_path / "out"), "--blend", "hann")
    assert result.exit_code == 1
    assert "'hann' is not a window blending; choose one of: cosine, gaussian, uniform" in result.output
    assert not (tmp_path / "out").exists()
