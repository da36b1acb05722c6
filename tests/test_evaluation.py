"""`evaluate` per test tile on the full reference, and the lecture preset's comparison with the
lecture's published figures (src/aerialseg/published.py)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from affine import Affine
from rasterio.crs import CRS
from sklearn.metrics import confusion_matrix as sk_confusion_matrix

from aerialseg import evaluation
from aerialseg.classes import CLASS_NAMES, IGNORE_INDEX, NUM_CLASSES
from aerialseg.config import Params
from aerialseg.evaluation import (
    COMPARISON_COLUMNS,
    LECTURE_COMPARISON,
    evaluate,
    lecture_comparison,
    write_lecture_comparison,
)
from aerialseg.model_card import ModelCard
from aerialseg.published import LECTURE, LECTURE_TILES, lecture_overall_accuracy_text, lecture_setting
from aerialseg.raster import GeoReference, write_raster
from aerialseg.tracking import RunRef

SIZES = {"15": (24, 30), "23": (20, 28)}
"""Test tiles named as the lecture's (Vaihingen areas 15 and 23), small."""
BANDS = ["ir", "r", "g"]


def _trained(source: str = "vaihingen", pretrained: str = "none") -> dict[str, Any]:
    """The params a checkpoint carries (`config`), as much of them as evaluate reads."""
    return {
        "data": {"source": source, "bands": BANDS},
        "model": {"arch": "fcn_skip", "encoder": "resnet50"},
        "train": {"epochs": 20, "pretrained": pretrained},
    }


def _write_tiles(tiles: Path) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Test tiles whose first band holds the class the fake model will predict; returns per tile
    id (prediction, full reference, eroded reference)."""
    rng = np.random.default_rng(7)
    georef = GeoReference(CRS.from_epsg(32632), Affine(0.09, 0, 500_000, 0, -0.09, 5_400_000))
    tiles.mkdir(parents=True)
    rows, truth = [], {}
    for tile_id, (height, width) in SIZES.items():
        label = rng.integers(0, NUM_CLASSES, size=(height, width)).astype(np.uint8)
        label[0, :] = 0  # every class present, clutter included, in the full reference
        pred = np.where(rng.random(label.shape) < 0.3, rng.integers(0, NUM_CLASSES, label.shape), label)
        pred = pred.astype(np.uint8)
        eroded = np.where(rng.random(label.shape) < 0.2, IGNORE_INDEX, label).astype(np.uint8)
        image = np.zeros((len(BANDS), height, width), dtype=np.float32)
        image[0] = pred
        name = f"area{tile_id}"
        write_raster(tiles / f"{name}_image.tif", image, georef)
        write_raster(tiles / f"{name}_label.tif", label, georef)
        write_raster(tiles / f"{name}_label_eroded.tif", eroded, georef)
        rows.append(
            {
                "tile": name,
                "tile_id": tile_id,
                "split": "test",
                "height": height,
                "width": width,
                "image": f"{name}_image.tif",
                "label": f"{name}_label.tif",
                "label_eroded": f"{name}_label_eroded.tif",
            }
        )
        truth[tile_id] = (pred, label, eroded)
    pd.DataFrame(rows).to_csv(tiles / "tiles.csv", index=False)
    return truth


class FirstBandClasses(torch.nn.Module):
    """A network whose logits pick, per pixel, the class in the image's first band: it runs through
    the real engine (windows, blending, TTA), and every window agrees with every other."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        classes = x[:, 0].round().long().clamp(0, NUM_CLASSES - 1)
        return 10.0 * torch.nn.functional.one_hot(classes, NUM_CLASSES).permute(0, 3, 1, 2).float()


def _fake_model(monkeypatch: pytest.MonkeyPatch, trained: dict[str, Any]) -> None:
    """A checkpoint whose model predicts, per pixel, the class in the image's first band."""
    args = {"arch": "fpn", "encoder_name": "resnet18", "in_channels": len(BANDS), "classes": NUM_CLASSES}
    card = ModelCard.for_training(
        args, bands=BANDS, mean=[0.0] * len(BANDS), std=[1.0] * len(BANDS), window=32, config=trained
    )

    def load_checkpoint(path: Path, device: str) -> tuple[torch.nn.Module, ModelCard]:
        return FirstBandClasses(), card

    monkeypatch.setattr(evaluation, "load_checkpoint", load_checkpoint)


