"""`train.resume`: only a checkpoint of the same params and data is continued, and a resumed run
repeats the uninterrupted one bit for bit, with loader workers and augmentation (issue 12)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import h5py
import lightning as L
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient
from test_training_engine import Crash, CrashAtEpoch, _assert_identical, _params, _weights
from torch.utils.data import DataLoader, DistributedSampler

from aerialseg.config import Params
from aerialseg.data import PatchDataset
from aerialseg.datamodule import EpochShards
from aerialseg.training import FINGERPRINT, file_digest, train

EPOCHS = 3
EXACT = {"epochs": EPOCHS, "num_workers": 2, "augment": True}
"""Three epochs read by two workers, with the D4 augmentation: what resume must repeat exactly."""


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The module's working directory, holding its private MLflow store; no MLflow model logging
    (20 s of pip inference per run)."""
    root = tmp_path_factory.mktemp("resume")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.delenv("DVC_STAGE", raising=False)
        mp.setattr("aerialseg.training.log_model", lambda *args, **kwargs: None)
        yield root


def _client(store: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{store / 'mlflow.db'}")


def _run_id(models: Path) -> str:
    return str(json.loads((models / "mlflow_run.json").read_text())["run_id"])


def _resume_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("train.resume:")]


# ---------------------------------------------------------------- exact resume


@pytest.fixture(scope="module")
def straight(store: Path, patches_dir: Path, small_params: Callable[..., Params]) -> Path:
    """An uninterrupted run of EXACT."""
    models = store / "straight"
    train(_params(small_params, patches_dir, models, **EXACT))
    return models


class CrashInEpoch(L.Callback):
    """Test-only: dies after the first batch of `epoch` was trained (its weights have moved since
    the last checkpoint, which the previous epoch's end wrote)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.current_epoch == self.epoch:
            raise Crash(f"simulated crash in epoch {self.epoch}")


@pytest.mark.slow
@pytest.mark.parametrize("kill", ["at the epoch boundary", "mid-epoch"])
def test_a_resumed_run_with_workers_and_augmentation_repeats_the_uninterrupted_one(
    kill: str,
    store: Path,
    straight: Path,
    patches_dir: Path,
    small_params: Callable[..., Params],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    models = tmp_path / "models"
    crash = CrashAtEpoch(2) if kill == "at the epoch boundary" else CrashInEpoch(2)
    with pytest.raises(Crash):
        train(_params(small_params, patches_dir, models, **EXACT), callbacks=[crash])
    crashed_run = json.loads((models / "checkpoints" / "mlflow_run.json").read_text())["run_id"]
    capsys.readouterr()

    train(_params(small_params, patches_dir, models, **EXACT, resume=True))

    assert not _resume_lines(capsys.readouterr().err)  # resumed silently: nothing differs
    for name in ("checkpoints/last.ckpt", "checkpoints/best.ckpt", "model.ckpt"):
        _assert_identical(_weights(models / name), _weights(straight / name))
    assert list(pd.read_csv(models / "history.csv")["epoch"]) == [0, 1, 2]
    # The same MLflow run, continued and finished.
    assert _run_id(models) == crashed_run
    assert _client(store).get_run(crashed_run).info.status == "FINISHED"


@pytest.mark.slow
def test_the_number_of_loader_workers_does_not_change_the_weights(
    straight: Path, patches_dir: Path, small_params: Callable[..., Params], tmp_path: Path
) -> None:
    train(_params(small_params, patches_dir, tmp_path / "models", **{**EXACT, "num_workers": 0}))
    for name in ("checkpoints/last.ckpt", "model.ckpt"):
        _assert_identical(_weights(tmp_path / "models" / name), _weights(straight / name))


def test_a_sample_is_augmented_from_seed_epoch_and_index_alone(patches_dir: Path) -> None:
    def sample(epoch: int, index: int, seed: int = 3, warm: int = 0) -> torch.Tensor:
        dataset = PatchDataset(patches_dir / "train.h5", augment=True, seed=seed)
        for i in range(warm):  # a worker that has read other samples before
            dataset[(epoch, i)]
        return dataset[(epoch, index)]["image"]

    first = sample(1, 5)
    assert torch.equal(first, sample(1, 5, warm=7))
    # Some epoch, or some seed, flips or turns patch 5 another way (1 in 8 chance each to match).
    assert any(not torch.equal(first, sample(epoch, 5)) for epoch in range(2, 8))
    assert any(not torch.equal(first, sample(1, 5, seed=seed)) for seed in range(4, 10))


def test_epoch_shards_yield_the_distributed_order_with_the_epoch(patches_dir: Path) -> None:
    dataset = PatchDataset(patches_dir / "train.h5")
    shards = EpochShards(dataset, 2, 1, seed=3)
    reference: DistributedSampler[Any] = DistributedSampler(
        dataset,
        num_replicas=2,
        rank=1,
        shuffle=True,
        seed=3,
    )
    for epoch in (0, 4):
        shards.set_epoch(epoch)
        reference.set_epoch(epoch)
        assert list(shards) == [(epoch, i) for i in reference]
        assert shards.started == epoch
    assert len(shards) == len(reference)
    # Through a DataLoader with workers: the same batches as read in this process.
    shards.set_epoch(2)
    loader = DataLoader(PatchDataset(patches_dir / "train.h5", augment=True), batch_size=4, sampler=shards)
    with_workers = DataLoader(
        PatchDataset(patches_dir / "train.h5", augment=True), batch_size=4, sampler=shards, num_workers=2
    )
    for a, b in zip(loader, with_workers, strict=True):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])


# ---------------------------------------------------------------- safe resume


@pytest.fixture(scope="module")
def finished(store: Path, patches_dir: Path, small_params: Callable[..., Params]) -> Path:
    """A finished one-epoch run (the copies that tests resume are made with `_copy`)."""
    models = store / "finished"
    train(_params(small_params, patches_dir, models))
    return models


def _copy(models: Path, to: Path) -> Path:
    """A copy of a run's models folder, whose checkpoint a test may resume or replace."""
    return Path(shutil.copytree(models, to, copy_function=shutil.copy2))


