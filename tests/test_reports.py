from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from aerialseg.classes import CLASSES, IGNORE_INDEX, NUM_CLASSES
from aerialseg.reports import (
    CONFUSION_FIGSIZE,
    CURVES_FIGSIZE,
    DPI,
    format_count,
    normalize_rows,
    plot_confusion_matrix,
    plot_training_curves,
    save_label_png,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _open_png(path: Path) -> Image.Image:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = Image.open(path)
    image.load()
    assert image.format == "PNG"
    return image


def _only_file_is(folder: Path, name: str) -> None:
    # atomic_path writes a hidden sibling first; nothing but the final file may remain.
    assert [p.name for p in folder.iterdir()] == [name]


def _figure_pixels(figsize: tuple[float, float]) -> tuple[int, int]:
    return round(figsize[0] * DPI), round(figsize[1] * DPI)


def _example_cm() -> np.ndarray:
    rng = np.random.default_rng(0)
    cm = rng.integers(0, 5_000, size=(NUM_CLASSES, NUM_CLASSES))
    cm[np.diag_indices(NUM_CLASSES)] = rng.integers(100_000, 3_000_000, size=NUM_CLASSES)
    cm[-1] = 0  # clutter absent from the reference, as in some test tiles
    return cm


@pytest.mark.parametrize("normalize", [False, True])
def test_confusion_matrix_png(tmp_path: Path, normalize: bool) -> None:
    out = tmp_path / "confusion.png"
    assert plot_confusion_matrix(_example_cm(), out, normalize=normalize) == out
    image = _open_png(out)
    assert image.size == _figure_pixels(CONFUSION_FIGSIZE)
    _only_file_is(tmp_path, "confusion.png")


def test_confusion_matrix_rejects_wrong_names(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="class names"):
        plot_confusion_matrix(np.zeros((3, 3)), tmp_path / "x.png")
    assert list(tmp_path.iterdir()) == []


def test_normalize_rows_sums_to_one_and_leaves_empty_rows_zero() -> None:
    normalised = normalize_rows(_example_cm())
    assert np.isfinite(normalised).all()
    np.testing.assert_allclose(normalised[:-1].sum(axis=1), 1.0)
    np.testing.assert_array_equal(normalised[-1], 0.0)


def test_format_count() -> None:
    assert format_count(0) == "0"
    assert format_count(987) == "987"
    assert format_count(12_345) == "12.3k"
    assert format_count(123_456) == "123k"
    assert format_count(4_560_000) == "4.56M"
    assert format_count(2_000_000_000) == "2G"


def test_label_png_is_exact(tmp_path: Path) -> None:
    index = np.zeros((37, 53), dtype=np.uint8)
    index[0, 0] = 1
    index[10, 20] = 4
    index[36, 52] = 5
    index[5, 5] = IGNORE_INDEX
    out = tmp_path / "label.png"
    assert save_label_png(index, out) == out

    image = _open_png(out)
    assert image.size == (53, 37)  # PIL reports (width, height)
    assert image.mode == "RGB"
    rgb = np.asarray(image)
    assert tuple(rgb[0, 0]) == CLASSES[1].colour
    assert tuple(rgb[10, 20]) == CLASSES[4].colour
    assert tuple(rgb[36, 52]) == CLASSES[5].colour
    assert tuple(rgb[1, 1]) == CLASSES[0].colour
    assert tuple(rgb[5, 5]) == (0, 0, 0)
    _only_file_is(tmp_path, "label.png")


def test_label_png_rejects_non_2d(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        save_label_png(np.zeros((2, 3, 3), np.uint8), tmp_path / "x.png")


def test_training_curves_png(tmp_path: Path) -> None:
    history = [
        {
            "epoch": e,
            "train_loss": 1.0 / (e + 1),
            "val_loss": 1.2 / (e + 1),
            "val_overall_accuracy": 0.5 + 0.1 * e,
            "val_mean_f1": 0.4 + 0.1 * e,
        }
        for e in range(4)
    ]
    history[1].pop("val_loss")  # validation skipped that epoch
    out = tmp_path / "curves.png"
    assert plot_training_curves(history, out) == out
    assert _open_png(out).size == _figure_pixels(CURVES_FIGSIZE)
    _only_file_is(tmp_path, "curves.png")


def test_training_curves_with_no_metrics(tmp_path: Path) -> None:
    out = tmp_path / "curves.png"
    plot_training_curves([{"epoch": 0, "train_loss": 0.7}], out)
    assert _open_png(out).size == _figure_pixels(CURVES_FIGSIZE)
    plot_training_curves([], out)
    _open_png(out)
