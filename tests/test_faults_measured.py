"""What `make faults` (benchmarks/faults.py) found when issue 12 was measured again, each kind through
a real entry point (`python pipeline/<stage>.py` in a copy of the project, or a script run by
`aerialseg.stage.run_stage` as every stage is).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from project_copy import TINY, copy_project, project_env, run, set_params

from aerialseg.files import temp_name

HINT = "(AERIALSEG_TRACEBACK=1 shows the traceback)"


@pytest.fixture(scope="module")
def patched(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny project whose scenes, tiles and patches are built by the stage scripts. Tests that
    damage a file put it back."""
    project = copy_project(tmp_path_factory.mktemp("measured") / "project", TINY)
    for stage in ("scenes", "tiles", "patches"):
        run(project, "python", f"pipeline/{stage}.py")
    return project


def error_line(project: Path, stage: str, **env: str) -> str:
    """`python pipeline/<stage>.py` must fail with `<stage>: <one line>` and the hint, no traceback."""
    result = run(project, "python", f"pipeline/{stage}.py", env=project_env(project, **env), check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, result.stderr[-3000:]
    assert lines[-1] == HINT, result.stderr[-3000:]
    assert lines[-2].startswith(f"{stage}: "), result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    return lines[-2]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_missing_orthophoto_stops_tiles_instead_of_dropping_the_tile(patched: Path) -> None:
    # Before: area 1's label, DSM and eroded label without its orthophoto were skipped, and
    # `train_tiles: null` ("all the others") silently trained on one tile less.
    top = patched / "data/raw/synthetic/top/top_mosaic_09cm_area1.tif"
    kept = top.read_bytes()
    top.unlink()
    try:
        line = error_line(patched, "tiles")
    finally:
        top.write_bytes(kept)
    assert "area1" in line and "no orthophoto" in line and "top_mosaic_09cm_area1.tif" in line


@pytest.mark.parametrize(
    ("damage", "named"),
    [
        (lambda text: text.replace(",train,", ",trian,", 1), "split 'trian'"),  # before: the tile dropped
        (lambda text: "<!DOCTYPE html><html></html>\n", "missing column"),  # before: "patches: 'split'"
    ],
    ids=["misspelt-split", "html-page"],
)
def test_a_damaged_tile_table_stops_patches_naming_it(
    patched: Path, damage: Callable[[str], str], named: str
) -> None:
    table = patched / "data/tiles/tiles.csv"
    kept = table.read_text()
    table.write_text(damage(kept))
    try:
        line = error_line(patched, "patches")
    finally:
        table.write_text(kept)
    assert "data/tiles/tiles.csv" in line and named in line


def test_train_names_a_patch_file_whose_structure_is_garbled(patched: Path) -> None:
    # Before: "train: RuntimeError: Object visitation failed (wrong B-tree signature)", no file.
    h5 = patched / "data/patches/train.h5"
    kept = h5.read_bytes()
    assert b"TREE" in kept  # the signature of the group's B-tree node (HDF5 file format, III.A.1)
    h5.write_bytes(kept.replace(b"TREE", b"EERT", 1))
    try:
        line = error_line(patched, "train")
    finally:
        h5.write_bytes(kept)
    assert "data/patches/train.h5" in line and "rerun the `patches` stage" in line


def test_train_refuses_patches_written_for_other_params(patched: Path) -> None:
    # Before: run by hand after an edit of data.bands, train trained on the old 4-band patches and
    # logged the new 3 bands.
    params = patched / "params.yaml"
    kept = params.read_text()
    set_params(patched, {"data": {"bands": ["ir", "r", "g"]}})
    try:
        line = error_line(patched, "train")
    finally:
        params.write_text(kept)
    assert "data/patches/train.h5" in line and "data.bands" in line


def test_a_stage_removes_dead_leftovers_of_every_output_folder_and_of_tmpdir(tmp_path: Path) -> None:
    # Before: when `dvc repro` restored a killed stage's outputs from the run cache, no stage wrote
    # into that folder again and a SIGKILLed run's temporary files stayed; MLflow's and Lightning's
    # temporary folders of a SIGKILLed stage stayed in $TMPDIR.
    project = copy_project(
        tmp_path / "project", TINY, names=("pipeline", "src", "params.yaml", "settings.yaml")
    )
    lock = {"schema": "2.0", "stages": {"scenes": {"outs": [{"path": "data/raw/synthetic"}]}}}
    (project / "dvc.lock").write_text(yaml.safe_dump(lock))
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    dead = _dead_pid()
    leftovers = [temp_name(project / "data/raw/synthetic", dead), temp_name(tmpdir / "aerialseg", dead)]
    alive = temp_name(project / "data/raw/synthetic", os.getpid())
    for folder in (*leftovers, alive):
        (folder / "part").mkdir(parents=True)
        os.utime(folder, (0, 0))
    run(project, "python", "pipeline/check_params.py", env=project_env(project, TMPDIR=str(tmpdir)))
    assert [p for p in leftovers if p.exists()] == []
    assert alive.exists()  # a live process's file is never touched
    assert list(tmpdir.iterdir()) == []  # the stage's own $TMPDIR folder went at its exit


def test_a_stage_called_again_in_process_keeps_one_short_tmpdir(tmp_path: Path) -> None:
    # Before: each in-process stage (tests run scripts with runpy) nested its $TMPDIR folder in
    # the previous one; multiprocessing's socket folder followed, past AF_UNIX's 107-byte limit, a
    # loader worker could not hand over its batch and the training waited forever.
    script = tmp_path / "twice.py"
    script.write_text(
        "import multiprocessing.util, tempfile\n"
        "from aerialseg.stage import clean_project_leftovers\n"
        "clean_project_leftovers()\n"
        "first = tempfile.gettempdir()\n"
        "clean_project_leftovers()\n"
        "print(first, tempfile.gettempdir(), multiprocessing.util.get_temp_dir())\n"
    )
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env={**os.environ, "TMPDIR": str(tmp_path)},
        capture_output=True,
        text=True,
        check=True,
    )
    first, second, sockets = (Path(p) for p in done.stdout.split())
    assert first == second and first.parent == tmp_path
    assert sockets.parent == tmp_path  # multiprocessing's folder stays in the base, not in ours


