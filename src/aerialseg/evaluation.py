"""The ISPRS protocol on whole test tiles: predict, score against the eroded reference, report.

Writes to paths.reports (and logs it all to the training's MLflow run, under evaluation/):

    metrics.json       the summary DVC shows (`dvc metrics show`, `dvc exp show`): OA, kappa, mean
                       F1 and mIoU over 6 and 5 classes, OA on the full reference, F1 per class
    scores.json        every figure: per class support/precision/recall/F1/IoU, and per tile
    per_class.csv      F1, precision, recall, IoU per class (a DVC bar plot)
    confusion_matrix.csv / .png / _normalized.png, per_class_f1.png, training_curves.png
    predictions/<tile>.tif (georeferenced class map) and .png (colours)
    overlays/<tile>.png  image, ground truth, prediction and errors side by side
"""

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
from aerialseg.datasets.tiles_table import read_tiles_table
from aerialseg.files import atomic_path
from aerialseg.inference import predict_probabilities
from aerialseg.metrics import confusion_matrix, scores
from aerialseg.raster import read_raster, write_raster
from aerialseg.reports import (
    plot_class_scores,
    plot_confusion_matrix,
    plot_overlay,
    plot_training_curves,
    read_history,
    save_label_png,
    write_per_class_csv,
)
from aerialseg.tracking import RunRef, log_lineage, reopen

SUMMARY_KEYS = (
    "overall_accuracy",
    "kappa",
    "mean_f1",
    "miou",
    "mean_f1_5",
    "miou_5",
    "overall_accuracy_full",
    "pixels",
)
"""What metrics.json holds besides the F1 per class and the MLflow run id; the rest is in scores.json."""
FIGURES = (
    "confusion_matrix.png",
    "confusion_matrix_normalized.png",
    "per_class_f1.png",
    "training_curves.png",
)


def evaluate(params: Params) -> dict[str, Any]:
    """Score the trained model on every test tile; write `reports/` and add it all to the MLflow run."""
    ref = RunRef.load(params.paths.models / "mlflow_run.json")
    out = params.paths.reports
    # Whole folders are swapped in at the end: no stale or half-written predictions survive.
    with atomic_path(out / "predictions") as predictions, atomic_path(out / "overlays") as overlays:
        predictions.mkdir()
        overlays.mkdir()
        total, total_full, per_tile = _predict_test_tiles(params, predictions, overlays)
    metrics = {**scores(total), "overall_accuracy_full": _accuracy(total_full), "tiles": per_tile}
    _write_reports(out, total, {**metrics, "mlflow_run_id": ref.run_id})
    _plot_training_curves(params.paths.models / "history.csv", out / "training_curves.png")
    _log_to_mlflow(ref, params, out, metrics)
    return metrics


def summary(metrics: dict[str, Any]) -> dict[str, Any]:
    """The compact metrics.json: SUMMARY_KEYS, F1 per class, the MLflow run id."""
    return {
        **{key: metrics[key] for key in SUMMARY_KEYS},
        "f1": {name: cls["f1"] for name, cls in metrics["per_class"].items()},
        "mlflow_run_id": metrics["mlflow_run_id"],
    }


def _predict_test_tiles(
    params: Params, predictions: Path, overlays: Path
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Predict each test tile whole, save the class map and the overlay figure, and count the
    prediction against both references.

    Returns the confusion matrices against the eroded reference (the benchmark's figures) and
    against the full one (a secondary overall accuracy, boundaries included), and per-tile scores.
    """
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, meta = load_checkpoint(params.paths.models / "model.ckpt", device)
    mean = np.asarray(meta["band_mean"], dtype=np.float32)[:, None, None]
    std = np.asarray(meta["band_std"], dtype=np.float32)[:, None, None]
    tiles_dir = params.paths.tiles
    total = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=np.int64)
    total_full = np.zeros_like(total)
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
            progress=f"predict {row.tile}",
        )
        pred = probs.argmax(axis=0).astype(np.uint8)
        eroded, _ = read_raster(tiles_dir / str(row.label_eroded))
        full, _ = read_raster(tiles_dir / str(row.label))
        cm, cm_full = confusion_matrix(pred, eroded[0]), confusion_matrix(pred, full[0])
        total += cm
        total_full += cm_full
        tile = per_tile[str(row.tile)] = {**scores(cm), "overall_accuracy_full": _accuracy(cm_full)}
        write_raster(predictions / f"{row.tile}.tif", pred, georef, colormap=True)
        save_label_png(pred, predictions / f"{row.tile}.png")
        plot_overlay(
            image,
            full[0],
            pred,
            overlays / f"{row.tile}.png",
            reference_eroded=eroded[0],
            bands=meta["bands"],
            title=f"{row.tile}: overall accuracy {_percent(tile['overall_accuracy'])}, "
            f"mean F1 {_percent(tile['mean_f1'])} (eroded reference)",
        )
    return total, total_full, per_tile


def _accuracy(cm: np.ndarray) -> float | None:
    return float(np.trace(cm) / cm.sum()) if cm.sum() else None


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _write_reports(out: Path, cm: np.ndarray, metrics: dict[str, Any]) -> None:
    for name, content in (("metrics.json", summary(metrics)), ("scores.json", metrics)):
        with atomic_path(out / name) as tmp:
            tmp.write_text(json.dumps(content, indent=2, allow_nan=False) + "\n")
    with atomic_path(out / "confusion_matrix.csv") as tmp:
        pd.DataFrame(cm, index=pd.Index(CLASS_NAMES, name="reference"), columns=CLASS_NAMES).to_csv(tmp)
    write_per_class_csv(metrics["per_class"], out / "per_class.csv")
    plot_class_scores(metrics["per_class"], out / "per_class_f1.png", title="Per-class F1, test tiles")
    plot_confusion_matrix(cm, out / "confusion_matrix.png", title="Test tiles, eroded reference (pixels)")
    plot_confusion_matrix(
        cm,
        out / "confusion_matrix_normalized.png",
        normalize=True,
        title="Test tiles, row-normalised (recall)",
    )


def _plot_training_curves(history: Path, path: Path) -> None:
    """The training's curves from its history.csv; none when there is no history (an evaluation of
    a checkpoint trained elsewhere), rather than a stale figure."""
    if history.exists():
        plot_training_curves(read_history(history), path)
    else:
        path.unlink(missing_ok=True)


def _log_to_mlflow(ref: RunRef, params: Params, out: Path, metrics: dict[str, Any]) -> None:
    import mlflow

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
        # The stages upstream of this one, train included, are final in dvc.lock by now.
        log_lineage(ref.run_id, ("scenes", "tiles", "patches", "train"))
        for name in ("metrics.json", "scores.json", "per_class.csv", "confusion_matrix.csv", *FIGURES):
            if (out / name).exists():
                mlflow.log_artifact(str(out / name), artifact_path="evaluation")
        for folder in ("predictions", "overlays"):
            mlflow.log_artifacts(str(out / folder), artifact_path=f"evaluation/{folder}")
