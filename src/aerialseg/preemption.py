"""Slurm preemption: a job warned before its time limit saves `last.ckpt` and is requeued.

The templates (slurm/*.sbatch) ask Slurm for SIGUSR1 before the time limit
(`#SBATCH --signal=USR1@<seconds>`: every task of the job's steps, so every training process, but
not the batch shell) and make the job requeueable (`--requeue`); `scancel --signal=USR1 <job>`
sends the same signal by hand. In a Slurm job, `Preemption` catches it in every training process;
at the end of the current training batch (every rank at the same batch: one rank's signal is
enough) it saves `last.ckpt` (the `last` checkpoint, written beside its final name and renamed,
`checkpoint_io`), rank 0 records the run's train_seconds and requeues the job (`scontrol
requeue`), and training stops with `Requeued`, the MLflow run left RUNNING. Slurm ends the job
and starts it again with SLURM_RESTART_COUNT=1: the job script reruns from the top, `dvc repro`
skips the stages already done, and `train` resumes from `last.ckpt` into the same MLflow run
(`restart_count`) even with `train.resume: false`, as long as the checkpoint's fingerprint is
that of the params and data. The checkpoint is taken between two batches, and the training
patches of a resumed epoch start after the batches it had trained (`datamodule.EpochBatches`),
so the requeued job ends with the weights of an uninterrupted one.

Why not Lightning's own auto-requeue (`SLURMEnvironment(auto_requeue=True)`, Lightning 2.6): its
SIGUSR1 handler saves `hpc_ckpt_<n>.ckpt` wherever the process happens to be (in the middle of an
optimizer step; with a barrier inside the handler, which under DDP can meet another rank's
gradient all-reduce), ends the MLflow run FINISHED, trains on until Slurm's SIGTERM stops it
(the run then ends FAILED), and the next job loads the newest `hpc_ckpt_*.ckpt` of the
default root directory before any check of its params and data. Here the environment is
`SLURMEnvironment(auto_requeue=False)` and this callback does the requeue.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Callback

SIGNAL = signal.SIGUSR1
"""The signal the templates ask for before the time limit (`#SBATCH --signal=USR1@<seconds>`)."""
REQUEUE_TIMEOUT = 60
"""Seconds `scontrol requeue` may take (slurmctld answers within its MessageTimeout, 10 s by default)."""


class Requeued(SystemExit):
    """Training stopped for the requeued Slurm job to resume from `last.ckpt`: not a failure, the
    MLflow run stays RUNNING (`training.RunLogger`, `training._run_status`). Exits with status 1,
    so that DVC never records the stage as done."""


def restart_count() -> int:
    """How many times Slurm has requeued this job (SLURM_RESTART_COUNT; 0 outside Slurm)."""
    value = os.environ.get("SLURM_RESTART_COUNT", "").strip()
    return int(value) if value.isdigit() else 0


class Preemption(Callback):
    """On SIGUSR1 in a Slurm job: save `checkpoint` at the end of the current training batch,
    requeue the job and stop with `Requeued` (see the module's docstring).

    A context manager: the signal handler is installed on entry and the previous one restored on
    exit, so that a signal that comes after training (while the model is published) is ignored
    instead of ending the process. `before_requeue` runs on rank 0 after the checkpoint is saved,
    before the job is requeued (train_seconds to MLflow).
    """

    def __init__(self, checkpoint: Path, job: str, before_requeue: Callable[[], None]) -> None:
        self.checkpoint, self.job, self.before_requeue = checkpoint, job, before_requeue
        self.signalled = False
        self._previous: Any = None

    @classmethod
    def in_slurm_job(cls, checkpoint: Path, before_requeue: Callable[[], None]) -> Preemption | None:
        """The callback when this process is a task of a Slurm job (as Lightning sees it:
        SLURMEnvironment.detect, so not in a job named `bash` or `interactive`), else None."""
        job = os.environ.get("SLURM_JOB_ID", "")
        if not job.isdigit() or not SLURMEnvironment.detect():
            return None
        return cls(checkpoint, job, before_requeue)

    @staticmethod
    def environment() -> SLURMEnvironment:
        """Lightning's Slurm environment without its own SIGUSR1 handler (Preemption's instead)."""
        return SLURMEnvironment(auto_requeue=False)

    def __enter__(self) -> Preemption:
        self._previous = signal.signal(SIGNAL, self._on_signal)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        signal.signal(SIGNAL, self._previous if self._previous is not None else signal.SIG_DFL)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Only a flag: the process may be anywhere (in an optimizer step, a collective call).
        self.signalled = True

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # One small all-reduce per batch under DDP, so that every rank stops after the same batch
        # even when the signal reached them between two different batches.
        if not trainer.strategy.reduce_boolean_decision(self.signalled, all=False):
            return
        epoch = trainer.current_epoch
        trainer.save_checkpoint(self.checkpoint)  # every rank (rank 0 writes), then a barrier
        # `scontrol requeue` ends the job's processes with SIGTERM: from here on there is nothing
        # to save, and Lightning's SIGTERM handler would start collective calls of its own.
        previous_term = signal.signal(signal.SIGTERM, signal.SIG_IGN)
        error = None
        if trainer.is_global_zero:
            print(
                f"preemption: signal {SIGNAL.name} in Slurm job {self.job}: {self.checkpoint} saved after "
                f"batch {batch_idx} of epoch {epoch}; requeueing the job",
                file=sys.stderr,
                flush=True,
            )
            self.before_requeue()
            error = _requeue(self.job)
        # Every rank waits for rank 0's requeue: a rank that exited first would make srun end the
        # others (SLURM_KILL_BAD_EXIT) before the job is requeued.
        error = trainer.strategy.broadcast(error, src=0)
        if error is not None:
            signal.signal(signal.SIGTERM, previous_term)
            raise RuntimeError(
                f"{error}; {self.checkpoint} is saved: resubmit the job with train.resume: true"
            )
        raise Requeued(
            f"Slurm job {self.job} requeued: it resumes from {self.checkpoint} (epoch {epoch}, "
            f"after batch {batch_idx}) into the same MLflow run"
        )


def _requeue(job: str) -> str | None:
    """Requeue Slurm job `job`; None when done, else what went wrong."""
    command = ["scontrol", "requeue", job]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=REQUEUE_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"`{' '.join(command)}` failed: {err}"
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip() or f"exit status {done.returncode}"
        return f"`{' '.join(command)}` failed: {detail} (is the job submitted with --requeue?)"
    return None
