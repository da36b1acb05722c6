"""Bad input through the real entry points ends in one line naming the file, what was found and
what was expected (issue 12, "Errors that say what happened").

Stages run as `dvc repro` runs them: `pipeline/<stage>.py` in a project folder with its own
params.yaml. Failures found before any work are run in this process (runpy: the script itself,
without importing torch again per case); the tracking-store cases run in a subprocess, whose
timeout guards against a hang.
"""

from __future__ import annotations

import logging
import os
import runpy
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import rasterio
import torch
import yaml
from typer.testing import CliRunner

from aerialseg.checkpoint import save_checkpoint
from aerialseg.classes import CLASSES
from aerialseg.cli import app
from aerialseg.config import SETTINGS_FILE, Params, split_settings
from aerialseg.model import build_model, model_args
from aerialseg.model_card import ModelCard
from aerialseg.patches import BandStats
from aerialseg.raster import GeoReference, write_raster

ROOT = Path(__file__).resolve().parents[1]
HINT = "(AERIALSEG_TRACEBACK=1 shows the traceback)"
AREA = 1
"""The synthetic area whose files the tiles cases damage (a training area)."""
NEVER = ("weights_only", "Traceback", "See previous exception")
"""Never in an error line: torch's advice to turn its safety check off, a traceback, rasterio's
"Read failed. See previous exception for details"."""


def truncate(path: Path, fraction: float = 0.6) -> Path:
    """Cut `path` to `fraction` of its bytes, as an interrupted download leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


def cut_pixel_data(path: Path) -> Path:
    """Rewrite the GeoTIFF `path` with its header first (as a COG has it; GDAL moves the header of
    a file whose metadata changed after its pixels to the end), then cut it to 60 %: the header
    is intact, the last blocks of pixels are gone."""
    with rasterio.open(path) as src:
        data, profile = src.read(), src.profile
    path.unlink()
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    truncate(path)
    with rasterio.open(path) as src:  # it opens; only reading its pixels fails
        assert src.count == data.shape[0]
    return path


def run_stage_script(stage: str, project: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any) -> str:
    """`python pipeline/<stage>.py` in `project`, in this process; returns its one error line."""
    monkeypatch.chdir(project)
    # Log handlers made in an earlier test (the tiles stage's basicConfig, Lightning's at import)
    # write to that test's captured stderr, closed since: drop what they say, not the error line.
    monkeypatch.setattr(logging.root, "handlers", [])
    monkeypatch.setattr(logging, "raiseExceptions", False)
    monkeypatch.delenv("AERIALSEG_TRACEBACK", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("TQDM_DISABLE", "1")
    script = ROOT / "pipeline" / f"{stage}.py"
    monkeypatch.setattr(sys, "argv", [str(script)])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        runpy.run_path(str(script), run_name="__main__")
    assert exited.value.code == 1
    return error_line(stage, capsys.readouterr().err)


def error_line(stage: str, stderr: str) -> str:
    """The stage's error (aerialseg.stage): `<stage>: <message>` and the hint, nothing else."""
    lines = stderr.strip().splitlines()
    assert lines[-1] == HINT, stderr[-3000:]
    assert lines[-2].startswith(f"{stage}: "), stderr[-3000:]
    line = lines[-2].removeprefix(f"{stage}: ")
    assert not any(word in stderr for word in NEVER), stderr[-3000:]
    return line


def write_params(project: Path, params: dict[str, Any]) -> Path:
    """params.yaml and settings.yaml (config.NOT_RESULTS) of `params` in `project`."""
    project.mkdir(parents=True, exist_ok=True)
    for name, part in zip(("params.yaml", SETTINGS_FILE), split_settings(params), strict=True):
        (project / name).write_text(yaml.safe_dump(part, sort_keys=False))
    return project


# --------------------------------------------------------------------------- the tiles stage


