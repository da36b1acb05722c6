"""A tiny copy of the project in a temporary git repository, and running commands in it.

End-to-end tests run the real `dvc repro` (directly, or inside a Slurm job) on such a copy, never on
the working tree: the copy has its own params.yaml, dvc.lock, outputs and MLflow store.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from aerialseg.config import SETTINGS_FILE, split_settings

ROOT = Path(__file__).resolve().parents[1]
COPIED = (
    "pipeline",
    "src",
    "params.yaml",
    "settings.yaml",
    "dvc.yaml",
    ".dvc/config",
    ".dvcignore",
    ".gitignore",
    "slurm",
)
# Never copied: caches, build leftovers and job logs of the working tree.
IGNORED = ("__pycache__", "*.egg-info", "*.out", "*.err")
TINY: dict[str, dict[str, Any]] = {
    "synthetic": {"tiles": 4, "size_px": 128},
    "data": {"val_tiles": [3], "test_tiles": [4]},
    "patches": {"size_px": 64, "overlap": 0.5},
    "model": {"encoder": "resnet18"},
    "train": {"epochs": 2, "batch_size": 4, "num_workers": 0, "limit_train_batches": 2},
}


def copy_project(
    dest: Path, params: Mapping[str, Mapping[str, Any]] = TINY, names: Iterable[str] = COPIED
) -> Path:
    """Copy `names` of the project into `dest`, update params.yaml with `params`, commit it all."""
    for name in names:
        src, dst = ROOT / name, dest / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*IGNORED))
        else:
            shutil.copy2(src, dst)
    set_params(dest, params)
    for cmd in (
        ["git", "init", "-q"],
        ["git", "add", "-A"],
        ["git", "-c", "user.name=test", "-c", "user.email=test@example.org", "commit", "-qm", "tiny project"],
    ):
        subprocess.run(cmd, cwd=dest, check=True)
    return dest


def set_params(project: Path, updates: Mapping[str, Mapping[str, Any]]) -> None:
    """Update params.yaml, and settings.yaml for the keys that live there (config.NOT_RESULTS)."""
    results, settings = split_settings(updates)
    for name, part in (("params.yaml", results), (SETTINGS_FILE, settings)):
        if not part:
            continue  # the file is left as written (quotes, comments)
        path = project / name
        tree = (yaml.safe_load(path.read_text()) if path.exists() else None) or {}
        for section, values in part.items():
            tree.setdefault(section, {}).update(values)
        path.write_text(yaml.safe_dump(tree, sort_keys=False))


def project_env(project: Path, **extra: str) -> dict[str, str]:
    """The environment a stage of the copy runs in: its own code (PYTHONPATH), this venv's `python`
    and `dvc` first on PATH, and no MLFLOW_*/DVC_* settings of the caller (the copy's store is its
    own mlflow.db)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    # The copy's own code, not the installed one, so dvc.yaml's code deps are what runs.
    env["PYTHONPATH"] = str(project / "src")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    env.update(extra)
    return env


def run(
    project: Path,
    *args: str,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run `args` in the copy (default environment: `project_env`); with `check`, fail the test,
    showing the end of its output, unless it exits with 0."""
    result = subprocess.run(
        args,
        cwd=project,
        env=dict(env) if env is not None else project_env(project),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check:
        output = f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        assert result.returncode == 0, f"{' '.join(args)} failed ({result.returncode}):\n{output}"
    return result


def stages_run(output: str) -> set[str]:
    """The stages that `dvc repro` output says it ran."""
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")}


def mlflow_client(project: Path) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
