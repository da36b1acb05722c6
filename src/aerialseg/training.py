"""Training with PyTorch Lightning: the task, the trainer, and the checkpoints.

Layout under `paths.models`:
- `model.ckpt`: the self-describing checkpoint (best epoch by val_mean_f1), read by `evaluate`;
  the val figures come from the whole validation tiles, predicted as `evaluate` predicts the test
  tiles (sliding window, blending, TTA, eroded reference, each pixel once), so the model is
  chosen by the figure the project reports;
- `history.csv`, `mlflow_run.json`: per-epoch metrics and the MLflow run (DVC outputs);
- `checkpoints/`: Lightning's `last.ckpt` and `best.ckpt`, plus `mlflow_run.json`, which
  `train.resume` continues from (the training run and its MLflow run), and `fingerprint.json`,
  the params and data they were trained with (only a checkpoint of the same ones is resumed).

Only global rank 0 writes files or talks to MLflow, so a DDP run yields one run and one set of files.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import h5py
import lightning as L
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import Logger, MLFlowLogger
from lightning.pytorch.loggers.logger import DummyLogger
from lightning.pytorch.utilities import rank_zero_only
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassConfusionMatrix

from aerialseg.checkpoint import save_checkpoint
from aerialseg.checkpoint_io import AtomicCheckpointIO
from aerialseg.choices import check_choices
from aerialseg.classes import CLASS_NAMES, IGNORE_INDEX, NUM_CLASSES
from aerialseg.config import NOT_RESULTS, Params, TrainConfig
from aerialseg.data import Decode, SpectralJitter
from aerialseg.datamodule import PatchData, RandomStreams
from aerialseg.devices import launch_rank, resolve_training_precision
from aerialseg.files import atomic_path
from aerialseg.inference import ArrayRows, Settings, stream_blocks
from aerialseg.losses import build_loss, patch_file_class_weights
from aerialseg.metrics import scores
from aerialseg.model import build_model, check_input_size, model_args
from aerialseg.model_card import ModelCard
from aerialseg.names import (
    HARDWARE_TAG,
    SCORES,
    SELECTED_EPOCH,
    TRAIN,
    TRAIN_LOSS,
    TRAIN_SECONDS,
    VAL,
    VAL_LOSS,
    VAL_MEAN_F1,
    VAL_PIXELS,
    VAL_SECONDS,
    registered_model_name,
    selected,
    val,
)
from aerialseg.optim import OPTIMIZERS, SCHEDULERS, Schedule, build_optimizer, build_scheduler
from aerialseg.patches import PatchFileInfo, open_h5, read_patch_info, read_tile_file_info
from aerialseg.preemption import Preemption, Requeued, restart_count
from aerialseg.progress import training_progress_bar
from aerialseg.tracking import (
    RunRef,
    check_tracking_store,
    end_dead_runs,
    ensure_experiment,
    flatten,
    hardware_tag,
    log_dataset_inputs,
    log_lineage,
    log_model,
    owner_tags,
    run_name,
    run_tags,
    start_system_metrics,
    tracking_uri,
)

MONITOR = VAL_MEAN_F1
"""The metric that picks the best checkpoint, drives early stopping and the plateau scheduler."""
CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
RUN_REF = "mlflow_run.json"
FINGERPRINT = "fingerprint.json"
HISTORY_KEY = "aerialseg_history"


# ---------------------------------------------------------------- the task


class SegmentationTask(L.LightningModule):
    """Supervised training of an smp network; validation by one confusion matrix per epoch."""

    def __init__(
        self,
        args: dict[str, Any],
        *,
        weights: str = "none",
        optimizer: str = "adamw",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        channels_last: bool = False,
        loss: str = "ce",
        class_weights: Sequence[float] | None = None,
        scheduler: str = "none",
        compile: bool = False,
        decode: Decode | None = None,
        jitter: SpectralJitter | None = None,
        validation: Settings | None = None,
    ) -> None:
        super().__init__()
        # Unknown names fail here, not once the first epoch is over.
        OPTIMIZERS.choose(optimizer)
        SCHEDULERS.choose(scheduler)
        self.save_hyperparameters(ignore=["decode", "jitter", "validation"])
        self.model = build_model(args, weights)
        # Photometric augmentation of the training batches, where they already are (the GPU).
        self.jitter = jitter
        # Compact training batches (data.PatchDataset) -> normalised float, on the device too.
        self.decode = decode
        self.loss = build_loss(loss, class_weights)
        # `evaluate`'s engine settings; precision 32 adds no autocast of its own: Lightning's
        # precision plugin already runs validation in the training's precision.
        self.validation = validation or Settings(window=256)
        # torchmetrics sums over DDP ranks; each val tile is on one rank: every pixel counts once.
        self.val_confusion = MulticlassConfusionMatrix(args["classes"], ignore_index=IGNORE_INDEX)
        self.val_loss = MeanMetric()
        self._val_started = 0.0
        self.channels_last = channels_last
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if compile:
            # In place: the module's state_dict keys stay those of the plain network.
            self.model.compile()
        self.history: list[dict[str, float]] = []

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        return self.model(image)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        # Here, not in on_after_batch_transfer: RandomStreams has just reseeded torch's generator.
        if self.decode is None:
            image, mask = batch["image"], batch["mask"]
        else:
            image, mask = self.decode(batch)  # a packed compact batch (data.PatchDataset)
        if self.jitter is not None:
            image = self.jitter(image)
        loss = self.loss(self(image), mask.long())
        self.log(
            TRAIN_LOSS,
            loss,
            on_step=False,
            on_epoch=True,
            prog_bar=True,
            sync_dist=True,
            batch_size=len(mask),
        )
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_started = time.perf_counter()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """One whole val tile (`data.ValidationTiles`), predicted as `evaluate` predicts a test tile."""
        if batch["tile"] is None:  # this rank's share of the tiles is used up (TileShards)
            return
        # Counted block by block as the engine hands the rows over: the tile's probabilities are
        # never held whole (824 MiB for a 6000 x 6000 Potsdam tile, `make rehearsal`).
        settings = replace(self.validation, device=str(self.device))
        for block in stream_blocks(self, ArrayRows(batch["image"]), settings):
            rows = slice(block.row, block.row + block.probabilities.shape[1])
            reference = torch.from_numpy(batch["reference"][rows].astype(np.int64))
            probs = torch.from_numpy(block.probabilities)
            self.val_confusion.update(probs.argmax(dim=0).to(self.device), reference.to(self.device))
            # val_loss: cross-entropy of the blended probabilities on the scored pixels.
            scored = reference != IGNORE_INDEX
            if scored.any():
                p = probs[:, scored].gather(0, reference[scored][None]).clamp_min(1e-7)
                self.val_loss.update(-p.log().mean().to(self.device), weight=int(scored.sum()))

    def on_validation_epoch_end(self) -> None:
        # compute() gathers the matrix from every rank: the same values on all of them.
        cm = self.val_confusion.compute().cpu().numpy()
        loss = float(self.val_loss.compute())
        self.val_confusion.reset()
        self.val_loss.reset()
        result = scores(cm, CLASS_NAMES[: cm.shape[0]])
        for key in SCORES:
            if result[key] is not None:
                self.log(val(key), float(result[key]), prog_bar=val(key) == MONITOR)
        if cm.sum():
            self.log(VAL_LOSS, loss, prog_bar=True)
        # How many pixels were scored: a DDP run must count each val pixel exactly once.
        self.log(VAL_PIXELS, float(cm.sum()))
        # What whole-tile validation costs per epoch (this rank's share, in seconds).
        self.log(VAL_SECONDS, time.perf_counter() - self._val_started)

    def on_train_epoch_end(self) -> None:
        # Runs after validation in Lightning 2.x, so the epoch's val metrics are in here too.
        if self.trainer.sanity_checking:
            return
        metrics = {
            k: float(v) for k, v in self.trainer.callback_metrics.items() if k.startswith((TRAIN, VAL))
        }
        self.history.append({"epoch": float(self.current_epoch), **metrics})

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # A resumed run continues the history instead of starting a new one.
        checkpoint[HISTORY_KEY] = list(self.history)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.history = list(checkpoint.get(HISTORY_KEY, []))

    def configure_optimizers(self) -> Any:
        optimizer = build_optimizer(
            self.parameters(), self.hparams["optimizer"], self.hparams["lr"], self.hparams["weight_decay"]
        )
        schedule = Schedule(
            lr=self.hparams["lr"],
            max_epochs=lambda: self.trainer.max_epochs or 1,
            total_steps=lambda: max(1, int(self.trainer.estimated_stepping_batches)),
            monitor=MONITOR,
        )
        scheduler = build_scheduler(self.hparams["scheduler"], optimizer, schedule)
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": scheduler}


class RunReference(Callback):
    """Rank 0 writes the MLflow run id next to the checkpoints as soon as training starts,
    so that a crashed run can be resumed into the same MLflow run; it records the run's dataset
    inputs and its system metrics while the training runs."""

    def __init__(self, logger: Logger, path: Path, experiment: str, log_world_size: bool) -> None:
        self.logger, self.path, self.experiment = logger, path, experiment
        self.log_world_size = log_world_size
        self.system_metrics: Any = None  # mlflow's SystemMetricsMonitor while training runs

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        assert isinstance(self.logger, MLFlowLogger)
        assert self.logger.run_id is not None and self.logger.experiment_id is not None
        RunRef(self.logger.run_id, self.logger.experiment_id, self.experiment).save(self.path)
        # Tagged again on resume: the hardware may differ, and the upstream data must be the same.
        self.logger.experiment.set_tag(
            self.logger.run_id,
            HARDWARE_TAG,
            hardware_tag(trainer.strategy.root_device.type, trainer.world_size, trainer.num_nodes),
        )
        log_lineage(self.logger.run_id, ("scenes", "tiles", "patches"))
        log_dataset_inputs(self.logger.run_id)
        # CPU, memory and GPU curves; a resumed run continues its steps (a new run starts at 0).
        self.system_metrics = start_system_metrics(self.logger.run_id, resume=True)
        if self.log_world_size:
            self.logger.log_hyperparams({"train.world_size": trainer.world_size})

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop_system_metrics()

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._stop_system_metrics()

    def _stop_system_metrics(self) -> None:
        monitor, self.system_metrics = self.system_metrics, None
        if monitor is not None:
            monitor.finish()  # before the run ends: the monitor logs while the run is RUNNING


def resolve_deterministic(deterministic: bool, accelerator: str) -> bool | str:
    """Trainer's `deterministic`: strict on CPU; on CUDA "warn", because some ops the decoders use
    (bilinear upsampling's backward) have no deterministic CUDA kernel and would raise."""
    if not deterministic:
        return False
    use_cuda = accelerator in ("gpu", "auto") and torch.cuda.is_available()
    return "warn" if use_cuda else True


def resolve_class_weights(cfg: TrainConfig, train_info: PatchFileInfo) -> list[float] | None:
    if cfg.class_weights == "none":
        return None
    if cfg.class_weights == "inverse_frequency":
        return patch_file_class_weights(train_info.path)
    return list(cfg.class_weights)


def train(params: Params, callbacks: Sequence[Callback] = ()) -> dict[str, float]:
    """Train on the HDF5 patches; write the checkpoints, the MLflow run reference and the history.

    `callbacks` are added to the trainer's (tests use it to interrupt a run). Returns the last
    epoch's metrics.
    """
    check_tracking_store()  # a remote store that cannot be used fails now, within its timeout
    check_choices(params)  # validation uses evaluate.tta and evaluate.blend
    registered = registered_model_name(params.tracking.registered_model, params)  # a bad name fails now
    cfg = params.train
    # Who is global rank 0 (the one that writes files and talks to MLflow), before the trainer says.
    rank_zero_only.rank = launch_rank(cfg.devices, cfg.accelerator)  # type: ignore[attr-defined]
    L.seed_everything(cfg.seed, workers=True)
    train_info = read_patch_info(params.paths.patches / "train.h5")
    val_info = read_tile_file_info(params.paths.patches / "val.h5")
    if val_info.bands != train_info.bands:
        raise ValueError(
            f"{val_info.path}: bands {val_info.bands}, but {train_info.path} has {train_info.bands}; "
            "rerun the `patches` stage"
        )
    # Outside `dvc repro` (a stage script run by hand) the patches may be of other params.
    for key, found, wanted in (
        ("data.bands", tuple(train_info.bands), tuple(params.data.bands)),
        ("patches.size_px", train_info.size, params.patches.size_px),
    ):
        if found != wanted:
            raise ValueError(
                f"{train_info.path}: written for {key} {found}, but params.yaml says {wanted}; "
                "rerun the `patches` stage (`dvc repro` does)"
            )
    check_input_size(train_info.size, train_info.size, params.model.arch)
    args = model_args(params.model.arch, params.model.encoder, len(train_info.bands), NUM_CLASSES)
    precision = resolve_training_precision(cfg.precision, cfg.accelerator)
    class_weights = resolve_class_weights(cfg, train_info)
    task = SegmentationTask(
        args,
        weights=cfg.pretrained,
        optimizer=cfg.optimizer,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        # On CPUs as well: never slower there in `make bench`; GPU tensor cores want NHWC.
        channels_last=True,
        loss=cfg.loss,
        class_weights=class_weights,
        scheduler=cfg.scheduler,
        compile=cfg.compile,
        decode=Decode.from_info(train_info),
        jitter=SpectralJitter(train_info.bands, train_info.stats.mean, train_info.stats.std)
        if cfg.augment
        else None,
        validation=Settings(
            window=train_info.size,
            overlap=params.evaluate.overlap,
            batch_size=cfg.batch_size,
            tta=params.evaluate.tta,
            blend=params.evaluate.blend,
        ),
    )
    out = params.paths.models
    ckpt_dir = out / CHECKPOINT_DIR
    # Everything that shapes the model; evaluate.* goes on the run as tags when `evaluate` runs.
    logged = {
        **flatten(params.model_dump(mode="json", exclude={"evaluate"})),
        **{f"validation.{k}": v for k, v in vars(task.validation).items()},
        "train.precision_resolved": precision,
        "train.class_weights_resolved": class_weights,
    }
    fingerprint = run_fingerprint(logged, [train_info.path, val_info.path])
    # A requeued Slurm job (preemption.py) continues its checkpoint whatever train.resume says.
    point = _resume_point(ckpt_dir, cfg.resume or restart_count() > 0, fingerprint)
    resume_from, run_id = point.checkpoint, point.run_id
    rank_zero = getattr(rank_zero_only, "rank", 0) == 0
    if rank_zero:
        # A run killed before (SIGKILL, a lost node) ends KILLED here at the latest; not the one
        # this run continues.
        end_dead_runs(params.tracking.experiment, keep=run_id)
    logger = _run_logger(params, run_id)
    clock = TrainClock(logger, _previous_seconds(run_id) if rank_zero else 0.0)
    preemption = Preemption.in_slurm_job(
        ckpt_dir / LAST_CHECKPOINT, lambda: logger.log_metrics({TRAIN_SECONDS: clock.total()})
    )
    with _run_status(logger, clock), preemption or contextlib.nullcontext():
        if run_id is None:
            # A resumed run keeps the parameters it was started with (MLflow refuses to change them;
            # the fingerprint made sure they are the same).
            logger.log_hyperparams(logged)
        elif isinstance(logger, MLFlowLogger):
            # This process owns the run now, and it runs again until _run_status ends it.
            for key, value in owner_tags().items():
                logger.experiment.set_tag(run_id, key, value)
            logger.experiment.update_run(run_id, status="RUNNING")
        # Both written at the end of each training epoch, after the task has added that epoch to its
        # history. Two callbacks, because Lightning's save_last only saves when the best one changes.
        best = ModelCheckpoint(
            dirpath=ckpt_dir, filename="best", monitor=MONITOR, mode="max", save_on_train_epoch_end=True
        )
        last = ModelCheckpoint(
            dirpath=ckpt_dir,
            filename=LAST_CHECKPOINT.removesuffix(".ckpt"),
            save_on_train_epoch_end=True,
            # Over a last.ckpt that Preemption saved mid-epoch, not beside it as last-v1.ckpt.
            enable_version_counter=False,
        )
        all_callbacks: list[Callback] = [
            best,
            last,
            RandomStreams(cfg.seed),
            # Lightning's bar on a terminal; one plain line per epoch in logs (DVC, Slurm).
            training_progress_bar(),
            RunReference(
                logger, ckpt_dir / RUN_REF, params.tracking.experiment, log_world_size=run_id is None
            ),
            Fingerprint(ckpt_dir / FINGERPRINT, fingerprint),
            clock,
            *([preemption] if preemption else []),
            *callbacks,
        ]
        if cfg.scheduler != "none":
            all_callbacks.append(LearningRateMonitor(logging_interval="epoch"))
        if cfg.early_stopping_patience is not None:
            all_callbacks.append(
                EarlyStopping(monitor=MONITOR, mode="max", patience=cfg.early_stopping_patience)
            )
        trainer = L.Trainer(
            # A finished run's checkpoint (early stopping included) is restored without training on.
            max_epochs=point.finished_epochs or cfg.epochs,
            accelerator=cfg.accelerator,
            devices=cfg.devices,
            num_nodes=cfg.num_nodes,
            strategy=cfg.strategy,
            precision=precision,  # type: ignore[arg-type]
            logger=logger,
            callbacks=all_callbacks,
            limit_train_batches=cfg.limit_train_batches or 1.0,
            log_every_n_steps=1,
            # No sanity check: it would predict a whole val tile before training, for nothing.
            num_sanity_val_steps=0,
            deterministic=resolve_deterministic(cfg.deterministic, cfg.accelerator),  # type: ignore[arg-type]
            use_distributed_sampler=False,  # PatchData shards the patches itself
            default_root_dir=str(out),
            # Checkpoints written beside their final name and renamed when complete, not via $TMPDIR.
            plugins=[AtomicCheckpointIO(), *([preemption.environment()] if preemption else [])],
        )
        clock.start()
        trainer.fit(
            task,
            datamodule=PatchData(train_info, val_info, cfg),
            ckpt_path=str(resume_from) if resume_from else None,
        )
        seconds = clock.total()
        final = {**(task.history[-1] if task.history else {}), TRAIN_SECONDS: seconds}
        # Rank 0 only, and nothing in here may be a collective call: the other ranks have left.
        if trainer.is_global_zero:
            assert isinstance(logger, MLFlowLogger)
            logger.log_metrics({TRAIN_SECONDS: seconds})
            network, epoch = _selected_network(task, args, best.best_model_path)
            selected_row = next((row for row in task.history if row["epoch"] == epoch), final)
            # The figures that chose the published model, for the leaderboard to rank by.
            logger.log_metrics(
                {
                    SELECTED_EPOCH: epoch,
                    **{selected(val(k)): selected_row[val(k)] for k in SCORES if val(k) in selected_row},
                }
            )
            card = ModelCard.for_training(
                args,
                bands=train_info.bands,
                mean=train_info.stats.mean,
                std=train_info.stats.std,
                window=train_info.size,
                config=params.model_dump(mode="json"),
                metrics={**selected_row, TRAIN_SECONDS: seconds},
            )
            save_checkpoint(out / "model.ckpt", network, card)
            pd.DataFrame(task.history).to_csv(out / "history.csv", index=False)
            assert logger.run_id is not None and logger.experiment_id is not None
            RunRef(logger.run_id, logger.experiment_id, params.tracking.experiment).save(out / RUN_REF)
            log_model(
                logger.run_id,
                network,
                card,
                # Registered now; the aliases move once `evaluate` has tested it.
                registered_model=registered,
            )
    return final


def _run_logger(params: Params, run_id: str | None) -> Logger:
    """The MLflow logger on rank 0; a no-op logger on the other ranks.

    Lightning's MLFlowLogger opens the store as soon as it exists, on every rank: processes
    started together (srun, torchrun) would all create the tables of a new SQLite store at
    once, and one dies of "duplicate column". Only rank 0 logs anyway.
    """
    # Before the trainer exists, rank_zero_only.rank comes from the launcher's environment.
    if getattr(rank_zero_only, "rank", 0) != 0:
        return DummyLogger()
    ensure_experiment(params.tracking.experiment)  # its artifacts in the project, not a temp copy
    return RunLogger(
        experiment_name=params.tracking.experiment,
        run_name=run_name(params.model.encoder),
        tracking_uri=tracking_uri(),
        tags={**run_tags(), **owner_tags()},
        log_model=False,
        run_id=run_id,
    )


class RunLogger(MLFlowLogger):
    """Lightning's MLflow logger, except that the end of `fit` does not end the run: `train` ends
    it FINISHED once the model is published (`_run_status`)."""

    def finalize(self, status: str = "success") -> None:
        # Lightning ends it FAILED on any error in fit, but a requeued job's run goes on.
        if status != "success" and not isinstance(sys.exception(), Requeued):
            super().finalize(status)


class TrainClock(Callback):
    """The run's `train_seconds`: the seconds of its earlier parts (a resumed run) plus this
    part's; logged at each epoch end too, so that the time of a part that dies is not lost."""

    def __init__(self, logger: Logger, before: float) -> None:
        self.logger, self.before = logger, before
        self.started: float | None = None

    def start(self) -> None:
        self.started = time.perf_counter()

    def total(self) -> float:
        return self.before + (time.perf_counter() - self.started if self.started is not None else 0.0)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            self.logger.log_metrics({TRAIN_SECONDS: self.total()})


def _previous_seconds(run_id: str | None) -> float:
    """The `train_seconds` that run `run_id` logged before (0 for a new run)."""
    if run_id is None:
        return 0.0
    from mlflow import MlflowClient

    return float(MlflowClient(tracking_uri()).get_run(run_id).data.metrics.get(TRAIN_SECONDS, 0.0))


@contextlib.contextmanager
def _run_status(logger: Logger, clock: TrainClock) -> Iterator[None]:
    """End the MLflow run when the block ends: FINISHED when it completes (the model published),
    KILLED on KeyboardInterrupt or SystemExit (Lightning's SIGTERM), FAILED on any other error;
    RUNNING on preemption.Requeued (the requeued Slurm job continues it)."""
    if not isinstance(logger, MLFlowLogger):
        yield
        return
    try:
        yield
    except Requeued:
        raise  # the run goes on in the requeued job (Preemption logged its train_seconds)
    except BaseException as err:
        if getattr(logger, "_initialized", False) and logger.run_id is not None:
            status = "KILLED" if isinstance(err, KeyboardInterrupt | SystemExit) else "FAILED"
            # Best effort: the error that ends the run is the one to report, not the store's.
            with contextlib.suppress(Exception):
                if clock.started is not None:
                    logger.log_metrics({TRAIN_SECONDS: clock.total()})
                logger.experiment.set_terminated(logger.run_id, status)
        raise
    assert logger.run_id is not None
    logger.experiment.set_terminated(logger.run_id, "FINISHED")


@dataclass(frozen=True)
class ResumePoint:
    """Where `train` starts: nothing (a fresh run), or a checkpoint and the MLflow run to continue.

    finished_epochs: set when the checkpoint's run already ended (all its epochs, or early
    stopping): it is restored and published again, nothing is trained.
    """

    checkpoint: Path | None = None
    run_id: str | None = None
    finished_epochs: int | None = None


def _resume_point(ckpt_dir: Path, resume: bool, fingerprint: dict[str, Any]) -> ResumePoint:
    """With `resume`, `last.ckpt` and its MLflow run when its `fingerprint.json` is `fingerprint`
    (the same result-changing params and data); otherwise a fresh run, with one line saying why
    a checkpoint there is not resumed.

    A checkpoint of other params or data is never continued: it would publish an old model under
    the new params and rewrite the old run's lineage, or fail on MLflow's params or the state dict.
    A fresh run clears the directory: DVC keeps it between runs (persist), and stale
    `last.ckpt`/`best.ckpt` files would make Lightning write `last-v1.ckpt` beside them.
    """
    last = ckpt_dir / LAST_CHECKPOINT
    # Before the trainer exists, rank_zero_only.rank comes from the launcher's environment.
    rank_zero = getattr(rank_zero_only, "rank", 0) == 0
    if resume:
        # The fingerprint first, then the checkpoint: rank 0 of a fresh run removes the checkpoint
        # before its own fingerprint is written, so no rank resumes a checkpoint being removed.
        differs = _fingerprint_differs(ckpt_dir / FINGERPRINT, fingerprint)
        if last.exists() and differs is None:
            ref = ckpt_dir / RUN_REF
            run_id = RunRef.load(ref).run_id if ref.exists() else None
            finished = _finished_epochs(last, int(fingerprint["params"]["train.epochs"]))
            if finished is not None and rank_zero:
                print(
                    f"train.resume: {last} finished its {finished} epochs with these params and data: "
                    "nothing to train, publishing it again under its MLflow run",
                    file=sys.stderr,
                    flush=True,
                )
            return ResumePoint(last, run_id, finished)
        if last.exists() and rank_zero:
            print(f"train.resume: {last} {differs}: starting a new run", file=sys.stderr, flush=True)
    if rank_zero:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    return ResumePoint()


class Fingerprint(Callback):
    """Rank 0 writes the run's fingerprint (`run_fingerprint`) beside the checkpoints when training
    starts, before the first checkpoint: `train.resume` continues only a checkpoint whose
    fingerprint is that of the new run."""

    def __init__(self, path: Path, fingerprint: dict[str, Any]) -> None:
        self.path, self.fingerprint = path, fingerprint

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            with atomic_path(self.path) as tmp:
                tmp.write_text(json.dumps(self.fingerprint, indent=2, sort_keys=True) + "\n")


def run_fingerprint(logged: dict[str, Any], files: Sequence[Path]) -> dict[str, Any]:
    """What a run's result depends on: its logged params that can change it (not those of
    config.NOT_RESULTS, nor `paths.*`: where the files are is not what they hold), and a digest
    of each input file's content (`file_digest`), by file name."""

    def counts(key: str) -> bool:
        return not any(key == name or key.startswith(f"{name}.") for name in (*NOT_RESULTS, "paths"))

    # Through JSON, so that the values compare equal to those read back from fingerprint.json.
    result = json.loads(json.dumps({k: v for k, v in logged.items() if counts(k)}, default=str))
    return {"params": result, "data": {Path(f).name: file_digest(Path(f)) for f in files}}


DIGEST_BYTES = 16 * 2**20
"""A dataset up to this size is digested whole; a larger one by DIGEST_CHUNKS of its chunks."""
DIGEST_CHUNKS = 32


def file_digest(path: Path) -> str:
    """SHA-256 of an HDF5 file's content, without reading a large file whole: its attributes,
    every dataset's name, type and shape, and each dataset's values - whole up to DIGEST_BYTES,
    else DIGEST_CHUNKS of its chunks spread evenly (the first and the last included). Independent
    of modification times and of how the file was copied (`dvc checkout`, a copy, a link)."""
    digest = hashlib.sha256()

    def add(*parts: Any) -> None:
        for part in parts:
            digest.update(part if isinstance(part, bytes) else repr(part).encode())

    with open_h5(path) as h5:
        for name in sorted(h5.attrs):
            value = np.asarray(h5.attrs[name])
            add(name, value.dtype.str, value.shape, value.tobytes())
        datasets: list[str] = []
        h5.visititems(lambda name, obj: datasets.append(name) if isinstance(obj, h5py.Dataset) else None)
        for name in sorted(datasets):
            ds = h5[name]
            add(name, ds.dtype.str, ds.shape)
            for block in _digest_blocks(ds):
                add(np.ascontiguousarray(ds[block]).tobytes())
    return digest.hexdigest()


def _digest_blocks(ds: h5py.Dataset) -> list[tuple[slice, ...]]:
    """The parts of `ds` that file_digest reads: all of it, or DIGEST_CHUNKS chunks spread evenly."""
    whole = tuple(slice(0, n) for n in ds.shape)
    if ds.nbytes <= DIGEST_BYTES or ds.chunks is None or ds.size == 0:
        return [whole]
    grid = [-(-n // c) for n, c in zip(ds.shape, ds.chunks, strict=True)]
    picks = np.unique(np.linspace(0, int(np.prod(grid)) - 1, DIGEST_CHUNKS).round().astype(np.int64))
    blocks = []
    for pick in picks:
        corner = np.unravel_index(int(pick), grid)
        blocks.append(
            tuple(
                slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(corner, ds.chunks, ds.shape, strict=True)
            )
        )
    return blocks


def _fingerprint_differs(path: Path, fingerprint: dict[str, Any]) -> str | None:
    """None when `path` holds `fingerprint`; else what differs, as the rest of a sentence about
    the checkpoint (`was trained with train.lr 0.001 (now 0.01)`)."""
    try:
        old = json.loads(path.read_text())
    except FileNotFoundError:
        return f"has no {path.name} beside it (its params and data are unknown)"
    except (OSError, ValueError) as err:
        return f"has an unreadable {path.name} beside it ({err})"
    if (
        not isinstance(old, dict)
        or not isinstance(old.get("params"), dict)
        or not isinstance(old.get("data"), dict)
    ):
        return f"has an unreadable {path.name} beside it (not a fingerprint)"
    before, now = old["params"], fingerprint["params"]
    changed = [
        f"{key} {_shown(before.get(key))} (now {_shown(now.get(key))})"
        for key in sorted(before.keys() | now.keys())
        if before.get(key) != now.get(key)
    ]
    if len(changed) > 3:
        changed = [*changed[:3], f"{len(changed) - 3} more"]
    files = sorted(
        name
        for name in old["data"].keys() | fingerprint["data"].keys()
        if old["data"].get(name) != fingerprint["data"].get(name)
    )
    reasons = []
    if changed:
        reasons.append("was trained with " + ", ".join(changed))
    if files:
        reasons.append(f"was trained on other patches ({', '.join(files)} not the same)")
    return " and ".join(reasons) or None


def _shown(value: Any) -> str:
    return "unset" if value is None else value if isinstance(value, str) else json.dumps(value)


def _finished_epochs(last: Path, epochs: int) -> int | None:
    """The number of epochs `last` holds when its run ended (all `epochs`, or stopped early); None
    when there is training left to do."""
    try:
        payload = torch.load(last, map_location="cpu", weights_only=True, mmap=True)
        # A checkpoint saved between two batches (preemption.Preemption) has its epoch to finish:
        # Lightning counts that epoch started, not yet processed.
        progress = payload.get("loops", {}).get("fit_loop", {}).get("epoch_progress", {}).get("current", {})
        done = int(payload["epoch"]) + 1 - int(progress.get("started", 0) > progress.get("processed", 0))
    except Exception as err:  # a truncated or foreign file: say which, never a pickling lecture
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"{last}: not a readable Lightning checkpoint ({detail}); "
            "delete it, or set train.resume false to start a new run"
        ) from err
    stopped = any(
        key.startswith("EarlyStopping") and isinstance(state, dict) and state.get("stopped_epoch", 0) > 0
        for key, state in payload.get("callbacks", {}).items()
    )
    return done if done >= epochs or stopped else None


def _selected_network(task: SegmentationTask, args: dict[str, Any], best: str) -> tuple[nn.Module, float]:
    """A plain (uncompiled, fp32, CPU) copy of the network to publish, and the epoch it comes from:
    the best epoch by val_mean_f1 when a best checkpoint exists, else the last one."""
    network = build_model(args)
    if best and Path(best).exists():
        payload = torch.load(best, map_location="cpu", weights_only=True)
        prefix = "model."
        weights = {k[len(prefix) :]: v for k, v in payload["state_dict"].items() if k.startswith(prefix)}
        network.load_state_dict(weights)
        return network.eval(), float(payload["epoch"])
    network.load_state_dict({k: v.detach().cpu() for k, v in task.model.state_dict().items()})
    return network.eval(), task.history[-1]["epoch"] if task.history else -1.0
