"""Figures for the evaluation report: confusion matrix, colour label maps, training curves.

Figures are built on matplotlib.figure.Figure directly rather than pyplot, so no GUI backend
or global figure state is involved (safe in DVC stages, tests and worker processes). Every
file is written through files.atomic_path, so an interrupted run never leaves a half PNG.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter
from PIL import Image

from aerialseg.classes import CLASS_NAMES, index_to_colours
from aerialseg.files import atomic_path

CONFUSION_FIGSIZE = (7.0, 6.0)
CURVES_FIGSIZE = (11.0, 4.5)
DPI = 120
_CMAP = "Blues"


def normalize_rows(cm: np.ndarray) -> np.ndarray:
    """Row-normalise a confusion matrix (rows = reference), so the diagonal is recall.

    A row with no reference pixels stays all zeros rather than becoming NaN.
    """
    cm = np.asarray(cm, dtype=np.float64)
    row_sums = cm.sum(axis=1, keepdims=True)
    return np.divide(cm, row_sums, out=np.zeros_like(cm), where=row_sums > 0)


def format_count(n: float) -> str:
    """Compact pixel count (987, 12.3k, 4.56M) that fits in a heatmap cell."""
    n = float(n)
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= limit:
            scaled = n / limit
            return f"{scaled:.3g}{suffix}" if scaled < 100 else f"{scaled:.0f}{suffix}"
    return f"{n:.0f}"


def plot_confusion_matrix(
    cm: np.ndarray,
    path: Path,
    *,
    class_names: Sequence[str] = CLASS_NAMES,
    normalize: bool = False,
    title: str | None = None,
) -> Path:
    """Heatmap of a confusion matrix (rows = reference) with the value written in each cell.

    With `normalize`, rows are divided by their reference count, so the diagonal reads as
    per-class recall; the cells of a class absent from the reference show a dash.
    """
    cm = np.asarray(cm)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or cm.shape[0] != len(class_names):
        raise ValueError(
            f"confusion matrix of shape {cm.shape} does not match {len(class_names)} class names"
        )
    values = normalize_rows(cm) if normalize else cm.astype(np.float64)
    if title is None:
        kind = "row-normalised: recall on the diagonal" if normalize else "pixel counts"
        title = f"Confusion matrix ({kind})"

    fig = Figure(figsize=CONFUSION_FIGSIZE, dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    vmax = 1.0 if normalize else max(float(values.max()), 1.0)
    image = ax.imshow(values, cmap=_CMAP, vmin=0.0, vmax=vmax, interpolation="nearest")
    # Compact colourbar ticks too: matplotlib's default puts a detached "1e7" offset on top.
    # No fraction/pad here: they fight the constrained layout and clip the axis labels.
    tick_format = None if normalize else FuncFormatter(lambda v, _pos: format_count(v))
    fig.colorbar(image, ax=ax, format=tick_format)

    empty_rows = cm.sum(axis=1) == 0
    for (row, col), value in np.ndenumerate(values):
        if normalize and empty_rows[row]:
            text = "-"
        else:
            text = f"{value:.2f}" if normalize else format_count(value)
        # Pick the text colour from the cell's own colour so it reads on dark and light cells.
        rgba = np.asarray(image.cmap(image.norm(value)))
        ax.text(col, row, text, ha="center", va="center", fontsize=9, color=_ink_on(rgba))

    ticks = np.arange(len(class_names))
    ax.set_xticks(ticks, labels=list(class_names), rotation=35, ha="right", rotation_mode="anchor")
    ax.set_yticks(ticks, labels=list(class_names))
    ax.set_xlabel("Prediction")
    ax.set_ylabel("Reference")
    ax.set_title(title, fontsize=11)
    return _save(fig, path)


def _ink_on(rgba: np.ndarray) -> str:
    """Black or white, whichever contrasts more with a background colour (Rec. 709 luma)."""
    r, g, b = rgba[:3]
    return "black" if 0.2126 * r + 0.7152 * g + 0.0722 * b > 0.5 else "white"


def save_label_png(index: np.ndarray, path: Path) -> Path:
    """Write an (H, W) class index as an H x W ISPRS-colour PNG, pixel for pixel.

    Ignored pixels (IGNORE_INDEX) come out black, as in the eroded ground truth.
    """
    index = np.asarray(index)
    if index.ndim != 2:
        raise ValueError(f"expected an (H, W) class index, got shape {index.shape}")
    if not np.issubdtype(index.dtype, np.integer) or index.min(initial=0) < 0 or (index.max(initial=0) > 255):
        raise ValueError("class index must hold integers in [0, 255]")
    rgb = index_to_colours(index.astype(np.uint8))
    path = Path(path)
    with atomic_path(path) as tmp:
        # Explicit format: the caller's path need not end in .png.
        Image.fromarray(rgb).save(tmp, format="PNG")
    return path


def plot_training_curves(history: Sequence[Mapping[str, float | None]], path: Path) -> Path:
    """Two panels, losses and validation metrics, against the epoch.

    Keys ending in "loss" go to the first panel, other "val_" keys to the second; any other key
    (learning rate, step, ...) is ignored. A key missing or None in some epochs (validation run
    every n epochs) is drawn only where present.
    """
    keys = _ordered_keys(history)
    loss_keys = [k for k in keys if k.endswith("loss")]
    metric_keys = [k for k in keys if k.startswith("val_") and k not in loss_keys]

    fig = Figure(figsize=CURVES_FIGSIZE, dpi=DPI, layout="constrained")
    loss_ax, metric_ax = fig.subplots(1, 2)
    _plot_series(loss_ax, history, loss_keys, "Loss")
    _plot_series(metric_ax, history, metric_keys, "Validation metrics")
    if metric_keys and all(0.0 <= v <= 1.0 for k in metric_keys for _, v in _series(history, k)):
        metric_ax.set_ylim(0.0, 1.0)
    return _save(fig, path)


def _ordered_keys(history: Sequence[Mapping[str, float | None]]) -> list[str]:
    """Every key seen in the history, in first-seen order, so legends are stable."""
    return list(dict.fromkeys(k for entry in history for k in entry if k != "epoch"))


def _series(history: Sequence[Mapping[str, float | None]], key: str) -> list[tuple[float, float]]:
    points = []
    for i, entry in enumerate(history):
        value = entry.get(key)
        if value is not None and np.isfinite(value):
            epoch = entry.get("epoch")
            points.append((float(i if epoch is None else epoch), float(value)))
    return points


def _plot_series(
    ax: Axes, history: Sequence[Mapping[str, float | None]], keys: Sequence[str], title: str
) -> None:
    drawn = 0
    for key in keys:
        points = _series(history, key)
        if points:
            epochs, values = zip(*points, strict=True)
            # Markers so that a single epoch still shows up.
            ax.plot(epochs, values, marker="o", markersize=3, label=key)
            drawn += 1
    ax.set_title(title)
    ax.set_xlabel("Epoch")
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no values recorded", ha="center", va="center", transform=ax.transAxes)


def _save(fig: Figure, path: Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        # No bbox_inches="tight": the PNG keeps exactly figsize * dpi pixels.
        fig.savefig(tmp, format="png", dpi=DPI)
    return path
