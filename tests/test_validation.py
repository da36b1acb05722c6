"""Validation follows the test protocol: the whole val tiles, predicted by `evaluate`'s sliding
window and blending, scored once per pixel against the eroded reference."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from aerialseg.checkpoint import load_checkpoint
from aerialseg.classes import IGNORE_INDEX
from aerialseg.config import Params
from aerialseg.inference import Settings, predict_probabilities
from aerialseg.metrics import confusion_matrix, scores
from aerialseg.patches import read_tile_file_info, read_validation_tile
from aerialseg.training import train


@pytest.mark.parametrize("overlap", [0.5, 0.75])
def test_val_figures_are_evaluates_figures_on_the_whole_val_tiles(
    patches_dir: Path,
    small_params: Callable[..., Params],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    overlap: float,
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr("aerialseg.training.log_model", lambda *args, **kwargs: None)
    params = small_params(tmp_path, {"paths.patches": patches_dir, "evaluate.overlap": overlap})
    train(params)

    # The published model (epoch 0, the only one), predicted as `evaluate` predicts a test tile.
    model, card = load_checkpoint(tmp_path / "models" / "model.ckpt")
    image, reference = read_validation_tile(read_tile_file_info(patches_dir / "val.h5"), "area3")
    probs = predict_probabilities(model, card.normalise(image), Settings(window=64, overlap=overlap))
    expected = scores(confusion_matrix(probs.argmax(axis=0), reference))

    history = pd.read_csv(tmp_path / "models" / "history.csv")
    assert len(history) == 1
    row = history.iloc[0]
    # Every scored pixel of the whole tile exactly once: not once per overlapping patch.
    assert row["val_pixels"] == np.count_nonzero(reference != IGNORE_INDEX) == expected["pixels"]
    for key in ("overall_accuracy", "kappa", "mean_f1", "miou", "mean_f1_5", "miou_5"):
        assert row[f"val_{key}"] == pytest.approx(expected[key], abs=1e-6), key
    # val_loss: cross-entropy of the blended probabilities on the scored pixels.
    scored = reference != IGNORE_INDEX
    truth = probs[:, scored][reference[scored], np.arange(int(scored.sum()))]
    nll = -np.log(truth.clip(1e-7))
    assert row["val_loss"] == pytest.approx(float(nll.mean()), rel=1e-4)
    assert row["val_seconds"] > 0
