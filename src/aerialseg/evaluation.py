"""The ISPRS protocol on whole test tiles: predict, score against the eroded reference, report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from aerialseg.checkpoint import load_checkpoint
from aerialseg.classes import CLASS_NAMES, NUM_CLASSES
from aerialseg.config import Params
from aerialseg.datasets.isprs import read_tiles_table
from aerialseg.files import atomic_path
from aerialseg.inference import predict_probabilities
from aerialseg.metrics import confusion_matrix, scores
from aerialseg.raster import read_raster, write_raster
from aerialseg.reports import plot_confusion_matrix, save_label_png
from aerialseg.tracking import RunRef, reopen


def evaluate(params: Params) -> dict[str, Any]:
    """Score the trained model on every test tile; write `reports/` and add it all to the MLflow run."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, meta = load_checkpoint(params.paths.models / "model.ckpt", device)
    mean = np.asarray(meta["band_mean"], dtype=np.float32)[:, None, None]
    std = np.asarray(meta["band_std"], dtype=np.float32)[:, None, None]
    tiles_dir, out = params.paths.tiles, params.paths.reports
    predictions = out / "predictions"
    predictions.mkdir(parents=True, exist_ok=True)

    total = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=np.int64)
    per_tile: dict[str, Any] = {}
    for row in read_tiles_table(tiles_dir, "test").itertuples():
        image, georef = read_raster(tiles_dir / str(row.image))
        if image.shape[0] != len(meta["bands"]):
            raise ValueError(
                f"{tiles_dir / str(row.image)}: {image.shape[0]} bands, "
                f"but the model was trained on {meta['bands']}"
            )
        probs = predict_probabilities(
            model,
            (image - mean) / std,
            window=meta["patch_size"],
            overlap=params.evaluate.overlap,
            batch_size=params.evaluate.batch_size,
            tta=params.evaluate.tta,
            device=device,
        )
        pred = probs.argmax(axis=0).astype(np.uint8)
        reference, _ = read_raster(tiles_dir / str(row.label_eroded))
        cm = confusion_matrix(pred, reference[0])
        total += cm
        per_tile[str(row.tile)] = scores(cm)
        write_raster(predictions / f"{row.tile}.tif", pred, georef, colormap=True)
        save_label_png(pred, predictions / f"{row.tile}.png")

    metrics = {**scores(total), "tiles": per_tile}
    _write_reports(out, total, metrics, params)
    _log_to_mlflow(params, out, metrics)
    return metrics


def _write_reports(out: Path, cm: np.ndarray, metrics: dict[str, Any], params: Params) -> None:
    ref = RunRef.load(params.paths.models / "mlflow_run.json")
    with atomic_path(out / "metrics.json") as tmp:
        tmp.write_text(json.dumps({**metrics, "mlflow_run_id": ref.run_id}, indent=2, allow_nan=False) + "\n")
    with atomic_path(out / "confusion_matrix.csv") as tmp:
        pd.DataFrame(cm, index=pd.Index(CLASS_NAMES, name="reference"), columns=CLASS_NAMES).to_csv(tmp)
    plot_confusion_matrix(cm, out / "confusion_matrix.png", title="Test tiles, eroded reference (pixels)")
    plot_confusion_matrix(
        cm,
        out / "confusion_matrix_normalized.png",
        normalize=True,
        title="Test tiles, row-normalised (recall)",
    )


def _log_to_mlflow(params: Params, out: Path, metrics: dict[str, Any]) -> None:
    import mlflow

    ref = RunRef.load(params.paths.models / "mlflow_run.json")
    with reopen(ref):
        summary = {
            f"test_{k}": float(v) for k, v in metrics.items() if isinstance(v, int | float) and k != "pixels"
        }
        for name, cls in metrics["per_class"].items():
            summary.update(
                {
                    f"test_{key}_{name}": float(v)
                    for key, v in cls.items()
                    if v is not None and key != "support"
                }
            )
        mlflow.log_metrics(summary)
        # Tags, not params: an `evaluate`-only rerun (say, a new evaluate.overlap) reopens the same
        # run, and MLflow forbids changing a logged param.
        mlflow.set_tags({f"evaluate.{k}": v for k, v in params.evaluate.model_dump().items()})
        for name in (
            "metrics.json",
            "confusion_matrix.csv",
            "confusion_matrix.png",
            "confusion_matrix_normalized.png",
        ):
            mlflow.log_artifact(str(out / name), artifact_path="evaluation")
        mlflow.log_artifacts(str(out / "predictions"), artifact_path="evaluation/predictions")
