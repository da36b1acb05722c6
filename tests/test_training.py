"""`train()` called directly, as a stage would: checkpoint, history, MLflow run; fp32 and bf16."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
import torch

from aerialseg.checkpoint import load_checkpoint
from aerialseg.config import Params
from aerialseg.devices import resolve_training_precision
from aerialseg.training import train


@pytest.mark.parametrize("precision", ["32", "bf16-mixed"])
def test_train_writes_checkpoint_history_and_one_mlflow_run(
    patches_dir: Path,
    small_params: Callable[..., Params],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    precision: str,
) -> None:
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = small_params(
        tmp_path, {"paths.patches": patches_dir, "train.epochs": 2, "train.precision": precision}
    )

    metrics = train(params)

    assert metrics["epoch"] == 1.0 and 0.0 <= metrics["val_overall_accuracy"] <= 1.0
    assert metrics["train_seconds"] > 0
    history = pd.read_csv(tmp_path / "models" / "history.csv")
    assert list(history["epoch"]) == [0, 1]
    assert {"train_loss", "val_loss", "val_overall_accuracy", "val_mean_f1", "val_miou"} <= set(history)

    model, card = load_checkpoint(tmp_path / "models" / "model.ckpt")
    # model.ckpt holds the best epoch by val_mean_f1 (the first, on a tie); Lightning's own
    # checkpoints (for train.resume) sit beside it.
    best_epoch = history["epoch"][history["val_mean_f1"].idxmax()]
    assert card.metrics["epoch"] == best_epoch
    assert card.metrics["val_mean_f1"] == pytest.approx(history["val_mean_f1"].max())
    checkpoints = tmp_path / "models" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == [
        "best.ckpt",
        "fingerprint.json",
        "last.ckpt",
        "mlflow_run.json",
    ]
    assert card.bands == ("ir", "r", "g", "dsm") and card.window == 64
    assert card.config["train"]["precision"] == precision
    with torch.no_grad():
        out = model(torch.zeros(1, 4, 64, 64))
    assert out.shape == (1, 6, 64, 64) and out.dtype == torch.float32 and torch.isfinite(out).all()

    # The default store is the SQLite file in the working directory (the project root under DVC).
    ref = json.loads((tmp_path / "models" / "mlflow_run.json").read_text())
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([ref["experiment_id"]])
    assert [r.info.run_id for r in runs] == [ref["run_id"]]
    assert runs[0].data.params["train.precision_resolved"] == precision
    assert "evaluate.overlap" not in runs[0].data.params
    # Validation's window grid is evaluate's, on whole tiles: recorded as params of the run.
    assert runs[0].data.params["validation.window"] == "64"
    assert runs[0].data.params["validation.overlap"] == "0.5"
    # The figures that chose the published model, for the leaderboard.
    logged = runs[0].data.metrics
    assert logged["selected_epoch"] == best_epoch
    for key in ("overall_accuracy", "kappa", "mean_f1", "miou", "mean_f1_5", "miou_5"):
        assert logged[f"selected_val_{key}"] == pytest.approx(card.metrics[f"val_{key}"])


def test_auto_precision_is_fp32_on_cpus_without_native_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("aerialseg.devices.cpu_has_native_bf16", lambda: False)
    assert resolve_training_precision("auto", "cpu") == "32"
    monkeypatch.setattr("aerialseg.devices.cpu_has_native_bf16", lambda: True)
    assert resolve_training_precision("auto", "cpu") == "bf16-mixed"
    assert resolve_training_precision("16-mixed", "cpu") == "16-mixed"
