"""Figures for the evaluation report: confusion matrix, colour label maps, training curves,
per-class scores, per-tile overlays, and the README gallery made from them.

Figures are built on matplotlib.figure.Figure directly rather than pyplot, so no GUI backend
or global figure state is involved (safe in DVC stages, tests and worker processes). Every
file is written through files.atomic_path, so an interrupted run never leaves a half PNG.

`python -m aerialseg.reports` (`make gallery`) copies the figures of the last pipeline run,
shrunk, into docs/gallery/ for the README.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, MaxNLocator
from PIL import Image

from aerialseg.classes import CLASS_NAMES, CLASSES, IGNORE_INDEX, index_to_colours
from aerialseg.files import atomic_path
from aerialseg.names import VAL, VAL_PIXELS

CONFUSION_FIGSIZE = (7.0, 6.0)
CURVES_FIGSIZE = (11.0, 4.5)
CLASS_SCORES_FIGSIZE = (7.0, 3.6)
DPI = 120
OVERLAY_FIGSIZE = (16.0, 4.5)
OVERLAY_DPI = 100
OVERLAY_MAX_PIXELS = 1024
"""Longest side, in pixels, a tile is reduced to for the overlay figure (a panel is ~400 px)."""
ERROR_COLOUR = (1.0, 0.0, 0.0)
PER_CLASS_COLUMNS = ("class", "f1", "precision", "recall", "iou")
NOT_CURVES = (VAL_PIXELS,)
"""History columns that are counts, not curves: left out of the training curves figure."""
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
    (learning rate, step, ...) and the counts in NOT_CURVES are ignored. A key missing or None in
    some epochs (validation run every n epochs) is drawn only where present.
    """
    keys = [k for k in _ordered_keys(history) if k not in NOT_CURVES]
    loss_keys = [k for k in keys if k.endswith("loss")]
    metric_keys = [k for k in keys if k.startswith(VAL) and k not in loss_keys]

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
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
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


def read_history(path: Path) -> list[dict[str, float | None]]:
    """models/history.csv (one row per epoch) as plot_training_curves takes it; empty cells are None."""
    table = pd.read_csv(path)
    return [
        {str(k): None if pd.isna(v) else float(v) for k, v in row.items()}
        for row in table.to_dict(orient="records")
    ]


# ---------------------------------------------------------------- per-class scores


def write_per_class_csv(per_class: Mapping[str, Mapping[str, Any]], path: Path) -> Path:
    """metrics.scores' per_class as a table: one row per class, PER_CLASS_COLUMNS.

    Undefined scores (a class absent from the reference) are empty cells. DVC draws it as bars.
    """
    rows = [
        {"class": name, **{k: scores.get(k) for k in PER_CLASS_COLUMNS[1:]}}
        for name, scores in per_class.items()
    ]
    path = Path(path)
    with atomic_path(path) as tmp:
        pd.DataFrame(rows, columns=list(PER_CLASS_COLUMNS)).to_csv(tmp, index=False)
    return path


