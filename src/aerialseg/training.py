"""Training with PyTorch Lightning: the losses, the task, the trainer, and the checkpoints.

Layout under `paths.models`:
- `model.ckpt`: the self-describing checkpoint (best epoch by val_mean_f1), read by `evaluate`;
- `history.csv`, `mlflow_run.json`: per-epoch metrics and the MLflow run (DVC outputs);
- `checkpoints/`: Lightning's `last.ckpt` and `best.ckpt`, plus `mlflow_run.json`, which
  `train.resume` continues from (the training run and its MLflow run).

Only global rank 0 writes files or talks to MLflow, so a DDP run yields one run and one set of files.
"""

from __future__ import annotations

import random
import shutil
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import h5py
import lightning as L
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.utilities import rank_zero_only
from segmentation_models_pytorch.losses import DiceLoss, FocalLoss
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from torchmetrics.classification import MulticlassConfusionMatrix

from aerialseg.checkpoint import save_checkpoint
from aerialseg.classes import CLASS_NAMES, IGNORE_INDEX, NUM_CLASSES
from aerialseg.config import Params, Precision, TrainConfig
from aerialseg.data import PatchDataset
from aerialseg.metrics import scores
from aerialseg.model import build_model, check_input_size, model_args
from aerialseg.patches import PatchFileInfo, read_patch_info
from aerialseg.tracking import RunRef, flatten, run_name, run_tags, tracking_uri

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "rmsprop": torch.optim.RMSprop,
    "adagrad": torch.optim.Adagrad,
    "adadelta": torch.optim.Adadelta,
    "adam": torch.optim.Adam,
    "adamax": torch.optim.Adamax,
    "adamw": torch.optim.AdamW,
}
SCHEDULERS = ("none", "cosine", "onecycle", "plateau")
MONITOR = "val_mean_f1"
"""The metric that picks the best checkpoint, drives early stopping and the plateau scheduler."""
CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
RUN_REF = "mlflow_run.json"
HISTORY_KEY = "aerialseg_history"


# ---------------------------------------------------------------- losses and class weights

LOSSES = ("ce", "dice", "focal", "ce+dice")


class SumLoss(nn.Module):
    """The sum of several losses on the same logits and targets (e.g. CE + Dice)."""

    def __init__(self, *losses: nn.Module) -> None:
        super().__init__()
        self.losses = nn.ModuleList(losses)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.stack([loss(logits, target) for loss in self.losses]).sum()


def build_loss(name: str, class_weights: Sequence[float] | None = None) -> nn.Module:
    """The loss `name`; `class_weights` weight the cross-entropy part (Dice and focal ignore them)."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose from {list(LOSSES)}")
    if class_weights is not None and name not in ("ce", "ce+dice"):
        raise ValueError(f"class weights apply to the cross-entropy part of the loss; {name!r} has none")
    weight = None if class_weights is None else torch.tensor(list(class_weights), dtype=torch.float32)
    # nn.CrossEntropyLoss keeps `weight` as a buffer, so it follows the module to the GPU.
    ce = nn.CrossEntropyLoss(weight=weight, ignore_index=IGNORE_INDEX)
    if name == "ce":
        return ce
    dice = DiceLoss(mode="multiclass", ignore_index=IGNORE_INDEX)
    if name == "dice":
        return dice
    if name == "focal":
        return FocalLoss(mode="multiclass", ignore_index=IGNORE_INDEX)
    return SumLoss(ce, dice)


def class_counts(masks: Iterable[np.ndarray], num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Pixels per class over `masks`; the ignore label (and anything >= num_classes) is not counted."""
    counts = np.zeros(num_classes, dtype=np.int64)
    for mask in masks:
        values = np.asarray(mask).ravel()
        counts += np.bincount(values[values < num_classes], minlength=num_classes)[:num_classes]
    return counts


def inverse_frequency_weights(counts: np.ndarray) -> list[float]:
    """Weights proportional to 1 / class frequency, with mean 1 over the classes that occur.

    A class with no pixels never appears in a target, so its weight cannot matter: it gets 0
    rather than an infinite weight that would poison the normalisation.
    """
    counts = np.asarray(counts, dtype=np.float64)
    present = counts > 0
    if not present.any():
        raise ValueError("class weights: the masks contain no labelled pixel")
    weights = np.zeros_like(counts)
    weights[present] = counts[present].sum() / counts[present]
    weights[present] /= weights[present].mean()
    return [float(w) for w in weights]