def tiles_project(tmp_path: Path, raw: Path) -> Path:
    return write_params(
        tmp_path / "project",
        {
            "paths": {"tiles": "tiles"},
            "data": {"source": "synthetic", "raw_dir": str(raw), "val_tiles": [3], "test_tiles": [4]},
        },
    )


@pytest.mark.parametrize(
    "member",
    [
        f"top/top_mosaic_09cm_area{AREA}.tif",
        f"dsm/dsm_09cm_matching_area{AREA}.tif",
        # Same base name as the orthophoto: only the folder tells them apart.
        f"gts_for_participants/top_mosaic_09cm_area{AREA}.tif",
    ],
    ids=["orthophoto", "dsm", "label"],
)
def test_tiles_names_a_raster_whose_pixel_data_is_cut(
    tmp_path: Path, raw_copy: Path, member: str, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    damaged = cut_pixel_data(raw_copy / member)
    line = run_stage_script("tiles", tiles_project(tmp_path, raw_copy), monkeypatch, capsys)
    assert line.startswith(f"{damaged}: pixel data cannot be read (truncated or corrupt file? "), line
    assert line.endswith("); download it again"), line
    assert "IReadBlock failed" in line or "TIFFRead" in line, line  # GDAL's own first line


def _rewrite_orthophoto(raw: Path, nodata: float | None) -> Path:
    path = raw / "top" / f"top_mosaic_09cm_area{AREA}.tif"
    with rasterio.open(path) as src:
        shape, georef = (src.count, src.height, src.width), GeoReference(src.crs, src.transform)
    return write_raster(path, np.zeros(shape, np.uint8), georef, band_names=["ir", "r", "g"], nodata=nodata)


@pytest.mark.parametrize(
    ("nodata", "found"),
    [(0, "every pixel is nodata (128 x 128 px, nodata value 0)"), (None, "every pixel is 0 in every band")],
    ids=["nodata-value", "all-zero"],
)
def test_tiles_refuses_an_orthophoto_without_image_data(
    tmp_path: Path,
    raw_copy: Path,
    nodata: float | None,
    found: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: Any,
) -> None:
    path = _rewrite_orthophoto(raw_copy, nodata)
    line = run_stage_script("tiles", tiles_project(tmp_path, raw_copy), monkeypatch, capsys)
    assert line.startswith(f"{path}: the orthophoto has no valid pixel: {found}"), line
    assert "expected image data" in line and "download it again" in line, line
    assert not (tmp_path / "project" / "tiles").exists()  # nothing half-written


@pytest.mark.parametrize("name", ["area1_image.tif", "area1_label.tif"])
def test_patches_names_a_tile_whose_pixel_data_is_cut(
    tmp_path: Path, synthetic_tiles: Path, name: str, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    tiles = Path(shutil.copytree(synthetic_tiles, tmp_path / "tiles"))
    damaged = cut_pixel_data(tiles / name)
    project = write_params(
        tmp_path / "project",
        {
            "paths": {"tiles": str(tiles), "patches": "patches"},
            "data": {"val_tiles": [3], "test_tiles": [4]},
            "patches": {"size_px": 64},
        },
    )
    line = run_stage_script("patches", project, monkeypatch, capsys)
    assert line.startswith(f"{damaged}: pixel data cannot be read (truncated or corrupt file? "), line
    assert line.endswith(
        "); rerun the `tiles` stage (`dvc repro tiles`, or `dvc checkout` for the stored one)"
    )


# --------------------------------------------------------------------------- the train stage


@pytest.fixture
def patches_copy(tmp_path: Path, patches_dir: Path) -> Path:
    """A private copy of the tiny patches that a test may damage."""
    return Path(shutil.copytree(patches_dir, tmp_path / "patches"))


def train_project(tmp_path: Path, small_params: Callable[..., Params], patches: Path, **train: Any) -> Path:
    """A project folder whose params.yaml trains `fcn_skip` on `patches` (`train` changes train.* keys)."""
    params = small_params(
        tmp_path,
        {
            "paths.patches": patches,
            "paths.models": "models",
            "paths.reports": "reports",
            "model.arch": "fcn_skip",
            **{f"train.{key}": value for key, value in train.items()},
        },
    )
    return write_params(tmp_path / "project", params.model_dump(mode="json"))


RERUN = "rerun the `patches` stage (`dvc repro patches`, or `dvc checkout` for the stored one)"


def _truncated_h5(path: Path) -> str:
    truncate(path)
    return f"{path}: truncated (an interrupted write or copy? "


def _garbage_h5(path: Path) -> str:
    path.write_bytes(np.random.default_rng(0).bytes(5000))
    return f"{path}: not an HDF5 file (5000 bytes without the HDF5 signature); {RERUN}"


def _no_attributes(path: Path) -> str:
    with h5py.File(path, "a") as h5:
        for name in list(h5.attrs):
            del h5.attrs[name]
    return f"{path}: missing attribute `size` (found none); expected a self-describing file"


def _val_without_bands(path: Path) -> str:
    path = path.with_name("val.h5")
    with h5py.File(path, "a") as h5:
        del h5.attrs["bands"]
    return f"{path}: missing attribute `bands` (found ["


@pytest.mark.parametrize(
    "damage",
    [_truncated_h5, _garbage_h5, _no_attributes, _val_without_bands],
    ids=["truncated", "not-hdf5", "no-attributes", "val-without-bands"],
)
def test_train_names_a_damaged_patch_file(
    tmp_path: Path,
    small_params: Callable[..., Params],
    patches_copy: Path,
    damage: Any,
    monkeypatch: pytest.MonkeyPatch,
    capsys: Any,
) -> None:
    expected = damage(patches_copy / "train.h5")
    line = run_stage_script("train", train_project(tmp_path, small_params, patches_copy), monkeypatch, capsys)
    assert line.startswith(expected), line
    assert line.endswith(RERUN), line


def _random_bytes(path: Path) -> str:
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    return "random bytes: neither a zip archive nor a pickle (4096 bytes)"


def _html_page(path: Path) -> str:
    path.write_text("<!DOCTYPE html>\n<html><head><title>Sign in</title></head><body>Sign in</body></html>\n")
    return "an HTML page, e.g. a login or error page saved instead of the file"


def _cut_torch_file(path: Path) -> str:
    encoder = build_model(model_args("fpn", "resnet18", 3, len(CLASSES))).encoder
    torch.save(encoder.state_dict(), path)
    truncate(path)
    return f"a truncated zip archive ({path.stat().st_size} bytes): an interrupted download or copy?"


def _pickled_model(path: Path) -> str:
    torch.save(torch.nn.Conv2d(3, 8, 3), path)
    return "a torch file holding objects other than tensors, e.g. a whole pickled model"


@pytest.mark.parametrize(
    "make",
    [_random_bytes, _html_page, _cut_torch_file, _pickled_model],
    ids=["random-bytes", "html-page", "cut-torch-file", "pickled-model"],
)
def test_train_names_pretrained_weights_that_are_not_a_weights_file(
    tmp_path: Path,
    small_params: Callable[..., Params],
    patches_dir: Path,
    make: Any,
    monkeypatch: pytest.MonkeyPatch,
    capsys: Any,
) -> None:
    weights = tmp_path / "encoder.pth"
    looks_like = make(weights)
    project = train_project(tmp_path, small_params, patches_dir, pretrained=str(weights))
    line = run_stage_script("train", project, monkeypatch, capsys)
    assert line == (
        f"train.pretrained: {weights} is not a PyTorch weights file ({looks_like}); expected a state "
        "dict saved with torch.save (see `aerialseg prefetch-weights`), `none` or `imagenet`"
    )


# --------------------------------------------------------------------------- aerialseg predict

BANDS = ["ir", "r", "g", "dsm"]
runner = CliRunner()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    args = model_args("fcn_skip", "resnet18", len(BANDS), len(CLASSES))
    path = tmp_path_factory.mktemp("models") / "model.ckpt"
    stats = BandStats((0.4, 0.3, 0.3, 2.0), (0.2, 0.2, 0.2, 3.0))
    card = ModelCard.for_training(args, bands=BANDS, mean=stats.mean, std=stats.std, window=64)
    save_checkpoint(path, build_model(args), card)
    return path


def _predict(*args: str) -> Any:
    return runner.invoke(app, ["predict", *args, "--no-progress"])


def _one_error_line(result: Any) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and "weights_only" not in result.output, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0].removeprefix("error: ")


def test_predict_names_an_input_whose_pixel_data_is_cut(tmp_path: Path, checkpoint: Path) -> None:
    image = np.random.default_rng(0).uniform(0, 1, (4, 512, 512)).astype(np.float32)
    georef = GeoReference(rasterio.crs.CRS.from_epsg(32632), rasterio.Affine(0.09, 0, 0, 0, -0.09, 0))
    source = truncate(write_raster(tmp_path / "cut.tif", image, georef))  # tiled, 256 px blocks
    out = tmp_path / "out"
    line = _one_error_line(_predict(str(source), "-m", str(checkpoint), "-o", str(out)))
    assert line.startswith(f"{source}: pixel data cannot be read ("), line
    assert "truncated or corrupt file? " in line and "download or copy it again" in line, line
    assert "expected a GeoTIFF with 4 bands (ir, r, g, dsm, in that order)" in line, line
    assert not out.exists() or not any(out.iterdir())


EXPECTED_CHECKPOINT = (
    "expected an aerialseg checkpoint (format 'aerialseg-checkpoint/1', a model.ckpt written by the "
    "`train` stage), or an MLflow model URI (runs:/<run id>/model, models:/<name>@<alias>)"
)


def _ckpt_random_bytes(path: Path, checkpoint: Path) -> str:
    return f"not a readable checkpoint ({_random_bytes(path)})"


def _ckpt_html_page(path: Path, checkpoint: Path) -> str:
    return f"not a readable checkpoint ({_html_page(path)})"


def _cut_checkpoint(path: Path, checkpoint: Path) -> str:
    path.write_bytes(checkpoint.read_bytes())
    truncate(path)
    cut = f"a truncated zip archive ({path.stat().st_size} bytes): an interrupted download or copy?"
    return f"not a readable checkpoint ({cut})"


def _plain_state_dict(path: Path, checkpoint: Path) -> str:
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    torch.save(state, path)
    return f"a plain state dict ({len(state)} tensors) without aerialseg's metadata (bands, normalisation)"


@pytest.mark.parametrize(
    "make",
    [_ckpt_random_bytes, _ckpt_html_page, _cut_checkpoint, _plain_state_dict],
    ids=["random-bytes", "html-page", "truncated-checkpoint", "plain-state-dict"],
)
def test_predict_names_a_model_file_that_is_not_a_checkpoint(
    tmp_path: Path, checkpoint: Path, make: Any
) -> None:
    model = tmp_path / "model.ckpt"
    found = make(model, checkpoint)
    image = write_raster(
        tmp_path / "in.tif",
        np.zeros((4, 64, 64), np.float32),
        GeoReference(rasterio.crs.CRS.from_epsg(32632), rasterio.Affine(0.09, 0, 0, 0, -0.09, 0)),
    )
    line = _one_error_line(_predict(str(image), "-m", str(model), "-o", str(tmp_path / "out")))
    assert line == f"{model}: {found}; {EXPECTED_CHECKPOINT}"


# --------------------------------------------------------------------------- the tracking store

PROBE_TIMEOUT = 5


class _NotFound(BaseHTTPRequestHandler):
    """Any web server that is not MLflow: 404 for everything."""

    def do_GET(self) -> None:
        self.send_error(404)

    do_POST = do_GET

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def not_mlflow() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def silent() -> Iterator[str]:
    """Accepts connections and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()


@pytest.fixture
def refused() -> str:
    """A port nothing listens on."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return f"http://127.0.0.1:{port}"


def run_stage_subprocess(stage: str, project: Path, uri: str) -> str:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT / "src"),
        "TQDM_DISABLE": "1",
        "MLFLOW_TRACKING_URI": uri,
        "AERIALSEG_TRACKING_TIMEOUT": str(PROBE_TIMEOUT),
    }
    env.pop("AERIALSEG_TRACEBACK", None)
    # The timeout only guards against a hang: the probe itself must give up after PROBE_TIMEOUT s.
    result = subprocess.run(
        [sys.executable, str(ROOT / "pipeline" / f"{stage}.py")],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-3000:]
    return error_line(stage, result.stderr)


