"""The ISPRS protocol on whole test tiles: predict, score against the eroded reference, report.

Writes to paths.reports (and logs it all to the training's MLflow run, under evaluation/):

    metrics.json       the summary DVC shows (`dvc metrics show`, `dvc exp show`): OA, kappa, mean
                       F1 and mIoU over 6 and 5 classes, OA on the full reference, F1 per class
    scores.json        every figure: per class support/precision/recall/F1/IoU, and per tile; overall
                       and per tile also `full_reference`: OA, recall per class and the confusion
                       matrix against the full (non-eroded) reference, boundaries included
    lecture_comparison.csv / .md
                       per test tile that the lecture tested on (Vaihingen areas 15 and 23), OA and
                       per-class accuracy on the full reference next to the lecture's published
                       figures (src/aerialseg/published.py); for other runs the CSV has only its
                       header and the .md says why
    per_class.csv      F1, precision, recall, IoU per class (a DVC bar plot)
    confusion_matrix.csv / .png / _normalized.png, per_class_f1.png, training_curves.png
    predictions/<tile>.tif (georeferenced class map) and .png (colours)
    overlays/<tile>.png  image, ground truth, prediction and errors side by side
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import rasterio
import torch
from rasterio.enums import Resampling

from aerialseg.checkpoint import load_checkpoint
from aerialseg.choices import check_choices
from aerialseg.classes import CLASS_NAMES, NUM_CLASSES
from aerialseg.config import Params
from aerialseg.datasets.tiles_table import read_tiles_table
from aerialseg.files import atomic_path
from aerialseg.inference import Settings, count_windows, stream_blocks
from aerialseg.metrics import confusion_matrix, scores
from aerialseg.model_card import ModelCard
from aerialseg.names import EVALUATE_TAG_PREFIX, EVALUATION_ARTIFACTS, registered_model_name, test
from aerialseg.progress import progress_bar
from aerialseg.published import (
    LECTURE,
    LECTURE_SETTINGS,
    LECTURE_SOURCE,
    LECTURE_TAG,
    LECTURE_TILES,
    lecture_setting,
)
from aerialseg.raster import GeoReference, read_raster, write_raster
from aerialseg.raster_source import RasterSource
from aerialseg.reports import (
    block_centres,
    overlay_step,
    plot_class_scores,
    plot_confusion_matrix,
    plot_overlay,
    plot_training_curves,
    read_history,
    save_label_png,
    write_per_class_csv,
)
from aerialseg.tracking import (
    RunRef,
    check_tracking_store,
    log_lineage,
    promote_champion,
    reopen,
    set_alias_to_run,
)

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
LECTURE_COMPARISON = ("lecture_comparison.csv", "lecture_comparison.md")
COMPARISON_COLUMNS = (
    "tile",
    "figure",
    "ours",
    "lecture_from_scratch",
    "lecture_imagenet",
    "compared_with",
    "difference",
)
"""lecture_comparison.csv, one row per (tile, figure): `figure` is pixels, overall_accuracy or
recall_<class>, all on the full reference; `compared_with` is the lecture's training that matches
train.pretrained (from_scratch, imagenet, or empty for a local weights file) and `difference` is
ours minus that one."""
FIGURES = (
    "confusion_matrix.png",
    "confusion_matrix_normalized.png",
    "per_class_f1.png",
    "training_curves.png",
)


def evaluate(params: Params) -> dict[str, Any]:
    """Score the trained model on every test tile; write `reports/` and add it all to the MLflow run."""
    check_tracking_store()  # a remote store that cannot be used fails now, within its timeout
    check_choices(params)
    registered_model_name(params.tracking.registered_model, params)  # a bad name fails now
    ref = RunRef.load(params.paths.models / "mlflow_run.json")
    out = params.paths.reports
    # Whole folders are swapped in at the end: no stale or half-written predictions survive.
    with atomic_path(out / "predictions") as predictions, atomic_path(out / "overlays") as overlays:
        predictions.mkdir()
        overlays.mkdir()
        total, total_full, per_tile, trained = _predict_test_tiles(params, predictions, overlays)
    metrics = {
        **scores(total),
        "overall_accuracy_full": _accuracy(total_full),
        "full_reference": full_reference(total_full),
        "tiles": per_tile,
    }
    _write_reports(out, total, {**metrics, "mlflow_run_id": ref.run_id})
    comparison = lecture_comparison(per_tile, trained)
    write_lecture_comparison(comparison, out, trained, per_tile)
    _plot_training_curves(params.paths.models / "history.csv", out / "training_curves.png")
    _log_to_mlflow(ref, params, out, metrics, comparison)
    return metrics


def summary(metrics: dict[str, Any]) -> dict[str, Any]:
    """The compact metrics.json: SUMMARY_KEYS, F1 per class, the MLflow run id."""
    return {
        **{key: metrics[key] for key in SUMMARY_KEYS},
        "f1": {name: cls["f1"] for name, cls in metrics["per_class"].items()},
        "mlflow_run_id": metrics["mlflow_run_id"],
    }


def full_reference(cm: np.ndarray) -> dict[str, Any]:
    """The figures against the full (non-eroded) reference, the way the lecture reports a tile:
    overall accuracy, the per-class accuracy (recall; None for a class absent from the
    reference), the confusion matrix (rows: reference, columns: prediction) and the pixels counted."""
    per_class = scores(cm)["per_class"]
    return {
        "overall_accuracy": _accuracy(cm),
        "recall": {name: cls["recall"] for name, cls in per_class.items()},
        "confusion_matrix": np.asarray(cm, dtype=np.int64).tolist(),
        "pixels": int(np.asarray(cm).sum()),
    }


def _predict_test_tiles(
    params: Params, predictions: Path, overlays: Path
) -> tuple[np.ndarray, np.ndarray, dict[str, Any], dict[str, Any]]:
    """Predict each test tile whole, save the class map and the overlay figure, and count the
    prediction against both references.

    Returns the confusion matrices against the eroded reference (the benchmark's figures) and
    against the full one (boundaries included, the lecture's), per-tile scores (each with its
    `tile_id` and its `full_reference` figures), and the params the model was trained with (the
    checkpoint's `config`; empty for a checkpoint without one).
    """
    cfg = params.evaluate
    settings = Settings(
        window=0,  # the model's, below
        overlap=cfg.overlap,
        batch_size=cfg.batch_size,
        tta=cfg.tta,
        blend=cfg.blend,
        precision=cfg.precision,
        device="auto",
    ).resolve()
    model, card = load_checkpoint(params.paths.models / "model.ckpt", settings.device)
    settings = replace(settings, window=card.window).check()
    print(
        f"evaluate: {settings.device}, precision {settings.precision}, "
        f"tta {settings.tta}, blend {settings.blend}"
    )
    tiles_dir = params.paths.tiles
    total = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=np.int64)
    total_full = np.zeros_like(total)
    per_tile: dict[str, Any] = {}
    for row in read_tiles_table(tiles_dir, "test").itertuples():
        pred, georef, overview = predict_tile(
            model, card, tiles_dir / str(row.image), settings, str(row.tile)
        )
        eroded, _ = read_raster(tiles_dir / str(row.label_eroded))
        full, _ = read_raster(tiles_dir / str(row.label))
        cm, cm_full = confusion_matrix(pred, eroded[0]), confusion_matrix(pred, full[0])
        total += cm
        total_full += cm_full
        tile = per_tile[str(row.tile)] = {
            "tile_id": str(row.tile_id),
            **scores(cm),
            "overall_accuracy_full": _accuracy(cm_full),
            "full_reference": full_reference(cm_full),
        }
        write_raster(predictions / f"{row.tile}.tif", pred, georef, colormap=True)
        save_label_png(pred, predictions / f"{row.tile}.png")
        step = overlay_step(pred.shape)
        plot_overlay(
            overview,
            block_centres(full[0], step),
            block_centres(pred, step),
            overlays / f"{row.tile}.png",
            reference_eroded=block_centres(eroded[0], step),
            bands=list(card.bands),
            title=f"{row.tile}: overall accuracy {_percent(tile['overall_accuracy'])}, "
            f"mean F1 {_percent(tile['mean_f1'])} (eroded reference)",
        )
    return total, total_full, per_tile, dict(card.config)


def predict_tile(
    model: torch.nn.Module, card: ModelCard, path: Path, settings: Settings, name: str
) -> tuple[np.ndarray, GeoReference, np.ndarray]:
    """One test tile through the engine, streamed from its GeoTIFF: the (H, W) uint8 class map, its
    georeference, and the image reduced to the overlay's display size (reports.overlay_step, by
    averaging). Memory: the class map and the engine's rows, never the tile's probabilities."""
    with rasterio.open(path) as src:
        if src.count != len(card.bands):
            raise ValueError(
                f"{path}: {src.count} bands, but the model was trained on {card.expected_bands()}"
            )
        source = RasterSource(src, card, "tiles")
        classes = np.empty((src.height, src.width), dtype=np.uint8)
        total = count_windows(src.height, src.width, settings)
        with progress_bar(f"predict {name}", total=total, unit="window") as bar:
            for block in stream_blocks(model, source, settings, progress=bar.update):
                rows = block.probabilities.shape[1]
                classes[block.row : block.row + rows] = block.probabilities.argmax(axis=0)
        step = overlay_step(classes.shape)
        shape = (src.count, src.height // step, src.width // step)  # as reports.block_centres
        overview = src.read(out_shape=shape, resampling=Resampling.average, out_dtype=np.float32)
        return classes, GeoReference(src.crs, src.transform), overview


def lecture_comparison(per_tile: dict[str, Any], trained: dict[str, Any]) -> pd.DataFrame:
    """Our full-reference figures next to the lecture's, for each test tile the lecture tested on.

    A run compares with the lecture when the model was trained on Vaihingen (`data.source` in the
    checkpoint's params) and a test tile is area 15 or 23, whatever the experiment is called: the
    `lecture` preset's runs, and any other Vaihingen run tested on those tiles. Rows follow
    COMPARISON_COLUMNS; an empty table (the columns only) when the run does not compare.
    """
    rows: list[dict[str, Any]] = []
    if (trained.get("data") or {}).get("source") != "vaihingen":
        return pd.DataFrame(rows, columns=list(COMPARISON_COLUMNS))
    setting = lecture_setting((trained.get("train") or {}).get("pretrained"))
    for tile, figures in per_tile.items():
        tile_id = str(figures.get("tile_id", ""))
        if tile_id not in LECTURE_TILES:
            continue
        ours = figures["full_reference"]
        published = {key: LECTURE[(tile_id, key)] for key in LECTURE_SETTINGS}
        candidates: list[tuple[str, Any, dict[str, float]]] = [
            ("pixels", ours["pixels"], {k: r.pixels for k, r in published.items()}),
            (
                "overall_accuracy",
                ours["overall_accuracy"],
                {k: r.overall_accuracy for k, r in published.items()},
            ),
        ]
        for i, name in enumerate(CLASS_NAMES):
            candidates.append(
                (f"recall_{name}", ours["recall"][name], {k: r.recall[i] for k, r in published.items()})
            )
        for figure, value, lecture in candidates:
            matching = lecture[setting] if setting else None
            rows.append(
                {
                    "tile": tile,
                    "figure": figure,
                    "ours": value,
                    "lecture_from_scratch": lecture["from_scratch"],
                    "lecture_imagenet": lecture["imagenet"],
                    "compared_with": setting or "",
                    "difference": None if value is None or matching is None else value - matching,
                }
            )
    return pd.DataFrame(rows, columns=list(COMPARISON_COLUMNS))


def write_lecture_comparison(
    table: pd.DataFrame, out: Path, trained: dict[str, Any], per_tile: dict[str, Any] | None = None
) -> None:
    """lecture_comparison.csv (always written, a DVC output: only its header when the run does
    not compare with the lecture) and lecture_comparison.md (the same, readable, with the setups
    and, from `per_tile`, each tile's confusion matrix next to the lecture's)."""
    with atomic_path(out / LECTURE_COMPARISON[0]) as tmp:
        table.to_csv(tmp, index=False)
    with atomic_path(out / LECTURE_COMPARISON[1]) as tmp:
        tmp.write_text(_comparison_markdown(table, trained, per_tile or {}))


def _comparison_markdown(table: pd.DataFrame, trained: dict[str, Any], per_tile: dict[str, Any]) -> str:
    data, train, model = (trained.get(k) or {} for k in ("data", "train", "model"))
    tiles = ", ".join(f"area {t}" for t in LECTURE_TILES)
    lines = ["# This run next to the lecture", ""]
    if table.empty:
        lines.append(
            f"No comparison: the lecture tested on Vaihingen {tiles}; this run's model was trained "
            f"on {data.get('source', 'unknown data')} and no test tile is one of them. "
            "(The `lecture` preset's runs compare.)"
        )
        return "\n".join(lines) + "\n"
    setting = str(table["compared_with"].iloc[0])
    lines += [
        f"Source: {LECTURE_SOURCE}.",
        "",
        "Every figure is on the **full** reference (boundaries included, every pixel of the tile), "
        "as the lecture's confusion matrices count them; the headline figures in metrics.json use "
        "the eroded reference and are not comparable with the lecture's.",
        "",
        f"This run: bands {', '.join(data.get('bands') or [])}; {model.get('arch', '?')} "
        f"{model.get('encoder', '')}; {train.get('epochs', '?')} epochs; "
        f"train.pretrained {train.get('pretrained', '?')}. The lecture: IR-R-G, ResNet50 FCN with "
        "skip fusion, 20 epochs, from scratch or from ImageNet weights.",
        "",
        (
            f"Compared with: the lecture's {LECTURE_SETTINGS[setting]} ({setting}), as train.pretrained "
            "matches it; `difference` is ours minus that."
            if setting
            else "Compared with: neither (train.pretrained is a local weights file); both are shown."
        ),
    ]
    for tile, rows in table.groupby("tile", sort=False):
        lines += [
            "",
            f"## {tile}",
            "",
            "| figure | ours | lecture, from scratch | lecture, ImageNet | difference |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for row in rows.itertuples():
            fmt = _count if row.figure == "pixels" else _percent_2
            lines.append(
                f"| {row.figure} | {fmt(row.ours)} | {fmt(row.lecture_from_scratch)} | "
                f"{fmt(row.lecture_imagenet)} | {_signed(row.difference, row.figure == 'pixels')} |"
            )
        ours = (per_tile.get(str(tile)) or {}).get("full_reference", {}).get("confusion_matrix")
        tile_id = str((per_tile.get(str(tile)) or {}).get("tile_id", ""))
        matrices = [("this run", ours)] if ours else []
        for key in [setting] if setting else list(LECTURE_SETTINGS):
            if (tile_id, key) in LECTURE:
                matrices.append((f"the lecture's, {key}", LECTURE[(tile_id, key)].confusion_matrix))
        for label, cm in matrices:
            lines += ["", f"Confusion matrix, {label} (rows: reference, columns: prediction):", ""]
            lines += _matrix_markdown(cm)
    return "\n".join(lines) + "\n"


def _matrix_markdown(cm: Any) -> list[str]:
    short = [name.replace("_", " ") for name in CLASS_NAMES]
    lines = ["| reference | " + " | ".join(short) + " |", "| --- |" + " ---: |" * len(short)]
    for name, row in zip(short, cm, strict=True):
        lines.append(f"| {name} | " + " | ".join(f"{int(v):,}" for v in row) + " |")
    return lines


def _number(value: Any) -> float | None:
    return None if value is None or pd.isna(value) else float(value)


def _count(value: Any) -> str:
    number = _number(value)
    return "n/a" if number is None else f"{number:,.0f}"


def _percent_2(value: Any) -> str:
    number = _number(value)
    return "n/a" if number is None else f"{number:.2%}"


def _signed(value: Any, count: bool) -> str:
    number = _number(value)
    if number is None:
        return ""
    return f"{number:+,.0f}" if count else f"{100 * number:+.2f} pt"


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


def mlflow_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """What `evaluate` logs to MLflow: test_<figure> for the overall figures (eroded reference,
    and test_overall_accuracy_full), test_<figure>_<class> per class, and per tile
    test_<tile>_overall_accuracy (eroded) and test_<tile>_overall_accuracy_full (full reference:
    the figure that compares with the lecture for areas 15 and 23)."""
    logged = {
        test(k): float(v)
        for k, v in metrics.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and k != "pixels"
    }
    for name, cls in metrics["per_class"].items():
        logged.update(
            {test(key, name): float(v) for key, v in cls.items() if v is not None and key != "support"}
        )
    for tile, figures in metrics["tiles"].items():
        for key in ("overall_accuracy", "overall_accuracy_full"):
            if figures.get(key) is not None:
                logged[test(tile, key)] = float(figures[key])
    return logged


def _log_to_mlflow(
    ref: RunRef, params: Params, out: Path, metrics: dict[str, Any], comparison: pd.DataFrame
) -> None:
    import mlflow

    with reopen(ref):
        mlflow.log_metrics(mlflow_metrics(metrics))
        # Tags, not params: an `evaluate`-only rerun (say, a new evaluate.overlap) reopens the same
        # run, and MLflow forbids changing a logged param.
        mlflow.set_tags({EVALUATE_TAG_PREFIX + k: v for k, v in params.evaluate.model_dump().items()})
        if not comparison.empty:
            # Which of the lecture's trainings this run compares with (the leaderboard reads it).
            mlflow.set_tag(LECTURE_TAG, str(comparison["compared_with"].iloc[0]) or "neither")
        # The stages upstream of this one, train included, are final in dvc.lock by now.
        log_lineage(ref.run_id, ("scenes", "tiles", "patches", "train"))
        reports = ("metrics.json", "scores.json", "per_class.csv", "confusion_matrix.csv")
        for name in (*reports, *LECTURE_COMPARISON, *FIGURES):
            if (out / name).exists():
                mlflow.log_artifact(str(out / name), artifact_path=EVALUATION_ARTIFACTS)
        for folder in ("predictions", "overlays"):
            mlflow.log_artifacts(str(out / folder), artifact_path=f"{EVALUATION_ARTIFACTS}/{folder}")
        # Only now, with the test figures logged: the aliases never name a model that failed or
        # was not evaluated (train registers the version, it does not move them). The champion
        # is decided on the validation figure that chose the checkpoint, never on these.
        registered = registered_model_name(params.tracking.registered_model, params)
        if registered:
            version = set_alias_to_run(ref.run_id, registered, params.tracking.alias)
            if version is not None:
                promote_champion(ref.run_id, registered, version)
