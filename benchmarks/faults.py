"""`make faults`: issue 12's measurement, run again as a whole on a tiny copy of the project.

Four parts, each row a real entry point (`dvc repro`, `dvc exp run`, `python pipeline/<stage>.py`,
`aerialseg ...`) in a copy of the project (tests/project_copy.py's TINY, 256 px scenes) with its
own DVC cache, MLflow store (`mlflow.db`) and `$TMPDIR`:

- **kills**: a stage is started with `dvc repro -f -s <stage>` and, at a point named in the row
  (a time after the stage's process appeared, or the moment a temporary output or checkpoint
  appears), SIGKILL, SIGTERM or SIGINT goes to the stage's process or to the `dvc` process alone.
  Then `dvc repro` must succeed and leave: a clean `dvc status`, no temporary file in the project
  (`.<name>.tmp-<pid>-<host>`, checkpoint copies), nothing in `$TMPDIR`, no process of the copy,
  no RUNNING MLflow run, no PENDING model version, and the alias on a FINISHED, evaluated run.
- **inputs**: bad params (values, keys, sections, YAML), damaged GeoTIFFs, HDF5 patch files,
  torch files, tracking URIs. Each must fail with one line naming the file or key (a params error:
  one line per key), with no traceback; with `AERIALSEG_TRACEBACK=1`, the traceback.
- **concurrent**: two `dvc exp run` at once; no experiment may record params other than those its
  MLflow run trained with; then the supported way, two queued experiments run with `-j 2`.
- **hang**: a tracking server that accepts connections and never answers; `train` and
  `aerialseg leaderboard` must stop within `AERIALSEG_TRACKING_TIMEOUT` (30 s) plus start-up.

Writes reports/faults.md (the table, with each row's command) and reports/faults.json, and exits
with 1 when any row failed. Not part of `make test` (19 min on 2 shared CPU cores).

    python benchmarks/faults.py                       # everything
    python benchmarks/faults.py --parts inputs --only train.h5   # rows whose name contains it
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))
from project_copy import COPIED, IGNORED, TINY, project_env  # noqa: E402

HINT = "(AERIALSEG_TRACEBACK=1 shows the traceback)"
TRACEBACK_MARKS = ("Traceback (most recent call last)", "weights_only", "See previous exception")
"""Never in the output of a bad input: a traceback, torch's advice to turn its safety check off,
rasterio's "Read failed. See previous exception for details"."""
SETTINGS = ("train.num_workers", "train.resume", "tracking")
"""The keys that live in settings.yaml once the copy's config.py has one (config.NOT_RESULTS)."""
TEMP_NAME = re.compile(r"\.tmp-\d+|\.tmp$|^tmp[a-z0-9_]{6,}$")
"""Temporary names: atomic_path's `.<stem>.tmp-<pid>-<host>`, Lightning's `*.tmp`, tempfile's."""
CHECKPOINT_FILES = {"last.ckpt", "best.ckpt", "fingerprint.json", "mlflow_run.json"}
SCENE_SIZE_PX = 256
"""Scenes larger than TINY's 128 px, so that tiles and patches last long enough to be hit mid-write."""


@dataclass
class Row:
    part: str
    case: str
    command: str
    ok: bool
    detail: str
    seconds: float


