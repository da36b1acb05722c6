from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from aerialseg.classes import CLASS_NAMES, CLASSES, IGNORE_INDEX, NUM_CLASSES
from aerialseg.evaluation import SUMMARY_KEYS, summary
from aerialseg.metrics import scores
from aerialseg.reports import (
    CLASS_SCORES_FIGSIZE,
    CONFUSION_FIGSIZE,
    CURVES_FIGSIZE,
    DPI,
    ERROR_COLOUR,
    OVERLAY_DPI,
    OVERLAY_FIGSIZE,
    PER_CLASS_COLUMNS,
    display_rgb,
    error_mask,
    format_count,
    make_gallery,
    normalize_rows,
    overlay_panels,
    plot_class_scores,
    plot_confusion_matrix,
    plot_overlay,
    plot_training_curves,
    read_history,
    save_label_png,
    shrink_png,
    write_per_class_csv,
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


def _figure_pixels(figsize: tuple[float, float], dpi: int = DPI) -> tuple[int, int]:
    return round(figsize[0] * dpi), round(figsize[1] * dpi)


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


def test_training_curves_leave_the_pixel_count_out(tmp_path: Path) -> None:
    history_csv = tmp_path / "history.csv"
    history_csv.write_text(
        "epoch,val_loss,val_overall_accuracy,val_mean_f1,val_pixels,train_loss\n"
        "0.0,1.5,0.40,0.20,36864.0,1.9\n"
        "1.0,,0.55,0.31,36864.0,1.2\n"
    )
    history = read_history(history_csv)
    assert history[1] == {
        "epoch": 1.0,
        "val_loss": None,
        "val_overall_accuracy": 0.55,
        "val_mean_f1": 0.31,
        "val_pixels": 36864.0,
        "train_loss": 1.2,
    }
    out = plot_training_curves(history, tmp_path / "curves.png")
    assert _open_png(out).size == _figure_pixels(CURVES_FIGSIZE)


# ---------------------------------------------------------------- per-class scores


def _scores() -> dict:
    return scores(_example_cm())


def test_per_class_csv_matches_the_scores(tmp_path: Path) -> None:
    result = _scores()
    out = write_per_class_csv(result["per_class"], tmp_path / "per_class.csv")
    table = pd.read_csv(out)
    assert tuple(table.columns) == PER_CLASS_COLUMNS
    assert table["class"].tolist() == list(CLASS_NAMES)
    for row in table.itertuples():
        expected = result["per_class"][row[1]]
        for column, value in zip(PER_CLASS_COLUMNS[1:], row[2:], strict=True):
            if expected[column] is None:
                assert np.isnan(value)  # clutter: absent from the reference, an empty cell
            else:
                assert value == pytest.approx(expected[column], rel=1e-12)
    assert out.read_text().splitlines()[-1] == "clutter,,0.0,,"
    _only_file_is(tmp_path, "per_class.csv")


def test_class_scores_png(tmp_path: Path) -> None:
    out = plot_class_scores(_scores()["per_class"], tmp_path / "f1.png")
    assert _open_png(out).size == _figure_pixels(CLASS_SCORES_FIGSIZE)
    _only_file_is(tmp_path, "f1.png")


def test_metrics_json_is_the_summary_and_scores_json_the_details() -> None:
    details = {**_scores(), "overall_accuracy_full": 0.9, "tiles": {"area7": {}}, "mlflow_run_id": "abc"}
    compact = summary(details)
    assert list(compact) == [*SUMMARY_KEYS, "f1", "mlflow_run_id"]
    assert compact["f1"] == {name: cls["f1"] for name, cls in details["per_class"].items()}
    assert compact["mlflow_run_id"] == "abc" and compact["overall_accuracy_full"] == 0.9
    # Flat enough for `dvc metrics show`: numbers, or one level of numbers per class.
    assert all(isinstance(v, int | float | str | dict) for v in compact.values())
    assert "per_class" not in compact and "tiles" not in compact


# ---------------------------------------------------------------- overlays


def _tile(height: int, width: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = rng.random((4, height, width), dtype=np.float32)
    reference = rng.integers(0, NUM_CLASSES, size=(height, width)).astype(np.uint8)
    prediction = reference.copy()
    wrong = rng.random((height, width)) < 0.2
    prediction[wrong] = (reference[wrong] + 1) % NUM_CLASSES
    eroded = reference.copy()
    eroded[rng.random((height, width)) < 0.1] = IGNORE_INDEX
    return image, reference, prediction, eroded


def test_error_mask_ignores_the_boundary() -> None:
    reference = np.array([[0, 1, IGNORE_INDEX], [2, 3, IGNORE_INDEX]], dtype=np.uint8)
    prediction = np.array([[0, 2, 4], [2, 4, 1]], dtype=np.uint8)
    np.testing.assert_array_equal(
        error_mask(prediction, reference), [[False, True, False], [False, True, False]]
    )
    with pytest.raises(ValueError, match="shape"):
        error_mask(prediction, reference[:, :2])


def test_overlay_error_panel_marks_exactly_the_wrong_pixels() -> None:
    image, reference, prediction, eroded = _tile(40, 56)
    panels = overlay_panels(image, reference, prediction, eroded, bands=["ir", "r", "g", "dsm"])
    assert {name: p.shape for name, p in panels.items()} == dict.fromkeys(panels, (40, 56, 3))
    red = np.all(panels["errors"] == ERROR_COLOUR, axis=-1)
    wrong = (eroded != IGNORE_INDEX) & (prediction != eroded)
    assert wrong.sum() > 100 and ((prediction != reference) & (eroded == IGNORE_INDEX)).any()
    np.testing.assert_array_equal(red, wrong)
    # Everywhere else a grey: equal channels.
    rest = panels["errors"][~red]
    np.testing.assert_array_equal(rest[:, 0], rest[:, 1])
    np.testing.assert_array_equal(rest[:, 1], rest[:, 2])
    # Label panels in the ISPRS colours, pixel for pixel.
    assert tuple(np.round(panels["reference"][3, 5] * 255).astype(int)) == CLASSES[reference[3, 5]].colour
    assert tuple(np.round(panels["prediction"][7, 9] * 255).astype(int)) == CLASSES[prediction[7, 9]].colour


def test_overlay_reduces_large_tiles_without_blending_labels() -> None:
    image, reference, prediction, eroded = _tile(300, 450, seed=1)
    panels = overlay_panels(image, reference, prediction, eroded, max_pixels=100)
    # 450 / 100 -> every 5th pixel: (60, 90), the labels taken at each block's centre.
    assert panels["image"].shape == panels["reference"].shape == (60, 90, 3)
    colours = np.array([c.colour for c in CLASSES]) / 255.0
    np.testing.assert_allclose(panels["reference"], colours[reference[2::5, 2::5]])
    red = np.all(panels["errors"] == ERROR_COLOUR, axis=-1)
    np.testing.assert_array_equal(red, error_mask(prediction[2::5, 2::5], eroded[2::5, 2::5]))


def test_display_rgb_picks_false_colour_and_stretches() -> None:
    ramp = np.arange(100, dtype=np.float32).reshape(10, 10) / 99.0
    image = np.stack([ramp * scale for scale in (0.1, 0.2, 0.3, 0.4)])
    rgb = display_rgb(image, ["r", "g", "b", "ir"])  # Potsdam order: IR-R-G is bands 3, 0, 1
    assert rgb.shape == (10, 10, 3)
    for channel, band in enumerate((3, 0, 1)):
        low, high = np.percentile(image[band], (2, 98))
        np.testing.assert_allclose(
            rgb[..., channel], np.clip((image[band] - low) / (high - low), 0, 1), atol=1e-6
        )
    assert rgb.min() == 0.0 and rgb.max() == 1.0  # the 2 % darkest and brightest saturate
    np.testing.assert_allclose(display_rgb(image[[3, 0, 1, 2]], ["ir", "r", "g", "b"]), rgb)
    assert display_rgb(image[:1], ["dsm"]).shape == (10, 10, 3)  # one band: grey


@pytest.mark.parametrize(("height", "width"), [(48, 64), (1500, 2100)])
def test_overlay_png_has_the_readable_size(tmp_path: Path, height: int, width: int) -> None:
    image, reference, prediction, eroded = _tile(height, width)
    out = plot_overlay(
        image,
        reference,
        prediction,
        tmp_path / "area7.png",
        reference_eroded=eroded,
        bands=["ir", "r", "g", "dsm"],
        title="area7: overall accuracy 80.0%",
    )
    assert _open_png(out).size == _figure_pixels(OVERLAY_FIGSIZE, OVERLAY_DPI) == (1600, 450)
    _only_file_is(tmp_path, "area7.png")


# ---------------------------------------------------------------- README gallery


def _fake_reports(reports: Path) -> None:
    plot_confusion_matrix(_example_cm(), reports / "confusion_matrix_normalized.png", normalize=True)
    plot_class_scores(_scores()["per_class"], reports / "per_class_f1.png")
    plot_training_curves(
        [{"epoch": 0, "train_loss": 1.0}, {"epoch": 1, "train_loss": 0.5}], reports / "training_curves.png"
    )
    for tile in ("area7", "area8", "area9"):
        # Blocks of 16 px rather than noise: pictures that compress the way real overlays do.
        image, reference, prediction, eroded = (
            a.repeat(16, axis=-1).repeat(16, axis=-2) for a in _tile(16, 16)
        )
        plot_overlay(
            image, reference, prediction, reports / "overlays" / f"{tile}.png", reference_eroded=eroded
        )


def test_gallery_is_small_pngs_of_the_last_run(tmp_path: Path) -> None:
    reports, gallery = tmp_path / "reports", tmp_path / "docs" / "gallery"
    _fake_reports(reports)
    gallery.mkdir(parents=True)
    (gallery / "overlay_area1.png").write_bytes(b"stale")
    (gallery / "notes.md").write_text("kept")
    written = make_gallery(reports, gallery, max_overlays=2, max_width=1000, max_bytes=150_000)
    assert sorted(p.name for p in gallery.iterdir()) == [
        "confusion_matrix_normalized.png",
        "notes.md",
        "overlay_area7.png",
        "overlay_area8.png",
        "per_class_f1.png",
        "training_curves.png",
    ]
    assert sorted(written) == sorted(gallery.glob("*.png"))
    for path in written:
        image = _open_png(path)
        assert image.width <= 1000 and path.stat().st_size <= 150_000, path.name
    assert _open_png(gallery / "overlay_area7.png").size == (1000, round(450 * 1000 / 1600))


def test_gallery_needs_a_pipeline_run(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="make repro"):
        make_gallery(tmp_path / "reports", tmp_path / "gallery")
    assert not (tmp_path / "gallery").exists()


def test_shrink_png_falls_back_to_fewer_colours_then_fewer_pixels(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, size=(20, 30, 3), dtype=np.uint8).repeat(10, axis=0).repeat(10, axis=1)
    source = tmp_path / "blocks.png"
    Image.fromarray(blocks).save(source)  # 300 x 200, 600 colours
    full = shrink_png(source, tmp_path / "full.png", max_width=1000, max_bytes=10**6)
    assert _open_png(full).size == (300, 200) and _open_png(full).mode == "RGB"
    few = shrink_png(source, tmp_path / "few.png", max_width=1000, max_bytes=full.stat().st_size - 1)
    assert _open_png(few).size == (300, 200) and _open_png(few).mode == "P"
    noise = tmp_path / "noise.png"
    Image.fromarray(rng.integers(0, 256, size=(300, 600, 3), dtype=np.uint8)).save(noise)
    small = shrink_png(noise, tmp_path / "small.png", max_width=600, max_bytes=80_000)
    assert _open_png(small).width < 600 and small.stat().st_size <= 80_000
