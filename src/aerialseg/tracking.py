"""MLflow: one run per pipeline run, opened by `train` and reopened by `evaluate`."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from aerialseg.files import atomic_path

DEFAULT_DB = "mlflow.db"


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI if set, else a SQLite store at the project root (where `mlflow ui` looks).

    DVC runs every stage from the project root, so the working directory is that root.
    """
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / DEFAULT_DB}"


def run_tags() -> dict[str, str]:
    """Tags that tie a run to the code and the DVC experiment that produced it."""
    tags = {"mlflow.source.type": "PROJECT"}
    commit = _git("rev-parse", "HEAD")
    if commit:
        tags["mlflow.source.git.commit"] = commit
        tags["git_commit"] = commit
        tags["git_dirty"] = str(bool(_git("status", "--porcelain", "--untracked-files=no")))
    exp_name = os.environ.get("DVC_EXP_NAME")
    if exp_name:
        tags["dvc_exp_name"] = exp_name
    return tags


def run_name(encoder: str) -> str:
    """The DVC experiment's name when `dvc exp run` started us, else the encoder and the time.

    Named explicitly because MLflow's random names repeat once training has seeded Python's RNG.
    """
    return os.environ.get("DVC_EXP_NAME") or f"{encoder}-{datetime.now():%Y%m%d-%H%M%S}"


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 0.1}} -> {"train.lr": 0.1}, the keys `dvc exp show` uses too."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


@dataclass(frozen=True)
class RunRef:
    """How `evaluate` finds the run that `train` opened (a DVC output of `train`)."""

    run_id: str
    experiment_id: str
    experiment_name: str

    def save(self, path: Path) -> None:
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> RunRef:
        if not path.exists():
            raise FileNotFoundError(f"{path}: no MLflow run reference; run the `train` stage first")
        return cls(**json.loads(path.read_text()))


@contextlib.contextmanager
def reopen(ref: RunRef) -> Iterator[Any]:
    """Make `ref`'s run the active one again, for the duration of the block."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    with mlflow.start_run(run_id=ref.run_id) as run:
        yield run


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, check=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip()