@pytest.fixture
def lecture_run(
    tmp_path: Path, small_params: Callable[..., Params], monkeypatch: pytest.MonkeyPatch
) -> tuple[dict[str, Any], Params, dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], str]:
    """`evaluate` run on two small "Vaihingen 15 and 23" test tiles with a fake model trained from
    scratch, into a tmp SQLite MLflow store: (metrics, params, per tile truth, MLflow URI)."""
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_STAGE", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = MlflowClient(uri)
    experiment = client.create_experiment("lecture-vaihingen", (tmp_path / "artifacts").as_uri())
    run = client.create_run(experiment, run_name="lecture")
    client.set_terminated(run.info.run_id)
    (tmp_path / "models").mkdir()
    RunRef(run.info.run_id, experiment, "lecture-vaihingen").save(tmp_path / "models" / "mlflow_run.json")
    truth = _write_tiles(tmp_path / "data" / "tiles")
    _fake_model(monkeypatch, _trained())
    params = small_params(
        tmp_path,
        {
            "data.source": "vaihingen",
            "data.raw_dir": "data/raw/vaihingen",
            "data.bands": BANDS,
            "data.val_tiles": ["37"],
            "data.test_tiles": list(SIZES),
            "paths.tiles": "data/tiles",
        },
    )
    return evaluate(params), params, truth, uri


def test_evaluate_reports_each_tile_on_the_full_reference(lecture_run: Any) -> None:
    metrics, params, truth, _ = lecture_run
    scores = json.loads((params.paths.reports / "scores.json").read_text())
    total = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=np.int64)
    for tile_id, (pred, label, eroded) in truth.items():
        tile = scores["tiles"][f"area{tile_id}"]
        assert tile["tile_id"] == tile_id
        # Independently: scikit-learn's confusion matrix of every pixel (boundaries included).
        expected = sk_confusion_matrix(label.ravel(), pred.ravel(), labels=list(range(NUM_CLASSES)))
        total += expected
        full = tile["full_reference"]
        assert full["confusion_matrix"] == expected.tolist()
        assert full["pixels"] == label.size == int(expected.sum())
        assert full["overall_accuracy"] == pytest.approx(np.mean(pred == label))
        assert full["overall_accuracy"] == tile["overall_accuracy_full"]
        for i, name in enumerate(CLASS_NAMES):
            assert full["recall"][name] == pytest.approx(np.mean(pred[label == i] == i))
        # The headline figures stay on the eroded reference, boundary pixels left out.
        counted = eroded != IGNORE_INDEX
        assert tile["pixels"] == int(counted.sum()) < full["pixels"]
        assert tile["overall_accuracy"] == pytest.approx(np.mean(pred[counted] == eroded[counted]))
    assert scores["full_reference"]["confusion_matrix"] == total.tolist()
    assert metrics["full_reference"]["overall_accuracy"] == pytest.approx(np.trace(total) / total.sum())
    # metrics.json, the summary DVC shows, keeps its keys.
    summary = json.loads((params.paths.reports / "metrics.json").read_text())
    assert "full_reference" not in summary and "tiles" not in summary


def test_lecture_runs_get_the_comparison_file_and_per_tile_mlflow_metrics(lecture_run: Any) -> None:
    from mlflow import MlflowClient

    metrics, params, truth, uri = lecture_run
    out = params.paths.reports
    table = pd.read_csv(out / "lecture_comparison.csv", dtype={"tile": str})
    assert tuple(table.columns) == COMPARISON_COLUMNS
    assert list(table["tile"].unique()) == ["area15", "area23"]
    assert set(table["compared_with"]) == {"from_scratch"}  # train.pretrained none
    for tile_id, (pred, label, _) in truth.items():
        rows = table[table["tile"] == f"area{tile_id}"].set_index("figure")
        assert list(rows.index) == ["pixels", "overall_accuracy", *(f"recall_{c}" for c in CLASS_NAMES)]
        oa = rows.loc["overall_accuracy"]
        assert oa["ours"] == pytest.approx(np.mean(pred == label))
        assert oa["lecture_from_scratch"] == LECTURE[(tile_id, "from_scratch")].overall_accuracy
        assert oa["lecture_imagenet"] == LECTURE[(tile_id, "imagenet")].overall_accuracy
        assert oa["difference"] == pytest.approx(oa["ours"] - oa["lecture_from_scratch"])
        assert rows.loc["pixels", "ours"] == label.size
        assert rows.loc["pixels", "lecture_from_scratch"] == LECTURE[(tile_id, "from_scratch")].pixels
        car = rows.loc["recall_car"]
        assert car["ours"] == pytest.approx(np.mean(pred[label == 4] == 4))
        assert car["lecture_imagenet"] == pytest.approx(LECTURE[(tile_id, "imagenet")].recall[4])
    text = (out / "lecture_comparison.md").read_text()
    assert "## area15" in text and "## area23" in text and "**full** reference" in text
    assert "| overall_accuracy |" in text and "80.68%" in text and "78.78%" in text
    assert "82.15%" in text and "82.04%" in text and "from_scratch" in text
    # Each tile's confusion matrix on the full reference, ours and the lecture's matching one.
    assert "Confusion matrix, this run" in text and "Confusion matrix, the lecture's, from_scratch" in text
    assert "| impervious surfaces | 678,470 | 27,787 |" in text  # the lecture's, area 15

    run = MlflowClient(uri).get_run(json.loads((out / "metrics.json").read_text())["mlflow_run_id"])
    for tile_id in SIZES:
        tile = metrics["tiles"][f"area{tile_id}"]
        assert run.data.metrics[f"test_area{tile_id}_overall_accuracy_full"] == pytest.approx(
            tile["overall_accuracy_full"]
        )
        assert run.data.metrics[f"test_area{tile_id}_overall_accuracy"] == pytest.approx(
            tile["overall_accuracy"]
        )
    assert run.data.tags["lecture_comparison"] == "from_scratch"
    artifacts = {a.path for a in MlflowClient(uri).list_artifacts(run.info.run_id, "evaluation")}
    assert {f"evaluation/{name}" for name in LECTURE_COMPARISON} <= artifacts


