"""The training engine: losses, class weights, optimizers, schedulers, determinism and resume."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
from pydantic import ValidationError

from aerialseg.checkpoint import load_checkpoint
from aerialseg.choices import check_choices
from aerialseg.classes import IGNORE_INDEX, NUM_CLASSES
from aerialseg.config import ConfigError, Params, TrainConfig
from aerialseg.inference import Settings
from aerialseg.losses import class_counts, inverse_frequency_weights, patch_file_class_weights
from aerialseg.model import model_args
from aerialseg.training import OPTIMIZERS, SegmentationTask, train

# ---------------------------------------------------------------- class weights and config


def test_inverse_frequency_weights_are_larger_for_rarer_classes() -> None:
    # Class 0 is common, 4 is rare, 5 absent; 255 (ignored) must not count as anything.
    mask = np.full((10, 10), IGNORE_INDEX, dtype=np.uint8)
    mask.flat[:50] = 0
    mask.flat[50:70] = 1
    mask.flat[70:80] = 2
    mask.flat[80:85] = 3
    mask.flat[85:87] = 4
    counts = class_counts([mask, mask])
    assert counts.tolist() == [100, 40, 20, 10, 4, 0]

    weights = inverse_frequency_weights(counts)

    present = weights[:5]
    assert np.all(np.diff(present) > 0)
    assert np.isclose(np.mean(present), 1.0)
    assert weights[5] == 0.0
    # Inverse frequency: the weight ratio is the count ratio, inverted.
    assert np.isclose(weights[4] / weights[0], 100 / 4)


def test_inverse_frequency_weights_of_a_patch_file(patches_dir: Path) -> None:
    import h5py

    with h5py.File(patches_dir / "train.h5", "r") as f:
        masks = f["mask"][:]
    counts = class_counts([masks])
    weights = np.asarray(patch_file_class_weights(patches_dir / "train.h5", chunk=5))
    present = counts > 0
    order = np.argsort(counts[present])
    assert np.all(np.diff(weights[present][order]) <= 0)
    assert np.isclose(weights[present].mean(), 1.0)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"class_weights": [1.0, 2.0]}, "expected one per class"),
        ({"strategy": "fsdp"}, "strategy"),
        ({"num_nodes": 0}, "num_nodes"),
        ({"early_stopping_patience": 0}, "early_stopping_patience"),
    ],
)
def test_train_config_rejects_bad_values(values: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        TrainConfig.model_validate(values)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"loss": "dice", "class_weights": "inverse_frequency"}, "cross-entropy part"),
        ({"loss": "hinge"}, "train.loss: 'hinge' is not a loss"),
        ({"scheduler": "step"}, "train.scheduler: 'step' is not a scheduler"),
    ],
)
def test_train_choices_are_checked_against_their_registries(values: dict[str, Any], message: str) -> None:
    """The params stage's check (aerialseg.choices), which train runs again before it starts."""
    params = Params.model_validate({"data": {"val_tiles": [3], "test_tiles": [4]}, "train": values})
    with pytest.raises(ConfigError, match=message):
        check_choices(params)


def test_train_config_defaults_keep_the_previous_behaviour() -> None:
    cfg = TrainConfig()
    assert (cfg.strategy, cfg.num_nodes, cfg.deterministic, cfg.compile, cfg.resume) == (
        "auto",
        1,
        False,
        False,
        False,
    )
    assert (cfg.loss, cfg.class_weights, cfg.scheduler, cfg.early_stopping_patience) == (
        "ce",
        "none",
        "none",
        None,
    )
    assert TrainConfig(class_weights=[1, 2, 3, 4, 5, 6]).class_weights == (1.0, 2.0, 3.0, 4.0, 5.0, 6.0)


# ---------------------------------------------------------------- one step of each piece


def _batches(n: int = 2) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    samples = []
    for _ in range(n):
        mask = torch.randint(0, NUM_CLASSES, (32, 32), generator=gen)
        mask[:4] = IGNORE_INDEX
        samples.append({"image": torch.randn(4, 32, 32, generator=gen), "mask": mask})
    return samples


