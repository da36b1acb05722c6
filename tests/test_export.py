"""`aerialseg export`: an ONNX model with dynamic size and the metadata, whose classes onnxruntime
reproduces; a model it does not reproduce fails the export and leaves no file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from aerialseg.checkpoint import load_checkpoint, save_checkpoint
from aerialseg.cli import app
from aerialseg.export import ExportError, export_onnx, read_model_card
from aerialseg.model import build_model, model_args
from aerialseg.model_card import ModelCard
from aerialseg.patches import BandStats

BANDS = ["ir", "r", "g", "dsm"]
STATS = BandStats(mean=(0.45, 0.35, 0.3, 2.0), std=(0.2, 0.15, 0.15, 3.0))
PATCH = 64

runner = CliRunner()


def _checkpoint(path: Path, arch: str) -> tuple[Path, nn.Module]:
    torch.manual_seed(0)
    args = model_args(arch, "resnet18", len(BANDS), 6)
    model = build_model(args).eval()
    card = ModelCard.for_training(args, bands=BANDS, mean=STATS.mean, std=STATS.std, window=PATCH)
    save_checkpoint(path, model, card)
    return path, model


def _onnx_classes(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(["logits"], {"image": x})[0]).argmax(axis=1)


def test_export_writes_a_dynamic_onnx_model_with_pytorchs_classes(tmp_path: Path) -> None:
    """The default (dynamo) exporter through the command, then an independent check on an input
    of another batch size and another, non-square spatial size."""
    checkpoint, model = _checkpoint(tmp_path / "model.ckpt", "fcn_skip")
    out = tmp_path / "onnx" / "model.onnx"
    result = runner.invoke(app, ["export", "--model", str(checkpoint), "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert "(0 differ" in result.output
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.onnx"]  # one file, no weights beside it

    x = np.random.default_rng(1).standard_normal((3, len(BANDS), 96, 160)).astype(np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).argmax(dim=1).numpy()
    assert np.array_equal(_onnx_classes(out, x), expected)

    card = read_model_card(out)
    assert card.bands == tuple(BANDS) and card.window == PATCH
    assert card.band_mean == pytest.approx(STATS.mean)
    proto = onnx.load(str(out))
    props = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(props["band_std"]) == pytest.approx(STATS.std)
    assert json.loads(props["classes"])[4]["name"] == "car"
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", len(BANDS), "height", "width"]


def test_the_torchscript_exporter_gives_the_same_classes_for_the_default_architecture(tmp_path: Path) -> None:
    _, model = _checkpoint(tmp_path / "model.ckpt", "fpn")
    _, card = load_checkpoint(tmp_path / "model.ckpt")
    result = export_onnx(model, card, tmp_path / "fpn.onnx", exporter="torchscript", check_size=(128, 96))
    assert result.parity.ok and result.parity.disagreeing_pixels == 0
    assert result.parity.shape == (2, len(BANDS), 128, 96)
    assert result.parity.max_abs_logit_diff < 1e-3


class SizeSpecialised(nn.Module):
    """Python control flow on the input size: tracing keeps the branch of the export size only,
    so at any other size the ONNX graph computes something else than PyTorch."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(len(BANDS), 6, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.conv(x)
        return logits if x.shape[-1] == PATCH else -logits


def test_a_model_onnxruntime_does_not_reproduce_fails_the_export_and_leaves_no_file(tmp_path: Path) -> None:
    card = ModelCard.for_training({}, bands=BANDS, mean=[0.0] * 4, std=[1.0] * 4, window=PATCH)
    out = tmp_path / "bad.onnx"
    with pytest.raises(ExportError, match="onnxruntime does not reproduce PyTorch"):
        export_onnx(SizeSpecialised().eval(), card, out, exporter="torchscript")
    assert list(tmp_path.iterdir()) == []


def test_export_of_a_missing_model_fails_clearly(tmp_path: Path) -> None:
    out = tmp_path / "model.onnx"
    result = runner.invoke(app, ["export", "--model", str(tmp_path / "none.ckpt"), "--output", str(out)])
    assert result.exit_code == 1
    assert "none.ckpt: no such file" in result.output
    assert not out.exists()