def test_comparison_picks_the_lecture_training_that_matches_and_skips_other_data(tmp_path: Path) -> None:
    per_tile = {
        "area15": {
            "tile_id": "15",
            "full_reference": {
                "overall_accuracy": 0.9,
                "recall": dict.fromkeys(CLASS_NAMES, 0.5),
                "pixels": 100,
            },
        },
        "area7": {"tile_id": "7", "full_reference": {}},  # not a lecture tile: no rows
    }
    imagenet = lecture_comparison(per_tile, _trained(pretrained="imagenet"))
    assert set(imagenet["tile"]) == {"area15"} and set(imagenet["compared_with"]) == {"imagenet"}
    oa = imagenet.set_index("figure").loc["overall_accuracy"]
    assert oa["difference"] == pytest.approx(0.9 - 0.8215)
    local = lecture_comparison(per_tile, _trained(pretrained="weights/encoder.pth"))
    assert set(local["compared_with"]) == {""} and local["difference"].isna().all()
    write_lecture_comparison(local, tmp_path, _trained(pretrained="weights/encoder.pth"))
    assert "neither" in (tmp_path / "lecture_comparison.md").read_text()
    # Synthetic scenes number their areas too; a model trained on them does not compare.
    synthetic = lecture_comparison(per_tile, _trained(source="synthetic"))
    assert synthetic.empty and tuple(synthetic.columns) == COMPARISON_COLUMNS
    write_lecture_comparison(synthetic, tmp_path, _trained(source="synthetic"))
    # Always written (a DVC output), only the header when there is nothing to compare.
    assert (tmp_path / "lecture_comparison.csv").read_text().strip() == ",".join(COMPARISON_COLUMNS)
    assert "No comparison" in (tmp_path / "lecture_comparison.md").read_text()
    assert lecture_comparison(per_tile, {}).empty  # a checkpoint without its params


def test_the_published_lecture_figures_are_consistent_with_its_confusion_matrices() -> None:
    pixels = {"15": 1919 * 2565, "23": 1903 * 2546}
    assert pixels == {"15": 4_922_235, "23": 4_845_038}
    for (tile, _), result in LECTURE.items():
        cm = np.asarray(result.confusion_matrix)
        assert cm.shape == (NUM_CLASSES, NUM_CLASSES) and result.pixels == pixels[tile]
        # The printed OA (two decimals, percent) is the matrix's trace over its sum: the full reference.
        assert round(100 * np.trace(cm) / cm.sum(), 2) == round(100 * result.overall_accuracy, 2)
        assert [round(100 * r, 1) for r in result.recall] == list(result.recall_percent)
    assert lecture_setting("none") == "from_scratch" and lecture_setting("ImageNet") == "imagenet"
    assert lecture_setting("weights.pth") is None
    assert set(LECTURE_TILES) == set(pixels)
    assert lecture_overall_accuracy_text() == (
        "OA 80.68% / 78.78% from scratch, 82.15% / 82.04% with ImageNet weights (areas 15 / 23)"
    )
