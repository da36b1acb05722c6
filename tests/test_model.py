"""The factory's own cases: input-size and encoder errors, checkpoint contents, encoder weights, fcn_skip.

What every architecture keeps (shapes, gradients, its input rule, checkpoint round trip, ONNX) is
tests/test_model_contract.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import segmentation_models_pytorch as smp
import torch

from aerialseg.checkpoint import load_checkpoint, save_checkpoint
from aerialseg.model import WeightsUnavailableError, build_model, check_input_size, model_args
from aerialseg.model_card import ModelCard
from aerialseg.patches import BandStats

ARGS = model_args("fpn", "resnet18", in_channels=4, num_classes=6)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ARGS)


@pytest.mark.parametrize(("height", "width"), [(100, 64), (64, 48), (31, 31)])
def test_size_not_multiple_of_32_is_a_clear_error(height: int, width: int) -> None:
    with pytest.raises(ValueError, match=rf"{height} x {width} is not a multiple of 32"):
        check_input_size(height, width)


def test_unknown_encoder_is_a_clear_error() -> None:
    with pytest.raises(
        ValueError, match=r"^model.encoder: 'resnet5' is not an smp encoder; did you mean one of: resnet50"
    ):
        build_model(model_args("fpn", "resnet5", in_channels=4, num_classes=6))


def test_checkpoint_round_trip_rebuilds_the_same_model(model: torch.nn.Module, tmp_path: Path) -> None:
    stats = BandStats((0.1, 0.2, 0.3, 4.0), (1.0, 1.0, 1.0, 2.0))
    path = tmp_path / "model.ckpt"
    card = ModelCard.for_training(
        ARGS,
        bands=["ir", "r", "g", "dsm"],
        mean=stats.mean,
        std=stats.std,
        window=64,
        config={"model": {"encoder": "resnet18"}},
        metrics={"val_mean_f1": 0.5},
    )
    save_checkpoint(path, model, card)
    rebuilt, loaded = load_checkpoint(path)
    x = torch.randn(1, 4, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model.eval()(x))
    assert loaded == card  # every field, the training's config and metrics included
    assert loaded.bands == ("ir", "r", "g", "dsm") and loaded.units == ("reflectance",) * 3 + ("m",)
    assert loaded.band_mean == stats.mean and loaded.band_std == stats.std
    assert loaded.class_names[:2] == ["impervious_surfaces", "building"]
    assert loaded.model_args == ARGS and loaded.window == 64
    assert list(tmp_path.iterdir()) == [path]


def test_loading_something_else_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "other.ckpt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(ValueError, match="not an aerialseg checkpoint"):
        load_checkpoint(path)
    with pytest.raises(FileNotFoundError, match="run the `train` stage"):
        load_checkpoint(tmp_path / "missing.ckpt")


@pytest.mark.parametrize("whole_model", [False, True], ids=["encoder-file", "model-file"])
def test_encoder_starts_from_a_local_weights_file(tmp_path: Path, whole_model: bool) -> None:
    torch.manual_seed(123)
    source = smp.create_model("fpn", encoder_name="resnet18", encoder_weights=None, in_channels=3, classes=6)
    state = source.state_dict() if whole_model else source.encoder.state_dict()
    path = tmp_path / "weights.pth"
    torch.save(state, path)

    built = build_model(ARGS, weights=str(path))

    expected = source.encoder.state_dict()
    got = built.encoder.state_dict()
    torch.testing.assert_close(got["layer3.0.conv1.weight"], expected["layer3.0.conv1.weight"])
    torch.testing.assert_close(got["bn1.running_mean"], expected["bn1.running_mean"])
    # 3 RGB filters adapted to 4 bands the way smp adapts ImageNet weights: cycled, rescaled by 3/4.
    conv1 = got["conv1.weight"]
    assert conv1.shape[1] == 4
    torch.testing.assert_close(conv1[:, :3], expected["conv1.weight"] * 3 / 4)
    torch.testing.assert_close(conv1[:, 3], expected["conv1.weight"][:, 0] * 3 / 4)


def test_weights_file_for_another_encoder_is_refused(tmp_path: Path) -> None:
    other = smp.create_model("fpn", encoder_name="resnet34", encoder_weights=None, classes=6)
    path = tmp_path / "resnet34.pth"
    torch.save(other.encoder.state_dict(), path)
    # resnet34 has more blocks than resnet18: the file does not fit, and the error names it.
    with pytest.raises(WeightsUnavailableError, match=r"resnet34\.pth: does not fit encoder 'resnet18'"):
        build_model(ARGS, weights=str(path))


def test_missing_weights_file_names_the_options(tmp_path: Path) -> None:
    with pytest.raises(WeightsUnavailableError, match=r"none.*imagenet.*local"):
        build_model(ARGS, weights=str(tmp_path / "nope.pth"))


def test_imagenet_offline_without_cache_fails_at_once(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(WeightsUnavailableError) as info:
        build_model(ARGS, weights="imagenet")
    message = str(info.value)
    assert "local encoder weights file" in message and "HF_HUB_OFFLINE" in message
    # It names the exact command that fixes it.
    assert "`aerialseg prefetch-weights resnet18`" in message


def test_fcn_skip_sums_upsampled_scores_of_strides_8_16_32() -> None:
    torch.manual_seed(0)
    args = model_args("fcn_skip", "resnet18", in_channels=4, num_classes=6)
    net = build_model(args).eval()
    x = torch.randn(1, 4, 64, 96)
    with torch.no_grad():
        out = net(x)
        features = net.encoder(x)
        strides = [64 // features[i].shape[-2] for i in net.STAGES]
        expected = sum(
            torch.nn.functional.interpolate(head(features[i]), size=(64, 96), mode="bilinear")
            for head, i in zip(net.heads, net.STAGES, strict=True)
        )
    assert strides == [8, 16, 32]
    assert out.shape == (1, 6, 64, 96)
    torch.testing.assert_close(out, expected)
    # And it trains: gradients reach the first convolution.
    net.train()
    net(x).sum().backward()
    assert net.encoder.conv1.weight.grad is not None


def test_fcn_skip_checkpoint_round_trip_and_local_weights(tmp_path: Path) -> None:
    torch.manual_seed(1)
    source = smp.create_model("fpn", encoder_name="resnet18", encoder_weights=None, in_channels=3, classes=6)
    path = tmp_path / "encoder.pth"
    torch.save(source.encoder.state_dict(), path)
    args = model_args("fcn_skip", "resnet18", in_channels=3, num_classes=6)
    net = build_model(args, weights=str(path))
    torch.testing.assert_close(
        net.encoder.state_dict()["layer2.0.conv1.weight"],
        source.encoder.state_dict()["layer2.0.conv1.weight"],
    )
    card = ModelCard.for_training(args, bands=["ir", "r", "g"], mean=(0, 0, 0), std=(1, 1, 1), window=64)
    save_checkpoint(tmp_path / "m.ckpt", net, card)
    rebuilt, _ = load_checkpoint(tmp_path / "m.ckpt")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), net.eval()(x))