def _changed_patches(patches_dir: Path, to: Path) -> Path:
    """patches_dir with one pixel of one patch's mask relabelled."""
    out = Path(shutil.copytree(patches_dir, to))
    with h5py.File(out / "train.h5", "r+") as h5:
        mask = h5["mask"]
        mask[len(mask) // 2, 0, 0] = (int(mask[len(mask) // 2, 0, 0]) + 1) % 6
    return out


@pytest.mark.slow
@pytest.mark.parametrize(
    ("change", "said"),
    [
        ({"seed": 4}, "was trained with train.seed 3 (now 4)"),
        ({"lr": 0.01}, "was trained with train.lr 0.001 (now 0.01)"),
        ({"encoder": "resnet34"}, "was trained with model.encoder resnet18 (now resnet34)"),
        ({"patches": True}, "was trained on other patches (train.h5 not the same)"),
    ],
    ids=["seed", "lr", "encoder", "patches"],
)
def test_resume_with_other_params_or_data_starts_a_new_run_and_says_why(
    change: dict[str, Any],
    said: str,
    store: Path,
    finished: Path,
    patches_dir: Path,
    small_params: Callable[..., Params],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    models = _copy(finished, tmp_path / "models")
    old_run = _run_id(models)
    old = _client(store).get_run(old_run)
    patches = _changed_patches(patches_dir, tmp_path / "patches") if "patches" in change else patches_dir
    params = _params(
        small_params, patches, models, resume=True, **{k: v for k, v in change.items() if k in ("seed", "lr")}
    )
    if "encoder" in change:
        params = params.model_copy(update={"model": params.model.model_copy(update=change)})
    capsys.readouterr()

    train(params)  # no MLflow params clash, no state-dict error

    lines = _resume_lines(capsys.readouterr().err)
    assert lines == [f"train.resume: {models / 'checkpoints' / 'last.ckpt'} {said}: starting a new run"]
    new_run = _run_id(models)
    assert new_run != old_run
    client = _client(store)
    # The old run is untouched: still finished, with its own params and lineage.
    after = client.get_run(old_run)
    assert after.info.status == "FINISHED"
    assert after.data.params == old.data.params and after.data.tags == old.data.tags
    # The new run is a fresh one of the new params, written beside a new fingerprint.
    assert client.get_run(new_run).info.status == "FINISHED"
    recorded = client.get_run(new_run).data.params
    for key, value in change.items():
        if key != "patches":
            section = "model" if key == "encoder" else "train"
            assert recorded[f"{section}.{key}"] == str(value)
    fingerprint = json.loads((models / "checkpoints" / FINGERPRINT).read_text())
    assert fingerprint["data"]["train.h5"] == file_digest(patches / "train.h5")


@pytest.mark.slow
def test_resume_of_a_checkpoint_without_fingerprint_starts_a_new_run(
    finished: Path,
    patches_dir: Path,
    small_params: Callable[..., Params],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    models = _copy(finished, tmp_path / "models")
    (models / "checkpoints" / FINGERPRINT).unlink()  # a checkpoint of an older version of the project
    old_run = _run_id(models)
    capsys.readouterr()

    train(_params(small_params, patches_dir, models, resume=True))

    (line,) = _resume_lines(capsys.readouterr().err)
    assert "has no fingerprint.json beside it" in line and line.endswith("starting a new run")
    assert _run_id(models) != old_run
    assert (models / "checkpoints" / FINGERPRINT).exists()


@pytest.mark.slow
def test_resume_of_a_finished_run_trains_nothing_and_keeps_its_run(
    store: Path,
    finished: Path,
    patches_dir: Path,
    small_params: Callable[..., Params],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    models = _copy(finished, tmp_path / "models")
    old_run = _run_id(models)
    last = models / "checkpoints" / "last.ckpt"
    before = _weights(last)
    capsys.readouterr()

    train(_params(small_params, patches_dir, models, resume=True))

    (line,) = _resume_lines(capsys.readouterr().err)
    assert line == (
        f"train.resume: {last} finished its 1 epochs with these params and data: "
        "nothing to train, publishing it again under its MLflow run"
    )
    assert _run_id(models) == old_run
    assert _client(store).get_run(old_run).info.status == "FINISHED"
    _assert_identical(_weights(last), before)
    _assert_identical(_weights(models / "model.ckpt"), _weights(finished / "model.ckpt"))
    assert list(pd.read_csv(models / "history.csv")["epoch"]) == [0]


def test_file_digest_follows_the_content_not_the_file(patches_dir: Path, tmp_path: Path) -> None:
    original = file_digest(patches_dir / "train.h5")
    copy = Path(shutil.copy(patches_dir / "train.h5", tmp_path / "train.h5"))
    os.utime(copy, (0, 0))
    assert file_digest(copy) == original
    assert file_digest(patches_dir / "val.h5") != original
    changed = _changed_patches(patches_dir, tmp_path / "changed")
    assert file_digest(changed / "train.h5") != original


def test_file_digest_of_a_large_dataset_reads_a_few_chunks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("aerialseg.training.DIGEST_BYTES", 1000)
    path = tmp_path / "big.h5"
    with h5py.File(path, "w") as h5:
        h5.create_dataset("image", data=torch.arange(200 * 64).reshape(200, 64).numpy(), chunks=(1, 64))
    first = file_digest(path)
    with h5py.File(path, "r+") as h5:
        h5["image"][199, 3] = -1  # the last chunk is always read
    assert file_digest(path) != first
