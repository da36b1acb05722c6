"""Training with PyTorch Lightning: the task, the trainer, and the self-describing checkpoint."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import pandas as pd
import torch
from lightning.pytorch.loggers import MLFlowLogger
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassConfusionMatrix

from aerialseg.checkpoint import save_checkpoint
from aerialseg.classes import CLASS_NAMES, IGNORE_INDEX, NUM_CLASSES
from aerialseg.config import Params, Precision
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


class SegmentationTask(L.LightningModule):
    """Cross-entropy training of an smp network; validation by one confusion matrix per epoch."""

    def __init__(
        self,
        args: dict[str, Any],
        *,
        weights: str = "none",
        optimizer: str = "adamw",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = build_model(args, weights)
        self.loss = nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)
        # torchmetrics sums the matrix over DDP ranks, so every val pixel counts once.
        self.val_confusion = MulticlassConfusionMatrix(args["classes"], ignore_index=IGNORE_INDEX)
        self.channels_last = channels_last
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.history: list[dict[str, float]] = []

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        return self.model(image)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.loss(self(batch["image"]), batch["mask"])
        self.log(
            "train_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(batch["mask"])
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
        cm = self.val_confusion.compute().cpu().numpy()
        self.val_confusion.reset()
        result = scores(cm, CLASS_NAMES[: cm.shape[0]])
        for key in ("overall_accuracy", "mean_f1", "miou", "kappa"):
            if result[key] is not None:
                self.log(f"val_{key}", float(result[key]), prog_bar=key == "mean_f1")

    def on_train_epoch_end(self) -> None:
        # Runs after validation in Lightning 2.x, so the epoch's val metrics are in here too.
        if self.trainer.sanity_checking:
            return
        metrics = {
            k: float(v) for k, v in self.trainer.callback_metrics.items() if k.startswith(("train_", "val_"))
        }
        self.history.append({"epoch": float(self.current_epoch), **metrics})

    def configure_optimizers(self) -> torch.optim.Optimizer:
        cls = OPTIMIZERS[self.hparams["optimizer"]]
        kwargs: dict[str, Any] = {"lr": self.hparams["lr"], "weight_decay": self.hparams["weight_decay"]}
        if cls is torch.optim.SGD:
            kwargs["momentum"] = 0.9
        return cls(self.parameters(), **kwargs)


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


def train(params: Params) -> dict[str, float]:
    """Train on the HDF5 patches; write the checkpoint, the MLflow run reference and the history.

    Returns the last epoch's metrics.
    """
    cfg = params.train
    L.seed_everything(cfg.seed, workers=True)
    train_info = read_patch_info(params.paths.patches / "train.h5")
    val_info = read_patch_info(params.paths.patches / "val.h5")
    check_input_size(train_info.size, train_info.size)
    args = model_args(params.model.arch, params.model.encoder, len(train_info.bands), NUM_CLASSES)
    precision = resolve_precision(cfg.precision, cfg.accelerator)
    task = SegmentationTask(
        args,
        weights=cfg.pretrained,
        optimizer=cfg.optimizer,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        channels_last=precision != "32" or torch.cuda.is_available(),
    )
    logger = MLFlowLogger(
        experiment_name=params.tracking.experiment,
        run_name=run_name(params.model.encoder),
        tracking_uri=tracking_uri(),
        tags=run_tags(),
        log_model=False,
    )
    # Everything that shapes the model; evaluate.* goes on the run as tags when `evaluate` runs.
    logged = flatten(params.model_dump(mode="json", exclude={"evaluate"}))
    logger.log_hyperparams({**logged, "train.precision_resolved": precision})
    trainer = L.Trainer(
        max_epochs=cfg.epochs,
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        precision=precision,  # type: ignore[arg-type]
        logger=logger,
        enable_checkpointing=False,
        limit_train_batches=cfg.limit_train_batches or 1.0,
        log_every_n_steps=1,
        deterministic=False,
        default_root_dir=str(params.paths.models),
    )
    started = time.perf_counter()
    trainer.fit(
        task,
        _loader(train_info, cfg.batch_size, cfg.num_workers, augment=cfg.augment),
        _loader(val_info, cfg.batch_size, cfg.num_workers, augment=False),
    )
    seconds = time.perf_counter() - started
    final = {**(task.history[-1] if task.history else {}), "train_seconds": seconds}
    if trainer.is_global_zero:
        logger.log_metrics({"train_seconds": seconds})
        out = params.paths.models
        save_checkpoint(
            out / "model.ckpt",
            task.model,
            args,
            bands=train_info.bands,
            stats=train_info.stats,
            patch_size=train_info.size,
            config=params.model_dump(mode="json"),
            metrics=final,
        )
        pd.DataFrame(task.history).to_csv(out / "history.csv", index=False)
        assert logger.run_id is not None and logger.experiment_id is not None
        RunRef(logger.run_id, logger.experiment_id, params.tracking.experiment).save(out / "mlflow_run.json")
        _log_model(logger, task.model, train_info)
    return final


def _loader(info: PatchFileInfo, batch_size: int, workers: int, *, augment: bool) -> DataLoader[Any]:
    return DataLoader(
        PatchDataset(info.path, augment=augment),
        batch_size=batch_size,
        shuffle=augment,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=torch.cuda.is_available(),
    )


def _log_model(logger: MLFlowLogger, model: nn.Module, info: PatchFileInfo) -> None:
    import mlflow
    import numpy as np
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