TAIL = (
    "; expected a running MLflow tracking server there (or unset MLFLOW_TRACKING_URI for the "
    "project's own store, mlflow.db); AERIALSEG_TRACKING_TIMEOUT sets how long to wait "
    f"(now {PROBE_TIMEOUT} s)"
)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("server", "problem"),
    [
        (
            "not_mlflow",
            "the server answered 404 Not Found (text/html) to POST /api/2.0/mlflow/experiments/search: "
            "not an MLflow tracking server (check the host, port and path prefix)",
        ),
        ("silent", f"no answer within {PROBE_TIMEOUT} s (POST /api/2.0/mlflow/experiments/search)"),
        ("refused", "cannot connect ([Errno 111] Connection refused)"),
    ],
    ids=["answers-404", "never-answers", "refused"],
)
def test_train_fails_fast_on_a_tracking_store_it_cannot_use(
    tmp_path: Path,
    small_params: Callable[..., Params],
    patches_dir: Path,
    server: str,
    problem: str,
    request: pytest.FixtureRequest,
) -> None:
    uri = request.getfixturevalue(server)
    line = run_stage_subprocess("train", train_project(tmp_path, small_params, patches_dir), uri)
    assert line == f"MLFLOW_TRACKING_URI={uri}: {problem}{TAIL}"
    assert not (tmp_path / "project" / "models").exists()  # checked before any work


