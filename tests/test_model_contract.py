"""The contract every architecture of model.ARCHITECTURES keeps, through the one factory.

One base class of tests (smp keeps one, tests/models/base.py, that each architecture's test
subclasses), run for every registry entry: 4 bands, 6 classes, a 64 px input (the entry's smallest
where it needs more), a ResNet18 encoder (a tiny timm ViT for dpt). Output shape, gradients that
reach the encoder, the registry's input rule, the checkpoint round trip and the ONNX export (or the
clear error of an architecture that has none). Exports that take over ~10 s are marked slow.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from aerialseg.checkpoint import load_checkpoint, save_checkpoint
from aerialseg.export import export_onnx
from aerialseg.model import ARCHITECTURES, OnnxUnsupportedError, build_model, check_input_size, model_args
from aerialseg.model_card import ModelCard

BANDS = ("ir", "r", "g", "dsm")
CLASSES = 6
ENCODERS = {"dpt": "tu-vit_tiny_patch16_224"}
"""The encoder of each architecture that does not take the default ResNet18."""
SLOW_EXPORT = {"unetplusplus", "manet", "pan", "segformer", "dpt"}
"""Architectures whose ONNX export and check took over 10 s on 2 cores (AMD EPYC, under load)."""


def _side(arch: str) -> int:
    """64 px, or the architecture's smallest input if larger."""
    return max(64, ARCHITECTURES[arch].min_input)


def _card(arch: str) -> ModelCard:
    args = model_args(arch, ENCODERS.get(arch, "resnet18"), len(BANDS), CLASSES)
    return ModelCard.for_training(args, bands=BANDS, mean=[0.0] * 4, std=[1.0] * 4, window=_side(arch))


@pytest.fixture(scope="class", params=list(ARCHITECTURES))
def arch(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="class")
def model(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(dict(_card(arch).model_args))


class TestModelContract:
    def test_one_output_channel_per_class_at_the_input_size(self, arch: str, model: torch.nn.Module) -> None:
        side = _side(arch)
        step = ARCHITECTURES[arch].input_multiple
        with torch.no_grad():
            out = model.eval()(torch.randn(2, len(BANDS), side, side + 2 * step))
        assert out.shape == (2, CLASSES, side, side + 2 * step)

    def test_backward_reaches_the_encoder(self, arch: str, model: torch.nn.Module) -> None:
        side = _side(arch)
        model.train().zero_grad()
        logits = model(torch.randn(2, len(BANDS), side, side))
        torch.nn.functional.cross_entropy(logits, torch.randint(0, CLASSES, (2, side, side))).backward()
        encoder = model.encoder
        assert isinstance(encoder, torch.nn.Module)
        # The encoder's first convolution (a ResNet's conv1, a ViT's patch embedding): the far end.
        first = next(m for m in encoder.modules() if isinstance(m, torch.nn.Conv2d))
        assert first.weight.grad is not None and float(first.weight.grad.abs().sum()) > 0

    def test_a_size_off_the_registry_rule_is_a_clear_error(self, arch: str, model: torch.nn.Module) -> None:
        entry = ARCHITECTURES[arch]
        side, step = _side(arch), entry.input_multiple
        with pytest.raises(
            ValueError, match=rf"{side} x {side + step // 2} is not a multiple of {step}.*{arch}"
        ):
            check_input_size(side, side + step // 2, arch)
        if entry.min_input:
            with pytest.raises(ValueError, match=rf"smaller than {entry.min_input} px"):
                check_input_size(entry.min_input - step, entry.min_input, arch)
        # And the rule is the network's: one step more than the smallest side runs.
        check_input_size(side + step, side, arch)
        with torch.no_grad():
            assert model.eval()(torch.randn(1, len(BANDS), side + step, side)).shape[-2:] == (
                side + step,
                side,
            )

    def test_checkpoint_round_trip_gives_identical_outputs(
        self, arch: str, model: torch.nn.Module, tmp_path: Path
    ) -> None:
        path = tmp_path / "model.ckpt"
        save_checkpoint(path, model, _card(arch))
        rebuilt, card = load_checkpoint(path)
        x = torch.randn(1, len(BANDS), _side(arch), _side(arch))
        with torch.no_grad():
            torch.testing.assert_close(rebuilt(x), model.eval()(x), rtol=0, atol=0)
        assert card.model_args == _card(arch).model_args


@pytest.mark.parametrize(
    "arch", [pytest.param(a, marks=pytest.mark.slow) if a in SLOW_EXPORT else a for a in ARCHITECTURES]
)
def test_onnx_export_or_the_reason_it_has_none(arch: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    card = _card(arch)
    net = build_model(dict(card.model_args))
    out = tmp_path / "model.onnx"
    reason = ARCHITECTURES[arch].onnx
    if reason is not None:
        with pytest.raises(OnnxUnsupportedError) as info:
            export_onnx(net, card, out)
        assert str(info.value) == f"architecture {arch} cannot be exported to ONNX: {reason}"
        assert not out.exists() and list(tmp_path.iterdir()) == []
        return
    result = export_onnx(net, card, out)
    assert result.parity.ok and out.is_file()
    assert result.parity.shape == (2, len(BANDS), _side(arch) + 32, _side(arch) + 64)


def test_every_smp_architecture_is_registered() -> None:
    import segmentation_models_pytorch as smp

    assert set(smp.MODEL_ARCHITECTURES_MAPPING) | {"fcn_skip"} == set(ARCHITECTURES)