def plot_class_scores(
    per_class: Mapping[str, Mapping[str, Any]], path: Path, *, key: str = "f1", title: str | None = None
) -> Path:
    """Horizontal bars of one score per class, in the ISPRS colours, each with its value;
    a class without a value (absent from the reference) reads "n/a"."""
    names = list(per_class)
    values = [per_class[name].get(key) for name in names]
    colours = {c.name: _rgb(c.colour) for c in CLASSES}

    fig = Figure(figsize=CLASS_SCORES_FIGSIZE, dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    rows = np.arange(len(names))
    ax.barh(
        rows,
        [0.0 if v is None else float(v) for v in values],
        color=[colours.get(n, (0.5, 0.5, 0.5)) for n in names],
        edgecolor="0.3",
    )
    for row, value in enumerate(values):
        text = "n/a" if value is None else f"{float(value):.3f}"
        ax.text((0.0 if value is None else float(value)) + 0.01, float(row), text, va="center", fontsize=9)
    ax.set_yticks(rows, labels=[n.replace("_", " ") for n in names])
    ax.invert_yaxis()  # first class on top, as in the legend
    ax.set_xlim(0.0, 1.1)
    ax.set_xlabel(key)
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(title or f"Per-class {key}", fontsize=11)
    return _save(fig, path)


# ---------------------------------------------------------------- per-tile overlays


def display_rgb(
    image: np.ndarray, bands: Sequence[str] | None = None, percentiles: tuple[float, float] = (2, 98)
) -> np.ndarray:
    """(bands, H, W) -> (H, W, 3) float in [0, 1] to look at: IR-R-G false colour where the bands
    have ir, r and g (Vaihingen's look), else R-G-B, else the first three bands (or the first in
    grey); each channel stretched between its `percentiles`."""
    channels = []
    for b in _display_bands(image.shape[0], bands):
        band = np.asarray(image[b], dtype=np.float32)
        finite = band[np.isfinite(band)]
        low, high = np.percentile(finite, percentiles) if finite.size else (0.0, 1.0)
        scale = float(high - low) if high > low else 1.0
        channels.append(np.clip((band - low) / scale, 0.0, 1.0))
    return np.nan_to_num(np.stack(channels, axis=-1), nan=0.0)


def _rgb(colour: tuple[int, int, int]) -> tuple[float, float, float]:
    r, g, b = colour
    return r / 255.0, g / 255.0, b / 255.0


def _display_bands(count: int, bands: Sequence[str] | None) -> list[int]:
    names = [b.lower() for b in bands] if bands is not None and len(bands) == count else []
    for wanted in (("ir", "r", "g"), ("r", "g", "b")):
        if all(w in names for w in wanted):
            return [names.index(w) for w in wanted]
    return [0, 1, 2] if count >= 3 else [0, 0, 0]


def error_mask(prediction: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """True where the prediction is wrong; pixels the reference ignores (IGNORE_INDEX) never are."""
    prediction, reference = np.asarray(prediction), np.asarray(reference)
    if prediction.shape != reference.shape:
        raise ValueError(
            f"prediction shape {prediction.shape} differs from reference shape {reference.shape}"
        )
    return (reference != IGNORE_INDEX) & (prediction != reference)


def error_panel(rgb: np.ndarray, prediction: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """(H, W, 3) float: the image in light grey, the wrong pixels in pure red (ERROR_COLOUR)."""
    grey = 0.3 + 0.55 * (rgb @ np.array([0.2126, 0.7152, 0.0722]))
    panel = np.repeat(grey[..., None], 3, axis=-1)
    panel[error_mask(prediction, reference)] = ERROR_COLOUR
    return panel


def overlay_panels(
    image: np.ndarray,
    reference: np.ndarray,
    prediction: np.ndarray,
    reference_eroded: np.ndarray | None = None,
    *,
    bands: Sequence[str] | None = None,
    max_pixels: int | None = None,
) -> dict[str, np.ndarray]:
    """The four panels of an overlay as (h, w, 3) float RGB in [0, 1]: "image", "reference",
    "prediction" and "errors" (against `reference_eroded` where given, as the scores are).

    With `max_pixels`, a tile longer than that on a side is reduced by a whole factor: the image
    by averaging blocks, the labels by taking each block's centre pixel (classes never blend).
    Without, the panels are pixel for pixel.
    """
    scored = reference if reference_eroded is None else reference_eroded
    for name, labels in (("reference", reference), ("prediction", prediction), ("eroded", scored)):
        if labels.shape != image.shape[1:]:
            raise ValueError(f"{name} labels of shape {labels.shape}, but the image is {image.shape[1:]}")
    step = 1 if max_pixels is None else overlay_step(image.shape[1:], max_pixels)
    rgb = display_rgb(_block_mean(image, step), bands)
    reference, prediction, scored = (block_centres(a, step) for a in (reference, prediction, scored))
    return {
        "image": rgb,
        "reference": index_to_colours(reference.astype(np.uint8)) / 255.0,
        "prediction": index_to_colours(prediction.astype(np.uint8)) / 255.0,
        "errors": error_panel(rgb, prediction, scored),
    }


def _block_mean(image: np.ndarray, step: int) -> np.ndarray:
    if step == 1:
        return image
    h, w = image.shape[1] // step, image.shape[2] // step
    # A sum of step x step strided views: memory stays at the reduced size (tiles reach 6000 px).
    total = np.zeros((image.shape[0], h, w), dtype=np.float64)
    for i in range(step):
        for j in range(step):
            total += image[:, i : i + h * step : step, j : j + w * step : step]
    return (total / step**2).astype(np.float32)


def overlay_step(shape: Sequence[int], max_pixels: int = OVERLAY_MAX_PIXELS) -> int:
    """The whole factor that brings a (H, W) tile to at most `max_pixels` on its longer side."""
    return max(1, math.ceil(max(shape) / max_pixels))


def block_centres(labels: np.ndarray, step: int) -> np.ndarray:
    """Labels reduced by `step`: each step x step block's centre pixel (classes never blend)."""
    if step == 1:
        return labels
    h, w = labels.shape[0] // step, labels.shape[1] // step
    c = step // 2
    return labels[c : c + h * step : step, c : c + w * step : step]


def plot_overlay(
    image: np.ndarray,
    reference: np.ndarray,
    prediction: np.ndarray,
    path: Path,
    *,
    reference_eroded: np.ndarray | None = None,
    bands: Sequence[str] | None = None,
    title: str | None = None,
) -> Path:
    """One tile in four panels - image, ground truth, prediction, errors in red on grey - with the
    ISPRS legend: OVERLAY_FIGSIZE at OVERLAY_DPI, a large tile reduced for display (overlay_panels)."""
    panels = overlay_panels(
        image, reference, prediction, reference_eroded, bands=bands, max_pixels=OVERLAY_MAX_PIXELS
    )
    names = list(bands) if bands is not None and len(bands) == image.shape[0] else []
    composite = "-".join(names[i].upper() for i in _display_bands(image.shape[0], names)) if names else ""
    titles = {
        "image": f"Image ({composite})" if composite else "Image",
        "reference": "Ground truth",
        "prediction": "Prediction",
        "errors": "Errors in red" + (" (boundary ignored)" if reference_eroded is not None else ""),
    }
    fig = Figure(figsize=OVERLAY_FIGSIZE, dpi=OVERLAY_DPI, layout="constrained")
    for ax, (name, panel) in zip(fig.subplots(1, 4), panels.items(), strict=True):
        # Nearest: the panels are already at display size; label colours must not blend.
        ax.imshow(panel, interpolation="nearest")
        ax.set_title(titles[name], fontsize=11)
        ax.set_axis_off()
    # Classes only: clutter is red too, and the errors panel says what its red means.
    handles = [
        Patch(facecolor=_rgb(c.colour), edgecolor="0.3", label=c.name.replace("_", " ")) for c in CLASSES
    ]
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=10, frameon=False)
    if title:
        fig.suptitle(title, fontsize=12)
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=OVERLAY_DPI)
    return path


# ---------------------------------------------------------------- README gallery

GALLERY_FIGURES = ("training_curves.png", "confusion_matrix_normalized.png", "per_class_f1.png")
GALLERY_MAX_WIDTH = 1200
GALLERY_MAX_BYTES = 200_000
GALLERY_MIN_WIDTH = 400


def make_gallery(
    reports: Path,
    out: Path,
    *,
    max_overlays: int = 2,
    max_width: int = GALLERY_MAX_WIDTH,
    max_bytes: int = GALLERY_MAX_BYTES,
) -> list[Path]:
    """Copy the report figures and the first `max_overlays` tile overlays into `out`, each at most
    `max_width` px wide and `max_bytes` (fewer colours if need be). The PNGs already in `out` are
    removed first, so the gallery is exactly the last run's. Returns the files written."""
    reports, out = Path(reports), Path(out)
    overlays = sorted((reports / "overlays").glob("*.png"))[:max_overlays]
    sources = [reports / name for name in GALLERY_FIGURES] + overlays
    missing = [str(p) for p in sources if not p.is_file()] + (
        [] if overlays else [f"{reports}/overlays/*.png"]
    )
    if missing:
        raise FileNotFoundError(f"{', '.join(missing)}: not there; run the pipeline first (make repro)")
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.png"):
        old.unlink()
    return [
        shrink_png(
            source,
            out / (f"overlay_{source.name}" if source in overlays else source.name),
            max_width=max_width,
            max_bytes=max_bytes,
        )
        for source in sources
    ]


def shrink_png(source: Path, dest: Path, *, max_width: int, max_bytes: int) -> Path:
    """`source` as a PNG at most `max_width` px wide and, where it can be, `max_bytes`: in full
    colour if that fits, else with an adaptive palette of 256 or 64 colours, else narrower (by
    steps of 20 %, down to GALLERY_MIN_WIDTH px)."""
    with Image.open(source) as opened:
        original = opened.convert("RGB")
    width = min(max_width, original.width)
    while True:
        image = original
        if width != original.width:
            height = max(1, round(original.height * width / original.width))
            image = original.resize((width, height), Image.Resampling.LANCZOS)
        for candidate in (image, *(image.quantize(colors=n, dither=Image.Dither.NONE) for n in (256, 64))):
            encoded = io.BytesIO()
            candidate.save(encoded, format="PNG", optimize=True)
            if encoded.tell() <= max_bytes:
                break
        if encoded.tell() <= max_bytes or width <= GALLERY_MIN_WIDTH:
            break
        width = max(GALLERY_MIN_WIDTH, int(width * 0.8))
    dest = Path(dest)
    with atomic_path(dest) as tmp:
        tmp.write_bytes(encoded.getvalue())
    return dest


def main() -> None:
    """`make gallery`: docs/gallery/ from the reports of the last pipeline run (paths.reports)."""
    from aerialseg.config import load_params

    for path in make_gallery(load_params().paths.reports, Path("docs/gallery")):
        print(f"{path} ({path.stat().st_size / 1000:.0f} kB)")


if __name__ == "__main__":
    main()