def patch_file_class_weights(path: Path, chunk: int = 64) -> list[float]:
    """Inverse-frequency weights from the masks of an HDF5 patch file, read `chunk` patches at a time."""
    with h5py.File(path, "r") as f:
        masks = f["mask"]
        chunks = (masks[i : i + chunk] for i in range(0, len(masks), chunk))
        return inverse_frequency_weights(class_counts(chunks))


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
    ) -> None:
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {optimizer!r}; choose from {list(OPTIMIZERS)}")
        if scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {scheduler!r}; choose from {list(SCHEDULERS)}")
        self.save_hyperparameters()
        self.model = build_model(args, weights)
        self.loss = build_loss(loss, class_weights)
        # torchmetrics sums the matrix over DDP ranks, so every val pixel counts once.
        self.val_confusion = MulticlassConfusionMatrix(args["classes"], ignore_index=IGNORE_INDEX)
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
        loss = self.loss(self(batch["image"]), batch["mask"])
        self.log(
            "train_loss",
            loss,
            on_step=False,
            on_epoch=True,
            prog_bar=True,
            sync_dist=True,
            batch_size=len(batch["mask"]),
        )
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits = self(batch["image"])
        loss = self.loss(logits, batch["mask"])
        self.log(
            "val_loss", loss, on_epoch=True, prog_bar=True, sync_dist=True, batch_size=len(batch["mask"])
        )
        self.val_confusion.update(logits.argmax(dim=1), batch["mask"])

    def on_validation_epoch_end(self) -> None:
        # compute() gathers the matrix from every rank: the same values on all of them.
        cm = self.val_confusion.compute().cpu().numpy()
        self.val_confusion.reset()
        result = scores(cm, CLASS_NAMES[: cm.shape[0]])
        for key in ("overall_accuracy", "mean_f1", "miou", "kappa"):
            if result[key] is not None:
                self.log(f"val_{key}", float(result[key]), prog_bar=key == "mean_f1")
        # How many pixels were scored: a DDP run must count each val pixel exactly once.
        self.log("val_pixels", float(cm.sum()))

    def on_train_epoch_end(self) -> None:
        # Runs after validation in Lightning 2.x, so the epoch's val metrics are in here too.
        if self.trainer.sanity_checking:
            return
        metrics = {
            k: float(v) for k, v in self.trainer.callback_metrics.items() if k.startswith(("train_", "val_"))
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
        name = self.hparams["scheduler"]
        if name == "none":
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self._scheduler(name, optimizer)}

    def _scheduler(self, name: str, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Lightning's scheduler config: what to step, how often, and on which metric."""
        sched = torch.optim.lr_scheduler
        if name == "cosine":
            return {"scheduler": sched.CosineAnnealingLR(optimizer, T_max=self.trainer.max_epochs or 1)}
        if name == "onecycle":
            # Momentum cycling only where the optimizer has a momentum to cycle.
            defaults = optimizer.defaults
            cycle = "betas" in defaults or defaults.get("momentum", 0) > 0
            onecycle = sched.OneCycleLR(
                optimizer,
                max_lr=self.hparams["lr"],
                total_steps=max(1, int(self.trainer.estimated_stepping_batches)),
                cycle_momentum=cycle,
            )
            return {"scheduler": onecycle, "interval": "step"}
        # plateau: halve the rate after 2 epochs without a better val_mean_f1.
        plateau = sched.ReduceLROnPlateau(optimizer, mode="max", factor=0.5, patience=2)
        return {"scheduler": plateau, "monitor": MONITOR, "interval": "epoch"}


def build_optimizer(parameters: Any, name: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    cls = OPTIMIZERS[name]
    kwargs: dict[str, Any] = {"lr": lr, "weight_decay": weight_decay}
    if cls is torch.optim.SGD:
        kwargs["momentum"] = 0.9
    return cls(parameters, **kwargs)


class PatchData(L.LightningDataModule):
    """Train and val loaders whose samplers shard the patches over the DDP ranks.

    Built here rather than by Lightning (use_distributed_sampler=False) for two reasons: the
    val sampler must not pad the last shard with repeated patches, which would count some
    val pixels twice; and the train order must depend only on (seed, epoch), so that a resumed
    run sees the same batches as an uninterrupted one.
    """

    def __init__(self, train: PatchFileInfo, val: PatchFileInfo, cfg: TrainConfig) -> None:
        super().__init__()
        self.train_info, self.val_info, self.cfg = train, val, cfg

    def train_dataloader(self) -> DataLoader[Any]:
        dataset = PatchDataset(self.train_info.path, augment=self.cfg.augment)
        sampler: DistributedSampler[Any] = DistributedSampler(
            dataset, num_replicas=self._world(), rank=self._rank(), shuffle=True, seed=self.cfg.seed
        )
        return self._loader(dataset, sampler)

    def val_dataloader(self) -> DataLoader[Any]:
        dataset = PatchDataset(self.val_info.path, augment=False)
        sampler = UnrepeatedDistributedSampler(
            dataset, num_replicas=self._world(), rank=self._rank(), shuffle=False
        )
        return self._loader(dataset, sampler)

    def _loader(self, dataset: PatchDataset, sampler: DistributedSampler[Any]) -> DataLoader[Any]:
        workers = self.cfg.num_workers
        return DataLoader(
            dataset,
            batch_size=self.cfg.batch_size,
            sampler=sampler,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def _world(self) -> int:
        return self.trainer.world_size if self.trainer is not None else 1

    def _rank(self) -> int:
        return self.trainer.global_rank if self.trainer is not None else 0


class RandomStreams(Callback):
    """Reseed the random generators from (seed, epoch[, batch], rank) as training goes.

    Each epoch's augmentation and each batch's dropout then depend on where training is, not
    on how many random numbers earlier epochs, validation or the DataLoader drew; so a run
    resumed from an epoch's checkpoint repeats the uninterrupted run exactly (with
    num_workers 0: persistent DataLoader workers keep their own streams). Ranks get different
    streams.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch_seed = self._reseed(trainer.current_epoch, trainer.global_rank)
        # With num_workers 0 the augmentation runs in this process; PatchDataset seeds it from
        # torch.initial_seed() when it first reads, which _reseed just made epoch_seed too.
        dataset = getattr(trainer.train_dataloader, "dataset", None)
        augment = getattr(dataset, "augment", None)
        if augment is not None:
            augment.set_random_seed(epoch_seed)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # Lightning creates the epoch's DataLoader iterator (which draws a seed from torch's
        # generator) at different points in fresh and resumed runs: reseed after it, per batch.
        # (batch_idx + 1: a trailing 0 would give the epoch's own seed, SeedSequence pads with zeros.)
        self._reseed(trainer.current_epoch, trainer.global_rank, batch_idx + 1)

    def _reseed(self, *where: int) -> int:
        seed = int(np.random.SeedSequence([self.seed, *where]).generate_state(1)[0])
        random.seed(seed)
        np.random.seed(seed)  # noqa: NPY002 - the global generator that libraries draw from
        torch.manual_seed(seed)
        return seed


class RunReference(Callback):
    """Rank 0 writes the MLflow run id next to the checkpoints as soon as training starts,
    so that a crashed run can be resumed into the same MLflow run."""

    def __init__(self, logger: MLFlowLogger, path: Path, experiment: str, log_world_size: bool) -> None:
        self.logger, self.path, self.experiment = logger, path, experiment
        self.log_world_size = log_world_size

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        assert self.logger.run_id is not None and self.logger.experiment_id is not None
        RunRef(self.logger.run_id, self.logger.experiment_id, self.experiment).save(self.path)
        if self.log_world_size:
            self.logger.log_hyperparams({"train.world_size": trainer.world_size})


def resolve_precision(precision: Precision, accelerator: str) -> str:
    """`auto` picks bfloat16 autocast where the hardware runs it natively, else fp32."""
    if precision != "auto":
        return precision
    use_cuda = accelerator in ("gpu", "auto") and torch.cuda.is_available()
    if use_cuda:
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "bf16-mixed" if cpu_has_native_bf16() else "32"


def cpu_has_native_bf16() -> bool:
    cpu = torch.cpu
    return bool(cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported())


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
    cfg = params.train
    L.seed_everything(cfg.seed, workers=True)
    train_info = read_patch_info(params.paths.patches / "train.h5")
    val_info = read_patch_info(params.paths.patches / "val.h5")
    check_input_size(train_info.size, train_info.size)
    args = model_args(params.model.arch, params.model.encoder, len(train_info.bands), NUM_CLASSES)
    precision = resolve_precision(cfg.precision, cfg.accelerator)
    class_weights = resolve_class_weights(cfg, train_info)
    task = SegmentationTask(
        args,
        weights=cfg.pretrained,
        optimizer=cfg.optimizer,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        channels_last=precision != "32" or torch.cuda.is_available(),
        loss=cfg.loss,
        class_weights=class_weights,
        scheduler=cfg.scheduler,
        compile=cfg.compile,
    )
    out = params.paths.models
    ckpt_dir = out / CHECKPOINT_DIR
    resume_from, run_id = _resume_point(ckpt_dir, cfg.resume)
    logger = MLFlowLogger(
        experiment_name=params.tracking.experiment,
        run_name=run_name(params.model.encoder),
        tracking_uri=tracking_uri(),
        tags=run_tags(),
        log_model=False,
        run_id=run_id,
    )
    if run_id is None:
        # Everything that shapes the model; evaluate.* goes on the run as tags when `evaluate` runs.
        # A resumed run keeps the parameters it was started with (MLflow refuses to change them).
        logged = flatten(params.model_dump(mode="json", exclude={"evaluate"}))
        logger.log_hyperparams(
            {**logged, "train.precision_resolved": precision, "train.class_weights_resolved": class_weights}
        )
    # Both written at the end of each training epoch, after the task has added that epoch to its
    # history. Two callbacks, because Lightning's save_last only saves when the best one changes.
    best = ModelCheckpoint(
        dirpath=ckpt_dir, filename="best", monitor=MONITOR, mode="max", save_on_train_epoch_end=True
    )
    last = ModelCheckpoint(
        dirpath=ckpt_dir, filename=LAST_CHECKPOINT.removesuffix(".ckpt"), save_on_train_epoch_end=True
    )
    all_callbacks: list[Callback] = [
        best,
        last,
        RandomStreams(cfg.seed),
        RunReference(logger, ckpt_dir / RUN_REF, params.tracking.experiment, log_world_size=run_id is None),
        *callbacks,
    ]
    if cfg.scheduler != "none":
        all_callbacks.append(LearningRateMonitor(logging_interval="epoch"))
    if cfg.early_stopping_patience is not None:
        all_callbacks.append(EarlyStopping(monitor=MONITOR, mode="max", patience=cfg.early_stopping_patience))
    trainer = L.Trainer(
        max_epochs=cfg.epochs,
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        num_nodes=cfg.num_nodes,
        strategy=cfg.strategy,
        precision=precision,  # type: ignore[arg-type]
        logger=logger,
        callbacks=all_callbacks,
        limit_train_batches=cfg.limit_train_batches or 1.0,
        log_every_n_steps=1,
        deterministic=resolve_deterministic(cfg.deterministic, cfg.accelerator),  # type: ignore[arg-type]
        use_distributed_sampler=False,  # PatchData shards the patches itself
        default_root_dir=str(out),
    )
    started = time.perf_counter()
    trainer.fit(
        task,
        datamodule=PatchData(train_info, val_info, cfg),
        ckpt_path=str(resume_from) if resume_from else None,
    )
    seconds = time.perf_counter() - started
    final = {**(task.history[-1] if task.history else {}), "train_seconds": seconds}
    # Rank 0 only, and nothing in here may be a collective call: the other ranks have left.
    if trainer.is_global_zero:
        logger.log_metrics({"train_seconds": seconds})
        network, epoch = _selected_network(task, args, best.best_model_path)
        selected = next((row for row in task.history if row["epoch"] == epoch), final)
        save_checkpoint(
            out / "model.ckpt",
            network,
            args,
            bands=train_info.bands,
            stats=train_info.stats,
            patch_size=train_info.size,
            config=params.model_dump(mode="json"),
            metrics={**selected, "train_seconds": seconds},
        )
        pd.DataFrame(task.history).to_csv(out / "history.csv", index=False)
        assert logger.run_id is not None and logger.experiment_id is not None
        RunRef(logger.run_id, logger.experiment_id, params.tracking.experiment).save(out / RUN_REF)
        _log_model(logger, network, train_info)
    return final


def _resume_point(ckpt_dir: Path, resume: bool) -> tuple[Path | None, str | None]:
    """(checkpoint to resume from, MLflow run id to continue); (None, None) for a fresh run.

    A fresh run clears the directory: DVC keeps it between runs (persist), and stale
    `last.ckpt`/`best.ckpt` files would make Lightning write `last-v1.ckpt` beside them.
    """
    last = ckpt_dir / LAST_CHECKPOINT
    if resume and last.exists():
        ref = ckpt_dir / RUN_REF
        return last, RunRef.load(ref).run_id if ref.exists() else None
    # Before the trainer exists, rank_zero_only.rank comes from the launcher's environment.
    if getattr(rank_zero_only, "rank", 0) == 0:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    return None, None


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


def _log_model(logger: MLFlowLogger, model: nn.Module, info: PatchFileInfo) -> None:
    import mlflow
    from mlflow.models import infer_signature

    model = model.float().to(memory_format=torch.contiguous_format).cpu().eval()
    example = np.zeros((1, len(info.bands), info.size, info.size), dtype=np.float32)
    with torch.no_grad():
        output = model(torch.from_numpy(example)).numpy()
    mlflow.set_tracking_uri(tracking_uri())
    with mlflow.start_run(run_id=logger.run_id):
        # Pickle, not MLflow's traced pt2 default: a traced graph fixes the input size, and
        # whole-tile prediction needs any size that is a multiple of 32.
        mlflow.pytorch.log_model(
            model, name="model", signature=infer_signature(example, output), serialization_format="pickle"
        )
