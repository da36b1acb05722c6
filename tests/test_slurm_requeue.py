"""Preemption on the one-node Slurm cluster of tests/test_slurm.py: `slurm/cpu.sbatch` runs the whole
`dvc repro` of a tiny copy of the project (2 ranks, deterministic); SIGUSR1 comes while it trains,
as `#SBATCH --signal=USR1@<seconds>` sends it before the time limit; the job saves `last.ckpt`,
requeues itself, restarts (Restarts=1), skips the stages already done, resumes the training into
the same MLflow run and finishes it: one run, FINISHED, with the weights of an uninterrupted run.
See src/aerialseg/preemption.py and slurm/README.md.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
import torch
from project_copy import copy_project, mlflow_client, project_env, run, stages_run
from test_slurm import JOB_TIMEOUT, SLURM_PARAMS, TEMPLATE, Cluster, _job, _runs, cluster  # noqa: F401

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

EPOCHS = 5
REQUEUE_PARAMS = {
    **SLURM_PARAMS,
    # 3 batches per rank and epoch (18 patches, 2 ranks, batch 4), all of them: training is still
    # on when the signal comes after the first epoch's checkpoint.
    "train": {**SLURM_PARAMS["train"], "epochs": EPOCHS, "limit_train_batches": None, "deterministic": True},
}


def _job_fields(env: dict[str, str], job: str) -> dict[str, str]:
    """`scontrol show job` of `job` as a dict (JobState, Restarts, ExitCode, ...); empty once Slurm
    has forgotten it."""
    done = subprocess.run(["scontrol", "-o", "show", "job", job], env=env, capture_output=True, text=True)
    return dict(re.findall(r"(\w+)=(\S*)", done.stdout)) if done.returncode == 0 else {}


def _wait(what: str, until: Callable[[], bool], timeout: float, log: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout
    while not until():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not after {timeout:.0f} s\n{log()}")
        time.sleep(0.2)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return dict(torch.load(path, map_location="cpu", weights_only=False)["state_dict"])


def test_a_signalled_job_requeues_resumes_into_its_run_and_ends_as_an_uninterrupted_one(
    cluster: Cluster,  # noqa: F811
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    project = copy_project(tmp_path_factory.mktemp("requeue"), REQUEUE_PARAMS)
    env = cluster.env(project_env(project))
    job = _job(project, run(project, "sbatch", TEMPLATE, env=env))
    last = project / "models" / "checkpoints" / "last.ckpt"

    # Mid-training: after the first epoch's checkpoint, SIGUSR1 to the job's steps (the training
    # ranks), as Slurm's time-limit warning sends it.
    _wait("the first epoch's last.ckpt", last.exists, JOB_TIMEOUT, job.log)
    run(project, "scancel", "--signal=USR1", job.id, env=env)
    requeued = {"JobState": "PENDING", "Restarts": "1"}
    _wait("the requeue", lambda: requeued.items() <= _job_fields(env, job.id).items(), 120, job.log)
    # A requeued job may start again only after the credential lifetime (120 s by default);
    # Slurm lets the start time be set to now.
    run(project, "scontrol", "update", f"JobId={job.id}", "StartTime=now", env=env)
    _wait(
        "the requeued job's end",
        lambda: (
            _job_fields(env, job.id).get("JobState") not in ("PENDING", "RUNNING", "REQUEUED", "COMPLETING")
        ),
        JOB_TIMEOUT,
        job.log,
    )
    fields = _job_fields(env, job.id)
    assert (fields["JobState"], fields["Restarts"], fields["ExitCode"]) == ("COMPLETED", "1", "0:0"), (
        job.log()
    )

    out, err = job.out.read_text(), job.err.read_text()
    first, second = out.split(f"restart 1 of job {job.id} (requeued)")  # --open-mode=append: both parts
    assert stages_run(first) == {"params", "scenes", "tiles", "patches", "train"}, job.log()
    assert stages_run(second) == {"train", "evaluate"}, job.log()  # the finished stages skipped
    (saved,) = re.findall(
        r"preemption: signal SIGUSR1 in Slurm job \d+: .* saved after batch (\d+) of epoch (\d+)", err
    )
    assert 1 <= int(saved[1]) < EPOCHS, job.log()
    assert "Restoring states from the checkpoint path at models/checkpoints/last.ckpt" in err, job.log()

    # One MLflow run, continued and FINISHED; its train_seconds cover both parts.
    (run_,) = _runs(project)
    assert run_.info.status == "FINISHED"
    seconds = [m.value for m in mlflow_client(project).get_metric_history(run_.info.run_id, "train_seconds")]
    assert len(set(seconds)) >= 2 and run_.data.metrics["train_seconds"] == max(seconds)
    assert json.loads((project / "reports" / "metrics.json").read_text())["mlflow_run_id"] == run_.info.run_id
    assert not list((project / "models").glob("**/*-v1.ckpt"))
    preempted = {
        name: _weights(project / "models" / name) for name in ("model.ckpt", "checkpoints/last.ckpt")
    }
    history = pd.read_csv(project / "models" / "history.csv")
    assert list(history["epoch"]) == list(range(EPOCHS))

    # The same training uninterrupted, in a job of its own (pattern 2's command): the same weights.
    run(
        project,
        "sbatch",
        "--wait",
        TEMPLATE,
        "srun",
        "python",
        "pipeline/train.py",
        env=env,
        timeout=JOB_TIMEOUT,
    )
    for name, weights in preempted.items():
        straight = _weights(project / "models" / name)
        assert weights.keys() == straight.keys()
        differ = [k for k in weights if not torch.equal(weights[k], straight[k])]
        assert not differ, (
            f"{name}: {len(differ)} tensors differ from the uninterrupted run's, e.g. {differ[:3]}"
        )
    # The same validation figures every epoch (train_loss of the preempted epoch averages the
    # batches after the restart only: Lightning does not checkpoint a running epoch mean).
    straight_history = pd.read_csv(project / "models" / "history.csv")
    scores = [c for c in history.columns if c.startswith("val_") and c != "val_seconds"]
    pd.testing.assert_frame_equal(history[scores], straight_history[scores])
    print(
        "train_loss preempted / uninterrupted:",
        list(history["train_loss"]),
        list(straight_history["train_loss"]),
    )
