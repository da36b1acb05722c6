"""The DVC remote on a shared file system: `make remote DVC_REMOTE=...`, `dvc push`, `dvc pull`.

A tiny copy of the project runs the pipeline, sets up the remote with the Makefile's one command (a
folder standing for the cluster's shared file system) and pushes; a git clone of it pulls and
gets every output but the patches (`push: false` in dvc.yaml), and its `dvc repro` regenerates
only the patches, bit-identical, so nothing downstream reruns.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml
from project_copy import COPIED, TINY, copy_project, run, stages_run

pytestmark = pytest.mark.slow

PARAMS = {**TINY, "train": {**TINY["train"], "epochs": 1, "limit_train_batches": 1}}


def _outs(project: Path) -> dict[str, str]:
    """Each output path of dvc.lock -> its md5 (a `.dir` one for folders)."""
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    return {out["path"]: out["md5"] for stage in lock["stages"].values() for out in stage.get("outs", [])}


def _in_remote(store: Path, md5: str) -> bool:
    return (store / "files" / "md5" / md5[:2] / md5[2:]).is_file()


def test_push_to_a_shared_folder_and_pull_in_a_clone(tmp_path: Path) -> None:
    project = copy_project(tmp_path / "project", PARAMS, names=(*COPIED, "Makefile"))
    run(project, "dvc", "repro", timeout=900)
    store = tmp_path / "shared" / "dvc-store"

    # The one command; `-o`: the venv that `install` would build is this test's own.
    run(project, "make", "-o", ".venv/.installed", "remote", f"DVC_REMOTE={store}")
    # In the project's config (.dvc/config, committed): the default remote for every clone.
    for key, value in (
        ("core.remote", "shared"),
        ("remote.shared.url", str(store)),
        ("remote.shared.shared", "group"),
    ):
        assert run(project, "dvc", "config", "--project", key).stdout.strip() == value, key
    # Without the folder it says what it needs, in one line.
    refused = run(project, "make", "-o", ".venv/.installed", "remote", check=False)
    assert refused.returncode != 0 and "error: DVC_REMOTE is not set" in refused.stderr

    run(project, "dvc", "push", timeout=300)
    outs = _outs(project)
    assert _in_remote(store, outs["models/model.ckpt"]) and _in_remote(store, outs["data/tiles"])
    assert not _in_remote(store, outs["data/patches"])  # push: false

    # The team member's side: a clone of the commit, pulling from the shared folder.
    run(project, "git", "add", "-A")
    run(project, "git", "-c", "user.name=t", "-c", "user.email=t@example.org", "commit", "-qm", "results")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(project), str(clone)], check=True)
    plain = run(clone, "dvc", "pull", timeout=300, check=False)
    assert plain.returncode != 0 and "data/patches" in plain.stdout + plain.stderr  # not in the remote
    run(clone, "dvc", "pull", "--allow-missing", timeout=300)
    for path in ("models/model.ckpt", "models/mlflow_run.json", "reports/predictions"):
        assert (clone / path).exists(), path
    assert (clone / "models/model.ckpt").read_bytes() == (project / "models/model.ckpt").read_bytes()
    assert not (clone / "data" / "patches").exists()

    # Only the patches are rebuilt, to the same digest: training and evaluation stay up to date.
    assert stages_run(run(clone, "dvc", "repro", timeout=600).stdout) == {"patches"}
    assert _outs(clone) == outs
    assert "up to date" in run(clone, "dvc", "status").stdout