def _val_tiles() -> list[dict[str, Any]]:
    """One whole val tile, as data.ValidationTiles yields it (numpy, not batched)."""
    rng = np.random.default_rng(0)
    reference = rng.integers(0, NUM_CLASSES, (48, 48), dtype=np.uint8)
    reference[:4] = IGNORE_INDEX
    return [
        {"tile": "t", "image": rng.standard_normal((4, 48, 48), dtype=np.float32), "reference": reference}
    ]


def _fit_one_batch(task: SegmentationTask) -> L.Trainer:
    loader = torch.utils.data.DataLoader(_batches(), batch_size=2)
    val = torch.utils.data.DataLoader(_val_tiles(), batch_size=None, collate_fn=lambda item: item)
    trainer = L.Trainer(
        max_epochs=1,
        limit_train_batches=1,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(task, loader, val)
    return trainer


def _task(**kwargs: Any) -> SegmentationTask:
    torch.manual_seed(0)
    args = model_args("fpn", "resnet18", 4, NUM_CLASSES)
    return SegmentationTask(args, validation=Settings(window=32, overlap=0.5), **kwargs)


def _fit_and_check_weights_moved(task: SegmentationTask) -> L.Trainer:
    before = {k: v.clone() for k, v in task.model.state_dict().items()}
    trainer = _fit_one_batch(task)
    after = task.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before), "no weight changed"
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    return trainer


@pytest.mark.parametrize("loss", ["ce", "dice", "focal", "ce+dice"])
def test_each_loss_trains_one_step(loss: str) -> None:
    weights = [1.0, 2.0, 1.0, 1.0, 3.0, 0.5] if loss in ("ce", "ce+dice") else None
    task = _task(loss=loss, class_weights=weights)
    _fit_and_check_weights_moved(task)
    logits, target = torch.randn(2, NUM_CLASSES, 8, 8), torch.randint(0, NUM_CLASSES, (2, 8, 8))
    target[0] = IGNORE_INDEX
    assert torch.isfinite(task.loss(logits, target))


def test_class_weights_change_the_cross_entropy() -> None:
    logits, target = torch.randn(2, NUM_CLASSES, 8, 8), torch.randint(0, NUM_CLASSES, (2, 8, 8))
    plain = _task(loss="ce").loss(logits, target)
    weighted = _task(loss="ce", class_weights=[1.0, 5.0, 0.1, 1.0, 1.0, 1.0]).loss(logits, target)
    assert not torch.isclose(plain, weighted)


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_each_optimizer_trains_one_step(optimizer: str) -> None:
    task = _task(optimizer=optimizer)
    trainer = _fit_and_check_weights_moved(task)
    assert isinstance(trainer.optimizers[0], OPTIMIZERS[optimizer])


@pytest.mark.parametrize(
    ("scheduler", "expected"),
    [
        ("none", None),
        ("cosine", torch.optim.lr_scheduler.CosineAnnealingLR),
        ("onecycle", torch.optim.lr_scheduler.OneCycleLR),
        ("plateau", torch.optim.lr_scheduler.ReduceLROnPlateau),
    ],
)
def test_each_scheduler_trains_one_step(scheduler: str, expected: type | None) -> None:
    task = _task(scheduler=scheduler, lr=0.01)
    trainer = _fit_and_check_weights_moved(task)
    configs = trainer.lr_scheduler_configs
    if expected is None:
        assert configs == []
        return
    assert [type(c.scheduler) for c in configs] == [expected]
    lr = trainer.optimizers[0].param_groups[0]["lr"]
    if scheduler == "plateau":
        assert configs[0].monitor == "val_mean_f1"
        assert lr == 0.01  # one epoch is no plateau
    else:
        assert lr != 0.01  # stepped (per epoch for cosine, per batch for onecycle)


def test_compile_wraps_the_network_in_place() -> None:
    plain, compiled = _task(), _task(compile=True)
    assert compiled.model._compiled_call_impl is not None and plain.model._compiled_call_impl is None
    # The checkpointed weights keep the plain network's names.
    assert list(compiled.model.state_dict()) == list(plain.model.state_dict())


# ---------------------------------------------------------------- determinism and resume