def test_an_error_in_a_loader_worker_is_one_line(tmp_path: Path) -> None:
    # Before: torch re-raises a worker's error with the worker's traceback in its message, so the
    # stage's "one line" was a dozen.
    script = tmp_path / "worker_stage.py"
    script.write_text(
        "import torch.utils.data as data\n"
        "from aerialseg.patches import PatchFileError\n"
        "from aerialseg.stage import run_stage\n"
        "class Damaged(data.Dataset):\n"
        "    def __len__(self): return 2\n"
        "    def __getitem__(self, i): raise PatchFileError('data/patches/train.h5: data cannot be read')\n"
        "def main(): next(iter(data.DataLoader(Damaged(), num_workers=1)))\n"
        "if __name__ == '__main__': run_stage(main)\n"
    )
    result = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1
    assert lines[-2:] == ["worker_stage: data/patches/train.h5: data cannot be read", HINT], result.stderr
    assert "Traceback" not in result.stderr


def test_the_params_stage_refuses_zero_devices(tmp_path: Path) -> None:
    # Before: `train.devices: 0` passed the params check and reached Lightning.
    project = copy_project(
        tmp_path / "project", TINY, names=("pipeline", "src", "params.yaml", "settings.yaml")
    )
    set_params(project, {"train": {"devices": 0}})
    result = run(project, "python", "pipeline/check_params.py", check=False)
    assert result.returncode == 1
    assert "  train.devices: Value error, expected a number of devices >= 1, or auto (got 0)" in result.stderr
    assert "Traceback" not in result.stderr


def test_evaluate_names_a_garbled_run_reference(patched: Path) -> None:
    # Before: "evaluate: Expecting value: line 1 column 1 (char 0)", no file.
    ref = patched / "models/mlflow_run.json"
    ref.parent.mkdir(parents=True, exist_ok=True)
    ref.write_text("<!DOCTYPE html><html></html>\n")
    try:
        line = error_line(patched, "evaluate")
    finally:
        ref.unlink()
    assert "models/mlflow_run.json: not an MLflow run reference" in line


def test_train_names_pretrained_weights_without_convolutions(patched: Path) -> None:
    # Before: "train.pretrained: the weights file has no convolution filters", without the file.
    import torch

    weights = patched / "weights.pth"
    torch.save({"not_an_encoder.weight": torch.zeros(3)}, weights)
    params = patched / "params.yaml"
    kept = params.read_text()
    set_params(patched, {"train": {"pretrained": "weights.pth"}})
    try:
        line = error_line(patched, "train")
    finally:
        params.write_text(kept)
        weights.unlink()
    assert "train.pretrained: weights.pth has no convolution filters" in line