@pytest.mark.slow
def test_evaluate_fails_fast_on_a_server_that_is_not_mlflow(tmp_path: Path, not_mlflow: str) -> None:
    project = write_params(tmp_path / "project", {"data": {"val_tiles": [3], "test_tiles": [4]}})
    line = run_stage_subprocess("evaluate", project, not_mlflow)
    assert line.startswith(f"MLFLOW_TRACKING_URI={not_mlflow}: the server answered 404 Not Found"), line
    assert line.endswith(TAIL), line


def test_the_probe_passes_an_mlflow_answer_and_bounds_a_silent_server(
    silent: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In process: an MLflow-like JSON answer passes; a silent server fails after the timeout."""
    from aerialseg.tracking import TrackingStoreError, check_tracking_store

    class _MLflowLike(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = b'{"experiments": []}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), _MLflowLike)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("AERIALSEG_TRACKING_TIMEOUT", "1")
    # check_tracking_store sets MLflow's request timeout to its own when unset, for the stage's
    # process; set here so that it is undone after the test, not left at 1 s for later tests.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")
    try:
        check_tracking_store(f"http://127.0.0.1:{server.server_port}/")
    finally:
        server.shutdown()
        server.server_close()
    check_tracking_store("sqlite:///nowhere/mlflow.db")  # local stores are not probed
    with pytest.raises(TrackingStoreError, match=r"no answer within 1 s"):
        check_tracking_store(silent)
    monkeypatch.setenv("AERIALSEG_TRACKING_TIMEOUT", "soon")
    with pytest.raises(ValueError, match=r"AERIALSEG_TRACKING_TIMEOUT='soon': expected a number of seconds"):
        check_tracking_store(silent)