@pytest.fixture
def quick(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A private MLflow store in tmp_path, and no MLflow model logging (20 s of pip inference)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr("aerialseg.training.log_model", lambda *args, **kwargs: None)


def _params(small_params: Callable[..., Params], patches_dir: Path, models: Path, **train: Any) -> Params:
    """`small_params`, deterministic with seed 3 in experiment "engine", writing to `models`; `train`
    changes train.* keys. test_resume and test_tracking_crash train with these too."""
    return small_params(
        models.parent,
        {
            "paths.patches": patches_dir,
            "paths.models": models,
            "train.deterministic": True,
            "train.seed": 3,
            "tracking.experiment": "engine",
            **{f"train.{key}": value for key, value in train.items()},
        },
    )


def _weights(path: Path) -> dict[str, torch.Tensor]:
    payload = torch.load(path, map_location="cpu", weights_only=False)
    return dict(payload["state_dict"])


def _assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.mark.usefixtures("quick")
def test_two_deterministic_runs_give_identical_weights(
    patches_dir: Path, small_params: Callable[..., Params], tmp_path: Path
) -> None:
    train(_params(small_params, patches_dir, tmp_path / "a"))
    train(_params(small_params, patches_dir, tmp_path / "b"))

    _assert_identical(_weights(tmp_path / "a" / "model.ckpt"), _weights(tmp_path / "b" / "model.ckpt"))
    _assert_identical(
        _weights(tmp_path / "a" / "checkpoints" / "last.ckpt"),
        _weights(tmp_path / "b" / "checkpoints" / "last.ckpt"),
    )
    # ... and the same seed is what makes them equal: another seed moves the weights.
    train(_params(small_params, patches_dir, tmp_path / "c", seed=4))
    a, c = _weights(tmp_path / "a" / "model.ckpt"), _weights(tmp_path / "c" / "model.ckpt")
    assert any(not torch.equal(a[k], c[k]) for k in a)


class Crash(Exception):
    pass


class CrashAtEpoch(L.Callback):
    """Test-only: dies at the start of `epoch`, after the previous epoch's checkpoint was written."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            raise Crash(f"simulated crash at epoch {self.epoch}")


@pytest.mark.usefixtures("quick")
def test_resume_continues_the_run_and_matches_an_uninterrupted_one(
    patches_dir: Path, small_params: Callable[..., Params], tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    models = tmp_path / "resumed"
    with pytest.raises(Crash):
        train(_params(small_params, patches_dir, models, epochs=2), callbacks=[CrashAtEpoch(1)])
    assert (models / "checkpoints" / "last.ckpt").exists() and not (models / "model.ckpt").exists()
    crashed_run = json.loads((models / "checkpoints" / "mlflow_run.json").read_text())["run_id"]

    resumed = train(_params(small_params, patches_dir, models, epochs=2, resume=True))
    train(_params(small_params, patches_dir, tmp_path / "straight", epochs=2))

    assert resumed["epoch"] == 1.0
    assert list(pd.read_csv(models / "history.csv")["epoch"]) == [0, 1]
    for name in ("checkpoints/last.ckpt", "model.ckpt"):
        _assert_identical(_weights(models / name), _weights(tmp_path / "straight" / name))
    # One MLflow run for the crashed and the resumed part, holding both epochs' metrics.
    assert json.loads((models / "mlflow_run.json").read_text())["run_id"] == crashed_run
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    history = client.get_metric_history(crashed_run, "val_mean_f1")
    assert len(history) == 2
    assert client.get_run(crashed_run).info.status == "FINISHED"
    experiment = client.get_experiment_by_name("engine")
    assert experiment is not None and len(client.search_runs([experiment.experiment_id])) == 2


@pytest.mark.usefixtures("quick")
def test_a_fresh_run_ignores_old_checkpoints_and_starts_a_new_mlflow_run(
    patches_dir: Path, small_params: Callable[..., Params], tmp_path: Path
) -> None:
    models = tmp_path / "models"
    train(_params(small_params, patches_dir, models))
    first = json.loads((models / "mlflow_run.json").read_text())["run_id"]
    (models / "checkpoints" / "stale.ckpt").write_text("left by an earlier run")

    train(_params(small_params, patches_dir, models, resume=False))

    assert json.loads((models / "mlflow_run.json").read_text())["run_id"] != first
    assert sorted(p.name for p in (models / "checkpoints").iterdir()) == [
        "best.ckpt",
        "fingerprint.json",  # the params and data of the checkpoints, for train.resume
        "last.ckpt",
        "mlflow_run.json",
    ]
    _, card = load_checkpoint(models / "model.ckpt")
    assert card.metrics["epoch"] == 0.0
