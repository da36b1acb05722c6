"""Preemption of a Slurm job (`aerialseg.preemption`), in this process: the training is a task of a
one-task Slurm job as Lightning sees it (SLURM_* variables), SIGUSR1 comes mid-epoch, `last.ckpt`
is saved after that batch and the job requeued; the "requeued job" (SLURM_RESTART_COUNT=1)
resumes it into the same MLflow run and ends with the weights of an uninterrupted run.

`scontrol` is a stand-in script that records its arguments: the real requeue, by a real Slurm
cluster, is tests/test_slurm_requeue.py's.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import pandas as pd
import pytest
import torch
from test_resume import EXACT, _client, _resume_lines, _run_id, store, straight  # noqa: F401 (fixtures)
from test_training_engine import _assert_identical, _params, _weights

from aerialseg.config import Params
from aerialseg.names import TRAIN_SECONDS
from aerialseg.preemption import Requeued, restart_count
from aerialseg.training import train

JOB = "4242"


class SignalAt(L.Callback):
    """Test-only: sends this process SIGUSR1 as batch `batch` of epoch `epoch` starts, as Slurm's
    `--signal=USR1@<seconds>` or `scancel --signal=USR1` would."""

    def __init__(self, epoch: int, batch: int) -> None:
        self.epoch, self.batch = epoch, batch

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, i: int
    ) -> None:
        if (trainer.current_epoch, i) == (self.epoch, self.batch):
            os.kill(os.getpid(), signal.SIGUSR1)


@pytest.fixture
def slurm_task(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This process as the one task of Slurm job JOB; `scontrol` on PATH appends its arguments to
    the returned file."""
    calls = tmp_path / "scontrol-calls"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    for name, value in {
        "SLURM_JOB_ID": JOB,
        "SLURM_JOB_NAME": "aerialseg-test",
        "SLURM_NTASKS": "1",
        "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "SLURM_NODELIST": "localhost",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    return calls


def test_restart_count_reads_slurm_restart_count(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    assert restart_count() == 0
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    assert restart_count() == 2


@pytest.mark.slow
def test_a_preempted_job_resumes_mid_epoch_into_its_run_and_ends_with_the_uninterrupted_weights(
    store: Path,  # noqa: F811
    straight: Path,  # noqa: F811
    slurm_task: Path,
    patches_dir: Path,
    small_params: Callable[..., Params],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    models = tmp_path / "models"
    params = _params(small_params, patches_dir, models, **EXACT)  # train.resume false
    # Mid-epoch in the last epoch: after batch 0 of 2 of epoch 2 (of 0-2).
    with pytest.raises(Requeued):
        train(params, callbacks=[SignalAt(2, 0)])

    assert slurm_task.read_text().split() == ["requeue", JOB]
    assert "saved after batch 0 of epoch 2; requeueing the job" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # restored
    run_id = json.loads((models / "checkpoints" / "mlflow_run.json").read_text())["run_id"]
    client = _client(store)
    preempted = client.get_run(run_id)
    assert preempted.info.status == "RUNNING"  # neither FAILED nor KILLED: the job goes on
    first_part = preempted.data.metrics[TRAIN_SECONDS]
    assert first_part > 0
    payload = torch.load(models / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert payload["epoch"] == 2 and payload["global_step"] == 5  # 2 + 2 + 1 batches
    # The requeued job with other params: the fingerprint refuses the checkpoint.
    other = Path(shutil.copytree(models, tmp_path / "other"))
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")

    train(params)

    assert not _resume_lines(capsys.readouterr().err)
    for name in ("checkpoints/last.ckpt", "checkpoints/best.ckpt", "model.ckpt"):
        _assert_identical(_weights(models / name), _weights(straight / name))
    assert not list(models.glob("**/*-v1.ckpt"))
    assert list(pd.read_csv(models / "history.csv")["epoch"]) == [0, 1, 2]
    assert _run_id(models) == run_id
    finished = client.get_run(run_id)
    assert finished.info.status == "FINISHED"
    assert finished.data.metrics[TRAIN_SECONDS] > first_part  # both parts' seconds
    assert slurm_task.read_text().split() == ["requeue", JOB]  # not requeued again

    train(_params(small_params, patches_dir, other, **{**EXACT, "epochs": 1, "lr": 0.01}))

    (line,) = _resume_lines(capsys.readouterr().err)
    assert "was trained with train.epochs 3 (now 1), train.lr 0.001 (now 0.01)" in line
    assert line.endswith("starting a new run") and _run_id(other) != run_id


@pytest.mark.slow
def test_a_job_preempted_in_its_first_epoch_resumes_into_one_last_checkpoint(
    store: Path,  # noqa: F811
    straight: Path,  # noqa: F811
    slurm_task: Path,
    patches_dir: Path,
    small_params: Callable[..., Params],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Before any epoch's checkpoint: Lightning's `last` callback has not written last.ckpt yet,
    # and must then overwrite the one Preemption saved (not write last-v1.ckpt beside it).
    models = tmp_path / "models"
    params = _params(small_params, patches_dir, models, **EXACT)
    with pytest.raises(Requeued):
        train(params, callbacks=[SignalAt(0, 0)])
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")

    train(params)

    assert sorted(p.name for p in (models / "checkpoints").glob("*.ckpt")) == ["best.ckpt", "last.ckpt"]
    for name in ("checkpoints/last.ckpt", "model.ckpt"):
        _assert_identical(_weights(models / name), _weights(straight / name))
    assert _client(store).get_run(_run_id(models)).info.status == "FINISHED"