@dataclass
class Project:
    path: Path
    tmp: Path
    new_layout: bool
    env: dict[str, str] = field(default_factory=dict)

    def run(
        self, *args: str, timeout: float = 900, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(
                args,
                cwd=self.path,
                env={**self.env, **(env or {})},
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired as err:
            out = (err.stdout or b"").decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
            return subprocess.CompletedProcess(args, -9, out, f"TIMEOUT after {timeout:.0f} s")

    def configure(self, values: dict[str, Any]) -> None:
        """Set dotted keys: the settings in settings.yaml (new layout), the rest in params.yaml."""
        for file in ("params.yaml", "settings.yaml"):
            path = self.path / file
            tree = yaml.safe_load(path.read_text()) if path.exists() else {}
            tree = tree or {}
            changed = False
            for key, value in values.items():
                is_setting = any(key == s or key.startswith(f"{s}.") for s in SETTINGS)
                if (file == "settings.yaml") != (is_setting and self.new_layout):
                    continue
                section, _, name = key.partition(".")
                tree.setdefault(section, {})[name] = value
                changed = True
            if changed:
                path.write_text(yaml.safe_dump(tree, sort_keys=False))


# --------------------------------------------------------------------------- the copy


def make_project(workdir: Path, git_ref: str | None) -> Project:
    dest = workdir / "project"
    dest.mkdir(parents=True)
    names = list(dict.fromkeys([*COPIED, "settings.yaml", "presets"]))  # presets: `aerialseg preset`
    if git_ref is not None:
        listed = subprocess.run(
            ["git", "-C", str(ROOT), "ls-tree", "--name-only", git_ref, *names],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", "--format=tar", git_ref, *listed],
            capture_output=True,
            check=True,
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    else:
        for name in names:
            src, dst = ROOT / name, dest / name
            if not src.exists():
                continue
            dst.parent.mkdir(parents=True, exist_ok=True)
            if src.is_dir():
                shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*IGNORED))
            else:
                shutil.copy2(src, dst)
    tmp = workdir / "tmp"
    tmp.mkdir()
    new_layout = "SETTINGS_FILE" in (dest / "src/aerialseg/config.py").read_text()
    project = Project(dest, tmp, new_layout)
    project.env = project_env(dest, TMPDIR=str(tmp), TQDM_DISABLE="1", PYTHONUNBUFFERED="1")
    project.env.pop("AERIALSEG_TRACEBACK", None)
    tiny = {f"{s}.{k}": v for s, values in TINY.items() for k, v in values.items()}
    project.configure({**tiny, "synthetic.size_px": SCENE_SIZE_PX, "train.resume": False})
    for cmd in (
        ["git", "init", "-q"],
        ["git", "add", "-A"],
        ["git", "-c", "user.name=faults", "-c", "user.email=faults@example.org", "commit", "-qm", "tiny"],
    ):
        subprocess.run(cmd, cwd=dest, check=True)
    return project


def reuse_project(workdir: Path) -> Project:
    dest = workdir / "project"
    new_layout = "SETTINGS_FILE" in (dest / "src/aerialseg/config.py").read_text()
    project = Project(dest, workdir / "tmp", new_layout)
    project.env = project_env(dest, TMPDIR=str(project.tmp), TQDM_DISABLE="1", PYTHONUNBUFFERED="1")
    project.env.pop("AERIALSEG_TRACEBACK", None)
    return project


def commit(project: Project, message: str) -> None:
    subprocess.run(["git", "add", "-A"], cwd=project.path, check=True)
    subprocess.run(
        ["git", "-c", "user.name=faults", "-c", "user.email=faults@example.org", "commit", "-qm", message],
        cwd=project.path,
        check=False,
        capture_output=True,
    )


# --------------------------------------------------------------------------- processes


def processes_in(project: Path) -> list[int]:
    """Pids of the processes whose working directory is the copy (not this one)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if Path(os.readlink(entry / "cwd")) == project:
                stat = (entry / "stat").read_text()
                if stat[stat.rfind(")") + 2] != "Z":
                    found.append(int(entry.name))
        except OSError:
            continue
    return found


def stage_pid(project: Path, stage: str) -> int | None:
    script = f"pipeline/{'check_params' if stage == 'params' else stage}.py".encode()
    for pid in processes_in(project):
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(arg.endswith(script) for arg in args) and b"python" in args[0]:
            return pid
    return None


def wait_gone(project: Path, seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        left = processes_in(project)
        if not left:
            return []
        time.sleep(0.2)
    left = processes_in(project)
    for pid in left:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    return left


# --------------------------------------------------------------------------- the checks after a run


def leftovers(project: Project) -> list[str]:
    """Temporary files in the copy (not .git, .dvc) and anything in its $TMPDIR."""
    found = []
    for dirpath, dirnames, filenames in os.walk(project.path):
        rel = Path(dirpath).relative_to(project.path)
        if rel.parts[:1] in ((".git",), (".dvc",)):
            dirnames[:] = []
            continue
        for name in [*dirnames, *filenames]:
            if TEMP_NAME.search(name):
                found.append(str(rel / name))
        if rel == Path("models/checkpoints"):
            found += [f"{rel}/{n}" for n in filenames if n not in CHECKPOINT_FILES]
    # torch's compile cache (torchinductor_<user>) is a cache every run shares, not a leftover.
    found += [f"$TMPDIR/{p.name}" for p in project.tmp.iterdir() if not p.name.startswith("torchinductor_")]
    return sorted(found)


def store_problems(project: Project) -> list[str]:
    """RUNNING runs, PENDING model versions, an alias on a run that is not FINISHED and evaluated."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(f"sqlite:///{project.path / 'mlflow.db'}")
    problems = []
    experiments = [e.experiment_id for e in client.search_experiments()]
    for run in client.search_runs(experiments, run_view_type=3, max_results=5000):
        if run.info.status == "RUNNING":
            problems.append(f"run {run.info.run_id[:8]} RUNNING")
    params = yaml.safe_load((project.path / "params.yaml").read_text())
    settings_file = project.path / "settings.yaml"
    settings = yaml.safe_load(settings_file.read_text()) if settings_file.exists() else {}
    tracking = {**(params.get("tracking") or {}), **((settings or {}).get("tracking") or {})}
    name, alias = tracking.get("registered_model", "aerialseg"), tracking.get("alias", "candidate")
    for version in client.search_model_versions(f"name='{name}'"):
        if version.status == "PENDING_REGISTRATION":
            problems.append(f"model version {version.version} PENDING")
    if name and alias:
        try:
            version = client.get_model_version_by_alias(name, alias)
        except MlflowException:
            return problems  # no alias yet
        run = client.get_run(str(version.run_id))
        tested = any(k.startswith("test_") for k in run.data.metrics)
        if run.info.status != "FINISHED" or not tested:
            problems.append(
                f"alias {alias} on version {version.version}, run {run.info.status}"
                f"{'' if tested else ', not evaluated'}"
            )
    return problems


def pipeline_clean(project: Project) -> list[str]:
    status = project.run("dvc", "status", timeout=300)
    if status.returncode != 0 or "up to date" not in status.stdout:
        return [f"dvc status: {(status.stdout + status.stderr).strip()[-300:]}"]
    return []


# --------------------------------------------------------------------------- part 1: kills


@dataclass(frozen=True)
class Kill:
    stage: str
    signal: signal.Signals
    target: str  # "stage" or "dvc"
    at: str  # "start+<s>" or a glob below the project, "+<s>" after it appears
    resume: bool = False
    fresh_checkpoints: bool = False

    @property
    def name(self) -> str:
        resume = ", resume" if self.resume else ""
        return f"{self.stage}: {self.signal.name} to {self.target} at {self.at}{resume}"


S = signal.Signals
KILLS = [
    Kill("params", S.SIGKILL, "stage", "start+0.3"),
    Kill("params", S.SIGTERM, "dvc", "start+0.3"),
    Kill("scenes", S.SIGINT, "stage", "start+0.8"),
    Kill("scenes", S.SIGKILL, "stage", "data/raw/.synthetic.tmp-*"),
    Kill("scenes", S.SIGTERM, "dvc", "data/raw/.synthetic.tmp-*"),
    Kill("tiles", S.SIGKILL, "stage", "data/.tiles.tmp-*/area2_image.tif"),
    Kill("tiles", S.SIGTERM, "stage", "data/.tiles.tmp-*"),
    Kill("tiles", S.SIGINT, "stage", "data/.tiles.tmp-*/area3*"),
    Kill("tiles", S.SIGKILL, "dvc", "data/.tiles.tmp-*"),
    Kill("patches", S.SIGKILL, "stage", "data/patches/.train.tmp-*"),
    Kill("patches", S.SIGTERM, "stage", "data/patches/train.h5"),
    Kill("patches", S.SIGINT, "stage", "start+1.0"),
    Kill("patches", S.SIGTERM, "dvc", "data/patches/.train.tmp-*"),
    Kill("train", S.SIGKILL, "stage", "start+3"),
    Kill("train", S.SIGKILL, "stage", "models/checkpoints/.last.tmp-*", fresh_checkpoints=True),
    Kill("train", S.SIGTERM, "stage", "models/checkpoints/.best.tmp-*", fresh_checkpoints=True),
    Kill("train", S.SIGKILL, "stage", "models/checkpoints/last.ckpt+0.5", True, True),
    Kill("train", S.SIGTERM, "dvc", "models/checkpoints/last.ckpt+0.5", True, True),
    Kill("train", S.SIGINT, "stage", "models/checkpoints/last.ckpt+0.2", True, True),
    Kill("train", S.SIGKILL, "dvc", "models/.model.tmp-*", True, True),
    Kill("train", S.SIGKILL, "stage", "models/.model.tmp-*"),
    Kill("evaluate", S.SIGKILL, "stage", "reports/.predictions.tmp-*"),
    Kill("evaluate", S.SIGTERM, "stage", "start+4"),
    Kill("evaluate", S.SIGINT, "stage", "reports/.predictions.tmp-*"),
    Kill("evaluate", S.SIGKILL, "dvc", "start+4"),
    Kill("evaluate", S.SIGTERM, "dvc", "reports/.overlays.tmp-*/*"),
]


def _reached(project: Path, at: str, seen: float) -> bool:
    where, _, delay = at.partition("+")
    if where == "start":
        return time.monotonic() - seen >= float(delay)
    return any(project.glob(where))


def run_kill(project: Project, kill: Kill) -> Row:
    start = time.monotonic()
    command = f"dvc repro -f -s {kill.stage}; {kill.signal.name} -> {kill.target}; dvc repro"
    problems: list[str] = []
    project.configure({"train.resume": kill.resume})
    if kill.fresh_checkpoints:
        shutil.rmtree(project.path / "models/checkpoints", ignore_errors=True)
    log = project.tmp.parent / "kill.log"
    with log.open("w") as out:
        dvc = subprocess.Popen(
            ["dvc", "repro", "-f", "-s", kill.stage],
            cwd=project.path,
            env=project.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        seen: float | None = None
        hit = False
        deadline = time.monotonic() + 300
        while dvc.poll() is None and time.monotonic() < deadline:
            pid = stage_pid(project.path, kill.stage)
            if pid is not None and seen is None:
                seen = time.monotonic()
            if seen is not None and pid is not None and _reached(project.path, kill.at, seen):
                if not kill.at.startswith("start") and "+" in kill.at:
                    time.sleep(float(kill.at.rpartition("+")[2]))
                target = dvc.pid if kill.target == "dvc" else pid
                with contextlib.suppress(ProcessLookupError):
                    os.kill(target, kill.signal)
                hit = True
                break
            time.sleep(0.01)
        try:
            dvc.wait(timeout=180)
        except subprocess.TimeoutExpired:
            problems.append("dvc did not end within 180 s of the signal")
            dvc.kill()
    if not hit:
        problems.append(f"point not reached (dvc exit {dvc.returncode}): {log.read_text()[-300:]!r}")
    left = wait_gone(project.path, 90)
    if left:
        problems.append(f"processes still running 90 s after the kill: {left}")
    project.configure({"train.resume": False})
    recovery = project.run("dvc", "repro", timeout=900)
    if recovery.returncode != 0:
        problems.append(f"dvc repro failed: {(recovery.stdout + recovery.stderr).strip()[-400:]}")
    wait_gone(project.path, 30)
    problems += pipeline_clean(project)
    notes = []
    if leftovers(project) and not re.search(r"^Running stage", recovery.stdout, re.M):
        # DVC restored every output from its run cache: no stage ran that could remove a SIGKILLed
        # run's temporary files. The project's promise: the next run of any stage removes them.
        project.run("dvc", "repro", "-f", "-s", "params", timeout=300)
        notes.append("dvc repro ran no stage (run cache); leftovers removed by the next stage run")
    problems += [f"leftover {p}" for p in leftovers(project)]
    problems += store_problems(project)
    if problems:
        cleanup(project)
    detail = "; ".join(problems or notes)
    return Row("kills", kill.name, command, not problems, detail, time.monotonic() - start)


def cleanup(project: Project) -> None:
    """After a failing row: remove leftovers so the next row starts clean."""
    for p in project.tmp.iterdir():
        if p.name.startswith("torchinductor_"):
            continue
        shutil.rmtree(p) if p.is_dir() else p.unlink()


# --------------------------------------------------------------------------- part 2: bad input


@dataclass
class Bad:
    name: str
    command: list[str]  # run in the copy
    expect: list[str]  # each must be in the error line(s)
    prepare: Callable[[Project, Backup], None] = lambda project, backup: None
    env: dict[str, str] = field(default_factory=dict)
    traceback: bool = False  # AERIALSEG_TRACEBACK=1: the traceback is expected


class Backup:
    """Copies of the files a case damages, put back afterwards."""

    def __init__(self, project: Project) -> None:
        self.project = project
        self.saved: dict[Path, bytes | None] = {}

    def path(self, rel: str) -> Path:
        path = self.project.path / rel
        if path not in self.saved:
            self.saved[path] = path.read_bytes() if path.exists() else None
        return path

    def restore(self) -> None:
        for path, data in self.saved.items():
            if data is None:
                path.unlink(missing_ok=True)
            else:
                path.write_bytes(data)
        self.saved.clear()


def edit_yaml(rel: str, change: Callable[[dict[str, Any]], None]) -> Callable[[Project, Backup], None]:
    def prepare(project: Project, backup: Backup) -> None:
        path = backup.path(rel)
        tree = yaml.safe_load(path.read_text()) if path.exists() else {}
        tree = tree or {}
        change(tree)
        path.write_text(yaml.safe_dump(tree, sort_keys=False))

    return prepare


def param(key: str, value: Any) -> Callable[[Project, Backup], None]:
    def prepare(project: Project, backup: Backup) -> None:
        is_setting = any(key == s or key.startswith(f"{s}.") for s in SETTINGS)
        rel = "settings.yaml" if is_setting and project.new_layout else "params.yaml"

        def change(tree: dict[str, Any]) -> None:
            section, _, name = key.partition(".")
            if name:
                tree.setdefault(section, {})[name] = value
            else:
                tree[section] = value

        edit_yaml(rel, change)(project, backup)

    return prepare


def text_edit(rel: str, change: Callable[[str], str]) -> Callable[[Project, Backup], None]:
    def prepare(project: Project, backup: Backup) -> None:
        path = backup.path(rel)
        path.write_text(change(path.read_text()))

    return prepare


def damage(rel: str, how: str) -> Callable[[Project, Backup], None]:
    """Damage a file: `truncate` (60 %), `head` (first 1 KB), `empty`, `garble` (random bytes over
    its middle third), `html` (an error page), `random`, `delete`, `pixels` (a GeoTIFF rewritten
    with its header first, then cut: the header opens, the pixels do not), `nodata` (a GeoTIFF
    whose every pixel is 0), `bands2` (a GeoTIFF with 2 of its bands), `size` (a GeoTIFF 16 px
    larger each way), `colour` (a label with a colour off the legend)."""

    def prepare(project: Project, backup: Backup) -> None:
        path = backup.path(rel)
        data = path.read_bytes() if path.exists() else b""
        if how == "truncate":
            path.write_bytes(data[: int(len(data) * 0.6)])
        elif how == "head":
            path.write_bytes(data[:1024])
        elif how == "empty":
            path.write_bytes(b"")
        elif how == "garble":
            third = len(data) // 3
            path.write_bytes(data[:third] + random.Random(0).randbytes(third) + data[2 * third :])
        elif how == "html":
            path.write_text("<!DOCTYPE html><html><head><title>Sign in</title></head><body></body></html>\n")
        elif how == "random":
            path.write_bytes(random.Random(1).randbytes(4096))
        elif how == "delete":
            path.unlink()
        else:
            rewrite_raster(path, how)

    return prepare


def rewrite_raster(path: Path, how: str) -> None:
    import numpy as np
    import rasterio

    with rasterio.open(path) as src:
        data, profile = src.read(), dict(src.profile)
    if how == "nodata":
        data[:] = 0
        profile["nodata"] = 0
    elif how == "bands2":
        data = data[:2]
        profile["count"] = 2
        profile.pop("photometric", None)
    elif how == "size":
        data = np.pad(data, ((0, 0), (0, 16), (0, 16)), mode="edge")
        profile.update(height=data.shape[1], width=data.shape[2])
    elif how == "colour":
        data[:, :4, :4] = np.array([13, 200, 77], dtype=data.dtype)[:, None, None][: data.shape[0]]
    elif how != "pixels":
        raise ValueError(how)
    if how == "pixels":
        profile.update(tiled=False, compress=None)
    path.unlink()
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    if how == "pixels":
        raw = path.read_bytes()
        path.write_bytes(raw[: int(len(raw) * 0.6)])


def bytes_replaced(rel: str, old: bytes, new: bytes) -> Callable[[Project, Backup], None]:
    """The first `old` in the file becomes `new` (a signature: HDF5's B-tree node is `TREE`)."""

    def prepare(project: Project, backup: Backup) -> None:
        path = backup.path(rel)
        data = path.read_bytes()
        if old not in data:
            raise ValueError(f"{path}: no {old!r} to damage")
        path.write_bytes(data.replace(old, new, 1))

    return prepare


def hdf5_without(rel: str, attribute: str) -> Callable[[Project, Backup], None]:
    def prepare(project: Project, backup: Backup) -> None:
        import h5py
        import hdf5plugin  # noqa: F401  (the Blosc filter)

        with h5py.File(backup.path(rel), "a") as f:
            del f.attrs[attribute]

    return prepare


def torch_file(rel: str, kind: str) -> Callable[[Project, Backup], None]:
    def prepare(project: Project, backup: Backup) -> None:
        import torch

        path = backup.path(rel)
        if kind == "other_keys":
            torch.save({"not_an_encoder.weight": torch.zeros(3)}, path)
        elif kind == "cut":
            torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, path)
            data = path.read_bytes()
            path.write_bytes(data[: len(data) // 2])

    return prepare


def both(*steps: Callable[[Project, Backup], None]) -> Callable[[Project, Backup], None]:
    def prepare(project: Project, backup: Backup) -> None:
        for step in steps:
            step(project, backup)

    return prepare


PY = "python"
CHECK = [PY, "pipeline/check_params.py"]
TILES = [PY, "pipeline/tiles.py"]
PATCHES = [PY, "pipeline/patches.py"]
TRAIN = [PY, "pipeline/train.py"]
EVALUATE = [PY, "pipeline/evaluate.py"]
REPRO = ["dvc", "repro"]
TOP = "data/raw/synthetic/top/top_mosaic_09cm_area1.tif"
DSM = "data/raw/synthetic/dsm/dsm_09cm_matching_area1.tif"
GTS = "data/raw/synthetic/gts_for_participants/top_mosaic_09cm_area1.tif"
ERODED = "data/raw/synthetic/gts_eroded_for_participants/top_mosaic_09cm_area1_noBoundary.tif"
TILE = "data/tiles/area1_image.tif"
TEST_TILE = "data/tiles/area4_image.tif"
WEIGHTS = "weights.pth"
BAD_MODEL = "bad.ckpt"


def bad_inputs(servers: dict[str, str]) -> list[Bad]:
    predict = ["aerialseg", "predict", TEST_TILE, "-m", "models/model.ckpt", "-o", "out"]
    cases = [
        # params: values
        Bad("train.lr negative", CHECK, ["train.lr"], param("train.lr", -1)),
        Bad("train.epochs 0", CHECK, ["train.epochs"], param("train.epochs", 0)),
        Bad("train.batch_size text", CHECK, ["train.batch_size"], param("train.batch_size", "eight")),
        Bad("patches.overlap 1", CHECK, ["patches.overlap"], param("patches.overlap", 1.0)),
        Bad("patches.size_px 50", CHECK, ["patches.size_px"], param("patches.size_px", 50)),
        Bad("model.arch unknown", CHECK, ["model.arch", "fpn"], param("model.arch", "fpnn")),
        Bad(
            "model.encoder unknown", CHECK, ["model.encoder", "resnet51"], param("model.encoder", "resnet51")
        ),
        Bad(
            "train.optimizer unknown", CHECK, ["train.optimizer", "adamw"], param("train.optimizer", "adamm")
        ),
        Bad("train.loss unknown", CHECK, ["train.loss"], param("train.loss", "cee")),
        Bad("train.scheduler unknown", CHECK, ["train.scheduler"], param("train.scheduler", "cosin")),
        Bad("train.precision 8", CHECK, ["train.precision"], param("train.precision", "8")),
        Bad("evaluate.tta unknown", CHECK, ["evaluate.tta"], param("evaluate.tta", "d8")),
        Bad("evaluate.blend unknown", CHECK, ["evaluate.blend"], param("evaluate.blend", "linear")),
        Bad("evaluate.overlap negative", CHECK, ["evaluate.overlap"], param("evaluate.overlap", -0.5)),
        Bad("data.bands unknown band", CHECK, ["data.bands"], param("data.bands", ["ir", "r", "x"])),
        Bad("data.source unknown", CHECK, ["data.source"], param("data.source", "landsat")),
        Bad(
            "train.class_weights 2 numbers",
            CHECK,
            ["train.class_weights"],
            param("train.class_weights", [1, 2]),
        ),
        Bad("synthetic.tiles negative", CHECK, ["synthetic.tiles"], param("synthetic.tiles", -2)),
        Bad("train.devices 0", CHECK, ["train.devices"], param("train.devices", 0)),
        Bad("train.num_workers negative", CHECK, ["train.num_workers"], param("train.num_workers", -1)),
        Bad("tracking.alias not text", CHECK, ["tracking.alias"], param("tracking.alias", ["a", "b"])),
        Bad(
            "data.val_tiles unquoted 2_10",
            CHECK,
            ["data.val_tiles", "2_10"],
            text_edit("params.yaml", lambda t: re.sub(r"val_tiles:\n\s*- 3", "val_tiles: [2_10]", t)),
        ),
        Bad("data.test_tiles not a tile", TILES, ["99"], param("data.test_tiles", [99])),
        Bad(
            "data.exclude_tiles a test tile", CHECK, ["exclude_tiles", "4"], param("data.exclude_tiles", [4])
        ),
        Bad("data.raw_dir missing", TILES, ["data/raw/nowhere"], param("data.raw_dir", "data/raw/nowhere")),
        Bad(
            "train.pretrained missing file",
            TRAIN,
            ["/nowhere/weights.pth"],
            param("train.pretrained", "/nowhere/weights.pth"),
        ),
        # params: keys, sections, the file
        Bad("misspelt section trian: (dvc repro)", REPRO, ["trian"], param("trian", {"epochs": 5})),
        Bad("misspelt key train.epoch", CHECK, ["train.epoch"], param("train.epoch", 5)),
        Bad("renamed key patches.size", CHECK, ["patches.size"], param("patches.size", 64)),
        Bad(
            "unknown evaluate key (dvc repro)", REPRO, ["evaluate.overlapp"], param("evaluate.overlapp", 0.5)
        ),
        Bad(
            "params.yaml not YAML",
            CHECK,
            ["params.yaml"],
            text_edit("params.yaml", lambda t: t + "\ntrain: [unclosed\n"),
        ),
        Bad("params.yaml a list", CHECK, ["params.yaml"], text_edit("params.yaml", lambda t: "- 1\n- 2\n")),
        Bad("params.yaml missing", TRAIN, ["params.yaml"], damage("params.yaml", "delete")),
        Bad(
            "duplicate key train.epochs",
            CHECK,
            ["epochs"],
            text_edit("params.yaml", lambda t: t.replace("train:\n", "train:\n  epochs: 3\n", 1)),
        ),
        Bad("a section a number", CHECK, ["model"], param("model", 5)),
        # raw GeoTIFFs (the tiles stage)
        Bad("orthophoto header only", TILES, ["top_mosaic_09cm_area1.tif"], damage(TOP, "head")),
        Bad(
            "orthophoto pixel data cut",
            TILES,
            [TOP.removeprefix("data/raw/synthetic/")],
            damage(TOP, "pixels"),
        ),
        Bad("DSM pixel data cut", TILES, ["dsm_09cm_matching_area1.tif"], damage(DSM, "pixels")),
        Bad(
            "label pixel data cut",
            TILES,
            ["gts_for_participants/top_mosaic_09cm_area1.tif"],
            damage(GTS, "pixels"),
        ),
        Bad("eroded label pixel data cut", TILES, ["area1_noBoundary.tif"], damage(ERODED, "pixels")),
        Bad("orthophoto garbled", TILES, ["top_mosaic_09cm_area1.tif"], damage(TOP, "garble")),
        Bad("orthophoto empty", TILES, ["top_mosaic_09cm_area1.tif"], damage(TOP, "empty")),
        Bad("orthophoto an HTML page", TILES, ["top_mosaic_09cm_area1.tif"], damage(TOP, "html")),
        Bad(
            "orthophoto all nodata",
            TILES,
            ["top_mosaic_09cm_area1.tif", "no valid pixel"],
            damage(TOP, "nodata"),
        ),
        Bad("DSM all nodata", TILES, ["dsm_09cm_matching_area1.tif"], damage(DSM, "nodata")),
        Bad("orthophoto 2 bands", TILES, ["top_mosaic_09cm_area1.tif"], damage(TOP, "bands2")),
        Bad("label of another size", TILES, ["top_mosaic_09cm_area1.tif", "272"], damage(GTS, "size")),
        Bad(
            "DSM larger than the orthophoto",
            TILES,
            ["dsm_09cm_matching_area1.tif", "272"],
            damage(DSM, "size"),
        ),
        Bad("label colour off the legend", TILES, ["top_mosaic_09cm_area1.tif"], damage(GTS, "colour")),
        Bad("orthophoto missing", TILES, ["top_mosaic_09cm_area1.tif"], damage(TOP, "delete")),
        Bad("eroded label missing", TILES, ["area1_noBoundary.tif"], damage(ERODED, "delete")),
        # tiles (the patches stage)
        Bad("tile pixel data cut", PATCHES, [TILE], damage(TILE, "pixels")),
        Bad("tile missing", PATCHES, ["area1_image.tif"], damage(TILE, "delete")),
        Bad("tiles.csv missing", PATCHES, ["tiles.csv"], damage("data/tiles/tiles.csv", "delete")),
        Bad(
            "tiles.csv a split misspelt",
            PATCHES,
            ["tiles.csv", "trian"],
            text_edit("data/tiles/tiles.csv", lambda t: t.replace(",train,", ",trian,", 1)),
        ),
        Bad("tiles.csv an HTML page", PATCHES, ["tiles.csv"], damage("data/tiles/tiles.csv", "html")),
        # HDF5 patches (the train stage)
        Bad("train.h5 truncated", TRAIN, ["train.h5"], damage("data/patches/train.h5", "truncate")),
        Bad("train.h5 empty", TRAIN, ["train.h5"], damage("data/patches/train.h5", "empty")),
        Bad("train.h5 an HTML page", TRAIN, ["train.h5"], damage("data/patches/train.h5", "html")),
        Bad(
            "train.h5 group B-tree damaged",
            TRAIN,
            ["train.h5"],
            bytes_replaced("data/patches/train.h5", b"TREE", b"EERT"),
        ),
        Bad(
            "train.h5 without its bands attribute",
            TRAIN,
            ["train.h5", "bands"],
            hdf5_without("data/patches/train.h5", "bands"),
        ),
        Bad("val.h5 truncated", TRAIN, ["val.h5"], damage("data/patches/val.h5", "truncate")),
        Bad("val.h5 missing", TRAIN, ["val.h5"], damage("data/patches/val.h5", "delete")),
        Bad(
            "patches of other bands than params", TRAIN, ["data.bands"], param("data.bands", ["ir", "r", "g"])
        ),
        # torch files
        Bad(
            "pretrained: random bytes",
            TRAIN,
            [WEIGHTS],
            both(damage(WEIGHTS, "random"), param("train.pretrained", WEIGHTS)),
        ),
        Bad(
            "pretrained: an HTML page",
            TRAIN,
            [WEIGHTS, "HTML"],
            both(damage(WEIGHTS, "html"), param("train.pretrained", WEIGHTS)),
        ),
        Bad(
            "pretrained: a cut torch file",
            TRAIN,
            [WEIGHTS],
            both(torch_file(WEIGHTS, "cut"), param("train.pretrained", WEIGHTS)),
        ),
        Bad(
            "pretrained: no encoder keys",
            TRAIN,
            [WEIGHTS],
            both(torch_file(WEIGHTS, "other_keys"), param("train.pretrained", WEIGHTS)),
        ),
        Bad(
            "model.ckpt truncated (evaluate)",
            EVALUATE,
            ["model.ckpt"],
            damage("models/model.ckpt", "truncate"),
        ),
        Bad(
            "model.ckpt an HTML page (evaluate)",
            EVALUATE,
            ["model.ckpt"],
            damage("models/model.ckpt", "html"),
        ),
        Bad("model.ckpt missing (evaluate)", EVALUATE, ["model.ckpt"], damage("models/model.ckpt", "delete")),
        Bad(
            "mlflow_run.json garbled (evaluate)",
            EVALUATE,
            ["mlflow_run.json"],
            damage("models/mlflow_run.json", "html"),
        ),
        Bad(
            "last.ckpt truncated, resume",
            TRAIN,
            ["last.ckpt"],
            both(damage("models/checkpoints/last.ckpt", "truncate"), param("train.resume", True)),
        ),
        # aerialseg commands
        Bad(
            "predict -m random bytes",
            [*predict[:3], "-m", BAD_MODEL, "-o", "out"],
            [BAD_MODEL],
            damage(BAD_MODEL, "random"),
        ),
        Bad(
            "predict -m an HTML page",
            [*predict[:3], "-m", BAD_MODEL, "-o", "out"],
            [BAD_MODEL],
            damage(BAD_MODEL, "html"),
        ),
        Bad("predict -m missing file", [*predict[:3], "-m", "nowhere.ckpt", "-o", "out"], ["nowhere.ckpt"]),
        Bad("predict input pixel data cut", predict, [TEST_TILE], damage(TEST_TILE, "pixels")),
        Bad("predict input 2 bands", predict, [TEST_TILE], damage(TEST_TILE, "bands2")),
        Bad(
            "predict input missing",
            ["aerialseg", "predict", "nowhere.tif", "-m", "models/model.ckpt"],
            ["nowhere.tif"],
        ),
        Bad(
            "predict -m unknown registered model",
            [*predict[:3], "-m", "models:/nosuch@candidate"],
            ["nosuch"],
        ),
        Bad("preset unknown", ["aerialseg", "preset", "nosuch"], ["nosuch", "synthetic"]),
        Bad("leaderboard --sort unknown", ["aerialseg", "leaderboard", "--sort", "nosuch"], ["nosuch"]),
        # tracking stores
        Bad(
            "tracking URI answers 404 (train)",
            TRAIN,
            [servers["404"]],
            env={"MLFLOW_TRACKING_URI": servers["404"]},
        ),
        Bad(
            "tracking URI refused (evaluate)",
            EVALUATE,
            [servers["refused"]],
            env={"MLFLOW_TRACKING_URI": servers["refused"]},
        ),
        Bad(
            "tracking URI 404 (leaderboard)",
            ["aerialseg", "leaderboard"],
            [servers["404"]],
            env={"MLFLOW_TRACKING_URI": servers["404"]},
        ),
        Bad(
            "tracking URI unknown scheme", TRAIN, ["nosuch://"], env={"MLFLOW_TRACKING_URI": "nosuch://store"}
        ),
        Bad(
            "AERIALSEG_TRACKING_TIMEOUT not a number",
            TRAIN,
            ["AERIALSEG_TRACKING_TIMEOUT"],
            env={"MLFLOW_TRACKING_URI": servers["404"], "AERIALSEG_TRACKING_TIMEOUT": "soon"},
        ),
        # the traceback on request
        Bad(
            "AERIALSEG_TRACEBACK=1 shows it",
            CHECK,
            ["train.lr"],
            param("train.lr", -1),
            {"AERIALSEG_TRACEBACK": "1"},
            traceback=True,
        ),
    ]
    return cases


def error_block(output: str, stage: str | None) -> tuple[list[str], str]:
    """The error's lines (`<stage>: ...` up to the hint) and what is wrong with their form."""
    lines = [line for line in output.splitlines() if line.strip()]
    if stage is None:
        return lines, ""
    starts = [i for i, line in enumerate(lines) if line.startswith(f"{stage}: ")]
    if not starts:
        return [], f"no line starting '{stage}: '"
    block = lines[starts[-1] :]
    end = block.index(HINT) if HINT in block else len(block)
    block = block[:end]
    # One line, or a params error: one line per problem, each naming the file or key.
    extra = [line for line in block[1:] if not re.match(r"^(\s+[\w.]+: |\S+\.yaml[:\s])", line)]
    if HINT not in lines:
        return block, "no hint line after the error"
    return block, f"{len(extra)} more lines: {extra[0][:120]!r}" if extra else ""


def run_bad(project: Project, bad: Bad) -> Row:
    start = time.monotonic()
    backup = Backup(project)
    for rel in ("params.yaml", "settings.yaml"):
        backup.path(rel)
    problems = []
    try:
        bad.prepare(project, backup)
        result = project.run(*bad.command, env=bad.env, timeout=240)
    finally:
        backup.restore()
        shutil.rmtree(project.path / "out", ignore_errors=True)
    if result.returncode == 0:
        project.run("dvc", "repro", timeout=900)  # the stage accepted it: its outputs back, for the next case
    output = result.stdout + result.stderr
    script = next((Path(a).stem for a in bad.command if a.startswith("pipeline/")), None)
    stage = "check_params" if script == "check_params" else script
    if bad.command[0] == "dvc":
        stage = "check_params"
    block, form = error_block(result.stderr if stage else output, stage)
    text = "\n".join(block)
    if result.returncode == 0:
        problems.append("exit 0: the bad input was accepted")
    elif result.returncode == -9:
        problems.append("timed out (240 s)")
    if bad.traceback:
        if "Traceback (most recent call last)" not in output:
            problems.append("no traceback with AERIALSEG_TRACEBACK=1")
    else:
        marks = [m for m in TRACEBACK_MARKS if m in output]
        if marks:
            problems.append(f"output holds {marks}")
        if form:
            problems.append(form)
        missing = [token for token in bad.expect if token not in text]
        if missing:
            problems.append(f"does not name {missing}")
    detail = "; ".join(problems)
    if problems:
        detail += f" | last lines: {' / '.join(output.strip().splitlines()[-4:])[-400:]!r}"
    else:
        detail = " / ".join(block)[:240]
    return Row("inputs", bad.name, " ".join(bad.command), not problems, detail, time.monotonic() - start)


# --------------------------------------------------------------------------- servers


class NotMlflow(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(404)
        self.end_headers()
        self.wfile.write(b"<html>Not Found</html>")

    do_POST = do_GET

    def log_message(self, *args: Any) -> None:
        pass


@contextlib.contextmanager
def servers() -> Iterator[dict[str, str]]:
    """A 404 server, a port that refuses, and one that accepts and never answers."""
    http = ThreadingHTTPServer(("127.0.0.1", 0), NotMlflow)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)  # accepted by the kernel, never read or answered
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
    try:
        yield {
            "404": f"http://127.0.0.1:{http.server_address[1]}/mlflow",
            "silent": f"http://127.0.0.1:{silent.getsockname()[1]}",
            "refused": f"http://127.0.0.1:{closed.getsockname()[1]}",
        }
    finally:
        http.shutdown()
        silent.close()
        closed.close()


# --------------------------------------------------------------------------- part 3: two experiments


def exp_params_match_runs(project: Project) -> tuple[list[str], list[str]]:
    """Each experiment's train.seed against its MLflow run's; (problems, experiments seen)."""
    from mlflow import MlflowClient

    shown = project.run("dvc", "exp", "show", "--json", timeout=300)
    problems: list[str] = []
    seen: list[str] = []
    if shown.returncode != 0:
        return [f"dvc exp show: {shown.stderr.strip()[-200:]}"], seen
    client = MlflowClient(f"sqlite:///{project.path / 'mlflow.db'}")
    for commit_ in json.loads(shown.stdout):
        for exp in commit_.get("experiments") or []:
            for revision in exp.get("revs", []):
                data = revision.get("data") or {}
                name = revision.get("name") or revision.get("rev")
                seed = (
                    (data.get("params", {}).get("params.yaml", {}).get("data") or {})
                    .get("train", {})
                    .get("seed")
                )
                run_id = (data.get("metrics", {}).get("reports/metrics.json", {}).get("data") or {}).get(
                    "mlflow_run_id"
                )
                if seed is None or run_id is None:
                    continue
                seen.append(f"{name}: seed {seed}")
                logged = client.get_run(run_id).data.params.get("train.seed")
                if str(logged) != str(seed):
                    problems.append(f"{name} records train.seed {seed}, its MLflow run trained with {logged}")
    return problems, seen


def seeds_since(project: Project, since: float) -> list[str]:
    """train.seed of the MLflow runs started after `since` (seconds since the epoch), oldest first."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{project.path / 'mlflow.db'}")
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], order_by=["attributes.start_time ASC"]
    )
    return [str(r.data.params.get("train.seed")) for r in runs if r.info.start_time >= since * 1000]


def run_params_differ(project: Project, key: str, value: Any) -> list[str]:
    """The workspace's MLflow run (reports/metrics.json) against `value` of `key`."""
    from mlflow import MlflowClient

    run_id = json.loads((project.path / "reports/metrics.json").read_text()).get("mlflow_run_id")
    logged = MlflowClient(f"sqlite:///{project.path / 'mlflow.db'}").get_run(run_id).data.params.get(key)
    return (
        [] if str(logged) == str(value) else [f"records {key} {value}, its MLflow run trained with {logged}"]
    )


def run_concurrent(project: Project) -> list[Row]:
    rows = []
    start = time.monotonic()
    wall_start = time.time()
    command = "dvc exp run -S train.seed=11 & (sleep 2; dvc exp run -S train.seed=12)"
    logs = [project.tmp.parent / f"exp{i}.log" for i in (1, 2)]
    procs = []
    for i, seed in enumerate((11, 12)):
        with logs[i].open("w") as out:
            procs.append(
                subprocess.Popen(
                    ["dvc", "exp", "run", "-S", f"train.seed={seed}"],
                    cwd=project.path,
                    env=project.env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            )
        time.sleep(2)
    codes = [p.wait(timeout=1200) for p in procs]
    wait_gone(project.path, 60)
    # Not supported in one workspace (README: --queue or worktrees). What must hold: nothing is
    # recorded (dvc.lock, an experiment) with params other than its MLflow run trained with, each
    # failure says why, and no run, model version or temporary file is left dangling.
    problems, seen = exp_params_match_runs(project)
    failed = [log.read_text() for log, code in zip(logs, codes, strict=True) if code != 0]
    for text in failed:
        if "Traceback (most recent call last)" in text:
            problems.append("a traceback in the failing run's output")
        if "ERROR" not in text:
            problems.append(f"a run failed without an ERROR line: {text.strip()[-200:]!r}")
    lock = yaml.safe_load((project.path / "dvc.lock").read_text())
    locked = lock["stages"]["train"]["params"]["params.yaml"].get("train.seed")
    problems += [f"dvc.lock: {p}" for p in run_params_differ(project, "train.seed", locked)]
    problems += store_problems(project)
    problems += [f"leftover {p}" for p in leftovers(project)]
    trained = seeds_since(project, wall_start)
    detail = "; ".join(problems) or (
        f"exit codes {codes}; saved experiments {seen or 'none'}; MLflow runs trained with train.seed "
        f"{trained} (asked: 11, 12); dvc.lock {locked}; the failures said: "
        + " / ".join(line.strip() for text in failed for line in text.splitlines() if "ERROR" in line)[:300]
    )
    rows.append(
        Row("concurrent", "two dvc exp run at once", command, not problems, detail, time.monotonic() - start)
    )

    # Back to the workspace's own results, then the supported way: a queue run with 2 jobs.
    subprocess.run(["git", "checkout", "--", "params.yaml"], cwd=project.path, check=False)
    project.run("dvc", "repro", timeout=900)
    start = time.monotonic()
    command = "dvc exp run --queue -S train.seed=21; ... seed=22; dvc exp run --run-all -j 2"
    problems = []
    for seed in (21, 22):
        queued = project.run("dvc", "exp", "run", "--queue", "-n", f"q{seed}", "-S", f"train.seed={seed}")
        if queued.returncode != 0:
            problems.append(f"queue seed {seed}: {queued.stderr.strip()[-200:]}")
    ran = project.run("dvc", "exp", "run", "--run-all", "-j", "2", timeout=1500)
    if ran.returncode != 0:
        problems.append(f"run-all exit {ran.returncode}: {(ran.stdout + ran.stderr).strip()[-300:]}")
    wait_gone(project.path, 60)
    mismatched, seen = exp_params_match_runs(project)
    problems += mismatched
    if sum(1 for s in seen if s.startswith(("q21", "q22"))) != 2:
        problems.append(f"expected q21 and q22 among the experiments: {seen}")
    problems += store_problems(project)
    problems += [f"leftover {p}" for p in leftovers(project)]
    problems += pipeline_clean(project)
    rows.append(
        Row(
            "concurrent",
            "two queued experiments, --run-all -j 2 (the README's way)",
            command,
            not problems,
            "; ".join(problems) or f"experiments {seen}",
            time.monotonic() - start,
        )
    )
    return rows


# --------------------------------------------------------------------------- part 4: hang


def run_hang(project: Project, silent: str) -> list[Row]:
    rows = []
    for name, command, stage in (
        ("train, silent tracking server", TRAIN, "train"),
        ("aerialseg leaderboard, silent tracking server", ["aerialseg", "leaderboard"], None),
    ):
        start = time.monotonic()
        result = project.run(*command, env={"MLFLOW_TRACKING_URI": silent}, timeout=180)
        seconds = time.monotonic() - start
        output = result.stdout + result.stderr
        block, form = error_block(result.stderr if stage else output, stage)
        problems = []
        if result.returncode in (0, -9):
            problems.append(f"exit {result.returncode}")
        if silent not in "\n".join(block):
            problems.append("the URI is not named")
        if seconds > 60:
            problems.append(f"took {seconds:.0f} s (30 s timeout + start-up expected)")
        if "Traceback (most recent call last)" in output or form:
            problems.append(form or "traceback")
        detail = "; ".join(problems) or f"{seconds:.1f} s: {block[0][:140] if block else ''}"
        rows.append(
            Row(
                "hang",
                name,
                f"MLFLOW_TRACKING_URI={silent} {' '.join(command)}",
                not problems,
                detail,
                seconds,
            )
        )
    return rows


# --------------------------------------------------------------------------- the report


def write_report(rows: list[Row], path: Path, started: float, machine: str) -> None:
    total = time.monotonic() - started
    lines = [
        "# Faults and bad input (issue 12), measured again",
        "",
        f"`python benchmarks/faults.py` (`make faults`); {machine}; {total / 60:.1f} min.",
        "",
    ]
    for part in ("kills", "inputs", "concurrent", "hang"):
        part_rows = [r for r in rows if r.part == part]
        if not part_rows:
            continue
        passed = sum(r.ok for r in part_rows)
        lines += [
            f"## {part}: {passed} of {len(part_rows)} pass",
            "",
            "| | case | command | s | result |",
            "| --- | --- | --- | ---: | --- |",
        ]
        for r in part_rows:
            detail = r.detail.replace("|", "\\|").replace("\n", " ")
            result = "pass" if r.ok else "**FAIL**"
            lines.append(f"| {result} | {r.case} | `{r.command}` | {r.seconds:.1f} | {detail} |")
        lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    path.with_suffix(".json").write_text(json.dumps([asdict(r) for r in rows], indent=1) + "\n")


def guarded(part: str, case: str, row: Callable[[], Row]) -> Row:
    """The row, or a failing row saying what went wrong in this script (the others still run)."""
    start = time.monotonic()
    try:
        return row()
    except Exception as err:
        return Row(part, case, "", False, f"faults.py: {type(err).__name__}: {err}", time.monotonic() - start)


def cpu_model() -> str:
    for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
        if line.startswith("Model name:"):
            return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}"
    return f"{os.cpu_count()} cores"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--parts", default="kills,inputs,concurrent,hang", help="comma-separated parts to run"
    )
    parser.add_argument("--only", default="", help="run only rows whose name contains this text")
    parser.add_argument("--start", default="", help="inputs: begin at the first row whose name contains this")
    parser.add_argument(
        "--git-ref", default=None, help="copy the project from this commit, not the working tree"
    )
    parser.add_argument(
        "--workdir", type=Path, default=None, help="scratch folder (default: a new one in $TMPDIR)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    parser.add_argument("--report", type=Path, default=ROOT / "reports/faults.md")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    started = time.monotonic()
    machine = cpu_model()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="aerialseg-faults-"))
    rows: list[Row] = []
    try:
        if (workdir / "project").exists():  # a kept scratch folder: reuse its copy (development)
            project = reuse_project(workdir)
        else:
            project = make_project(workdir, args.git_ref)
        base = project.run("dvc", "repro", timeout=1200)
        if base.returncode != 0:
            print(f"the tiny pipeline failed before any fault:\n{base.stdout[-2000:]}\n{base.stderr[-2000:]}")
            return 1
        commit(project, "tiny pipeline run")
        clean = leftovers(project) + store_problems(project) + pipeline_clean(project)
        rows.append(
            Row(
                "kills",
                "no fault: the tiny pipeline",
                "dvc repro",
                not clean,
                "; ".join(clean),
                time.monotonic() - started,
            )
        )
        cleanup(project)
        with servers() as urls:
            if "kills" in parts:
                for kill in KILLS:
                    if args.only in kill.name:
                        rows.append(guarded("kills", kill.name, lambda k=kill: run_kill(project, k)))
                        print(rows[-1], flush=True)
            if "inputs" in parts:
                cases = bad_inputs(urls)
                first = next((i for i, b in enumerate(cases) if args.start and args.start in b.name), 0)
                for bad in cases[first:]:
                    if args.only in bad.name:
                        rows.append(guarded("inputs", bad.name, lambda b=bad: run_bad(project, b)))
                        print(rows[-1], flush=True)
                rest = pipeline_clean(project)
                rows.append(
                    Row(
                        "inputs", "afterwards: dvc status clean", "dvc status", not rest, "; ".join(rest), 0.0
                    )
                )
            if "hang" in parts:
                rows += run_hang(project, urls["silent"])
                print(rows[-2:], flush=True)
            if "concurrent" in parts:
                rows += run_concurrent(project)
                print(rows[-2:], flush=True)
    finally:
        write_report(rows, args.report, started, machine)
        failed = [r for r in rows if not r.ok]
        print(f"{len(rows) - len(failed)} of {len(rows)} rows pass; {args.report}")
        if not args.keep and args.workdir is None and not failed:
            shutil.rmtree(workdir, ignore_errors=True)
        elif not args.keep and args.workdir is None:
            print(f"scratch folder kept for the failing rows: {workdir}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
