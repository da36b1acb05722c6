"""The one factory that builds the segmentation network, its registry of architectures, and its
encoder weights.

`ARCHITECTURES` names every network `model.arch` can choose (segmentation_models_pytorch 0.6's
twelve plus the lecture's `fcn_skip`), each with the input sizes it takes, the encoders that fit
it and whether it exports to ONNX; `build_model(model_args(...))` builds any of them. torch and
smp are imported where a network is built or a file read: the configuration reads the keys alone.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aerialseg.registry import Registry, not_one_of

if TYPE_CHECKING:
    import torch
    from torch import nn

OUTPUT_STRIDE = 32
"""The project's input rule: window and patch sides are multiples of 32 (config's patches.size_px),
which every architecture below takes; an architecture may take more (its `input_multiple`)."""
WEIGHTS_FILE = "model.safetensors"
"""The file smp downloads for an encoder's pretrained weights (next to a small config.json)."""
HUB_CHECK_TIMEOUT = 5.0
"""Seconds the weights check waits for the Hugging Face endpoint before saying it cannot be reached."""


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights were asked for but cannot be had."""


class WeightsFileError(WeightsUnavailableError, ValueError):
    """train.pretrained names a file that is not usable encoder weights: bad input, so a ValueError too
    (a stage reports it as one line without the exception's name)."""


def model_args(arch: str, encoder: str, in_channels: int, num_classes: int) -> dict[str, Any]:
    """The arguments that rebuild the network; stored in every checkpoint."""
    return {"arch": arch, "encoder_name": encoder, "in_channels": in_channels, "classes": num_classes}


def build_model(args: dict[str, Any], weights: str = "none") -> nn.Module:
    """Build the network from `model_args(...)`; `weights` is none, imagenet or a local file.
    An unknown architecture or encoder, or one that does not fit the other, is a ValueError."""
    problem = encoder_problem(args["arch"], args["encoder_name"])  # before any download
    if problem:
        raise ValueError(f"model.encoder: {problem}")
    if weights == "none":
        return _create(args, encoder_weights=None)
    if weights == "imagenet":
        ensure_imagenet_reachable(args["encoder_name"])
        return _create(args, encoder_weights="imagenet")
    return _build_from_local_weights(args, Path(weights))


def _create(args: dict[str, Any], encoder_weights: str | None) -> nn.Module:
    """The one factory: the registry's entry for `args["arch"]` builds the network."""
    entry = ARCHITECTURES.choose(args["arch"])
    return entry.build(args["encoder_name"], args["in_channels"], args["classes"], encoder_weights)


def check_input_size(height: int, width: int, arch: str | None = None) -> None:
    """ValueError unless a height x width input (px) suits `arch` (its ARCHITECTURES entry:
    `input_multiple`, `min_input`), or, without `arch`, the project's multiple of OUTPUT_STRIDE."""
    multiple, smallest, why = OUTPUT_STRIDE, 0, f"the encoder downsamples {OUTPUT_STRIDE}x"
    if arch is not None:
        entry = ARCHITECTURES.choose(arch)
        multiple, smallest, why = entry.input_multiple, entry.min_input, f"{arch}: {entry.input_rule}"
    if height % multiple or width % multiple:
        raise ValueError(
            f"input size {height} x {width} is not a multiple of {multiple} on both sides; {why}"
        )
    if min(height, width) < smallest:
        raise ValueError(f"input size {height} x {width} is smaller than {smallest} px on a side; {why}")


# ---------------------------------------------------------------- the registry


@dataclass(frozen=True)
class Architecture:
    """One entry of ARCHITECTURES: how to build the network and what it takes.

    Input rules and ONNX support as measured with smp 0.6 on a ResNet18 encoder (a timm ViT for
    dpt), 4 bands, 6 classes, sides of 16-160 px in steps of 8; tests/test_model_contract.py keeps
    them true.
    """

    build: Callable[[str, int, int, str | None], nn.Module]
    """(encoder_name, in_channels, classes, encoder_weights) -> the network."""
    input_multiple: int = OUTPUT_STRIDE
    """Input height and width must be multiples of this, px (the stride of the deepest feature
    the decoder merges with finer ones)."""
    min_input: int = 0
    """Smallest input side, px (0: any multiple)."""
    input_rule: str = f"the encoder downsamples {OUTPUT_STRIDE}x"
    """Why, in words, for the error message."""
    encoders: str = "any smp encoder (or a timm model as tu-<name>)"
    """Which encoders fit, in words."""
    fits: Callable[[str], bool] = field(default=lambda encoder: True)
    """Whether an encoder name (one smp or timm knows) fits."""
    onnx: str | None = None
    """None: exports to ONNX with a dynamic height and width; otherwise why it cannot."""


def _smp(arch: str, **fixed: Any) -> Callable[[str, int, int, str | None], nn.Module]:
    """smp.create_model(arch, ...) with the entry's fixed keyword arguments."""

    def build(encoder: str, in_channels: int, classes: int, weights: str | None) -> nn.Module:
        import segmentation_models_pytorch as smp

        return smp.create_model(
            arch,
            encoder_name=encoder,
            encoder_weights=weights,
            in_channels=in_channels,
            classes=classes,
            **fixed,
        )

    return build


def _fcn_skip(encoder: str, in_channels: int, classes: int, weights: str | None) -> nn.Module:
    from aerialseg.fcn_skip import FCNSkip

    return FCNSkip(encoder, in_channels, classes, weights)


PYRAMID_POOLING = (
    "its pyramid pooling (adaptive average pooling to fixed bins) has no ONNX form for a dynamic "
    "height and width (the dynamo exporter bakes the export size in, the TorchScript one refuses it)"
)
VIT16 = re.compile(r"tu-(vit|deit|deit3)_\w*patch16\w*(\.\w+)?")
"""timm ViTs with 16 px patches: the DPT encoders whose token grid suits the project's 32 px rule."""

ARCHITECTURES: Registry[Architecture] = Registry(
    "an architecture",
    {
        "unet": Architecture(_smp("unet")),
        "unetplusplus": Architecture(_smp("unetplusplus")),
        "manet": Architecture(_smp("manet")),
        "linknet": Architecture(_smp("linknet")),
        "fpn": Architecture(_smp("fpn")),
        "pspnet": Architecture(
            _smp("pspnet"),
            input_multiple=8,
            input_rule="its encoder stops at stride 8 (encoder_depth 3)",
            onnx=PYRAMID_POOLING,
        ),
        "deeplabv3": Architecture(
            _smp("deeplabv3"), input_multiple=8, input_rule="its dilated encoder has output stride 8"
        ),
        "deeplabv3plus": Architecture(
            _smp("deeplabv3plus"), input_multiple=16, input_rule="its dilated encoder has output stride 16"
        ),
        "pan": Architecture(
            _smp("pan"),
            input_multiple=16,
            min_input=128,
            input_rule="its encoder has output stride 16 and its feature pyramid attention pools that "
            "8x further",
        ),
        "upernet": Architecture(_smp("upernet"), onnx=PYRAMID_POOLING),
        "segformer": Architecture(_smp("segformer")),
        "dpt": Architecture(
            # dynamic_img_size: a timm ViT otherwise takes only its pretraining size (224 px).
            _smp("dpt", dynamic_img_size=True),
            input_rule="its ViT's grid of 16 px tokens is halved once in the decoder",
            encoders="a timm ViT with 16 px patches, e.g. tu-vit_tiny_patch16_224, tu-deit_small_patch16_224",
            fits=lambda encoder: VIT16.fullmatch(encoder) is not None,
        ),
        "fcn_skip": Architecture(_fcn_skip),
    },
)
"""model.arch -> its entry; ARCHITECTURES.choose(name) lists the options for any other name."""


def encoder_problem(arch: str, encoder: str) -> str | None:
    """Why `encoder` cannot serve `arch`, None when it can: not an smp encoder (nor `tu-` and a timm
    model; the message lists close names), or not one that the architecture's entry fits."""
    import segmentation_models_pytorch as smp

    if encoder.startswith("tu-"):
        import timm

        if not timm.is_model(encoder.removeprefix("tu-")):
            names = (f"tu-{name}" for name in timm.list_models())
            return not_one_of(encoder, "a timm model", names, close_only=True)
    elif encoder not in smp.encoders.encoders:
        message = not_one_of(encoder, "an smp encoder", smp.encoders.encoders, close_only=True)
        return f"{message} (smp.encoders.get_encoder_names() lists them; a timm model as tu-<name>)"
    entry = ARCHITECTURES.choose(arch)
    if not entry.fits(encoder):
        return f"{encoder!r} does not fit {arch}, which needs {entry.encoders}"
    return None


class OnnxUnsupportedError(ValueError):
    """The architecture has no ONNX form (its ARCHITECTURES entry says why)."""


def check_onnx_export(arch: str) -> None:
    """OnnxUnsupportedError with the reason when `arch` cannot be exported to ONNX."""
    reason = ARCHITECTURES.choose(arch).onnx
    if reason is not None:
        raise OnnxUnsupportedError(f"architecture {arch} cannot be exported to ONNX: {reason}")


def _build_from_local_weights(args: dict[str, Any], path: Path) -> nn.Module:
    """Load encoder weights from a file: an encoder state dict or a whole smp model's.

    The file holds 3-channel (RGB) filters like ImageNet weights; smp's `set_in_channels`
    then adapts the first convolution to the project's band count the same way it does
    for ImageNet weights.
    """
    from torch import nn

    if not path.is_file():
        raise WeightsFileError(
            f"train.pretrained: {path} is not a file; expected `none`, `imagenet` or the path of "
            "a local encoder weights file (a torch state dict)"
        )
    try:
        state = load_torch_file(path)
    except TorchFileError as err:
        raise WeightsFileError(
            f"train.pretrained: {path} is not a PyTorch weights file ({err.looks_like}); expected a state "
            "dict saved with torch.save (see `aerialseg prefetch-weights`), `none` or `imagenet`"
        ) from err
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsFileError(
            f"train.pretrained: {path} holds a {type(state).__name__}, not a state dict; expected a state "
            "dict saved with torch.save (see `aerialseg prefetch-weights`)"
        )
    # Accept encoder-only files and whole-model files (keys prefixed `encoder.`).
    prefixed = {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}
    encoder_state = prefixed or state
    file_in_channels = _first_conv_in_channels(encoder_state, path)
    model = _create({**args, "in_channels": file_in_channels}, encoder_weights=None)
    encoder = model.encoder
    assert isinstance(encoder, nn.Module)  # every smp model and FCNSkip have one
    # nn.Module's own loader: smp's encoder override drops the result that names missing keys.
    try:
        result = nn.Module.load_state_dict(encoder, encoder_state, strict=False)
    except RuntimeError as err:
        raise WeightsFileError(
            f"{path}: does not fit encoder {args['encoder_name']!r}: {str(err).splitlines()[1:3]}"
        ) from err
    # The classifier head of an ImageNet checkpoint is expected extra; anything else means the
    # file was made for another encoder.
    unexpected = [k for k in result.unexpected_keys if not k.startswith("fc.")]
    if result.missing_keys or unexpected:
        raise WeightsFileError(
            f"{path}: does not fit encoder {args['encoder_name']!r}: {len(result.missing_keys)} tensors "
            f"missing (e.g. {result.missing_keys[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    if file_in_channels != args["in_channels"]:
        encoder.set_in_channels(args["in_channels"], pretrained=True)  # type: ignore[operator]
    return model


class TorchFileError(ValueError):
    """A file torch.load cannot read as tensors; `looks_like` says what the file seems to be."""

    def __init__(self, path: Path, looks_like: str) -> None:
        super().__init__(f"{path}: not a PyTorch file ({looks_like})")
        self.looks_like = looks_like


def load_torch_file(path: Path) -> Any:
    """torch.load(path) of tensors and plain containers only (weights_only: a weights file is data,
    never code to run). Any failure raises TorchFileError saying what the file looks like instead."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, KeyError, ValueError) as err:
        # torch's own message for a refused pickle advises turning the check off: never pass it on.
        raise TorchFileError(path, torch_file_looks_like(path, err)) from err


def torch_file_looks_like(path: Path, err: BaseException | None = None) -> str:
    """What a file that torch.load refused seems to be, from its first bytes, in a few words."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(512)
    except OSError as read_err:
        return f"cannot be read: {read_err.strerror or read_err}"
    if size == 0:
        return "an empty file"
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith((b"<!doctype html", b"<html", b"<head", b"<?xml")) or b"<html" in text:
        return "an HTML page, e.g. a login or error page saved instead of the file"
    if head.startswith(b"PK\x03\x04"):
        if not zipfile.is_zipfile(path):
            return f"a truncated zip archive ({size} bytes): an interrupted download or copy?"
        if isinstance(err, pickle.UnpicklingError):
            return "a torch file holding objects other than tensors, e.g. a whole pickled model"
        return "a zip archive that torch cannot read as its own"
    if head[:1] == b"\x80" and head[1:2] in b"\x02\x03\x04\x05":
        if isinstance(err, pickle.UnpicklingError) and "GLOBAL" in str(err):
            return "a pickle holding objects other than tensors, e.g. a whole pickled model"
        return f"a pickle that cannot be read ({size} bytes; truncated?)"
    if len(head) >= 10 and head[8:10] == b'{"':
        return "a safetensors file"
    if all(32 <= b < 127 or b in b"\t\r\n" for b in head):
        return f"a text file starting {head[:40].decode('ascii', 'replace').splitlines()[0]!r}"
    return f"random bytes: neither a zip archive nor a pickle ({size} bytes)"


def _first_conv_in_channels(state: dict[str, torch.Tensor], path: Path) -> int:
    import torch

    for value in state.values():
        if isinstance(value, torch.Tensor) and value.ndim == 4:
            return int(value.shape[1])
    raise WeightsFileError(
        f"train.pretrained: {path} has no convolution filters (keys {', '.join(list(state)[:5]) or 'none'}); "
        "expected the state dict of an encoder, or of a whole smp model (keys `encoder.*`)"
    )


def ensure_imagenet_reachable(encoder: str) -> None:
    """Fail at once, not after a long network timeout, when ImageNet weights cannot be fetched.

    Everything goes through huggingface_hub, the library smp (and timm) download with, so the check
    sees what the download will: the cache (HF_HOME / HF_HUB_CACHE), the endpoint (HF_ENDPOINT, for
    mirrors), proxies (HTTPS_PROXY, ...) and offline mode (HF_HUB_OFFLINE). Online, it asks the endpoint
    for the weights file's metadata: one HEAD request, no retries, HUB_CHECK_TIMEOUT seconds at most
    (after huggingface_hub's own first call to an endpoint, its user-agent registry: 3 s at most).
    """
    import segmentation_models_pytorch as smp
    from huggingface_hub import constants, get_hf_file_metadata, get_session, hf_hub_url

    settings = smp.encoders.encoders.get(encoder, {}).get("pretrained_settings", {}).get("imagenet")
    if settings is not None and _in_hub_cache(settings["repo_id"], settings["revision"]):
        return
    # The hub reads HF_HUB_OFFLINE once, at import; a variable set later still counts here.
    offline = constants.HF_HUB_OFFLINE or _env_true("HF_HUB_OFFLINE")
    if offline:
        reason = "HF_HUB_OFFLINE is set"
    else:
        try:
            if settings is not None:
                url = hf_hub_url(settings["repo_id"], WEIGHTS_FILE, revision=settings["revision"])
                get_hf_file_metadata(url, timeout=HUB_CHECK_TIMEOUT)
            else:  # not an smp-hosted encoder (e.g. timm's `tu-*`): any answer of the endpoint will do
                url = constants.ENDPOINT
                get_session().head(url, timeout=HUB_CHECK_TIMEOUT)
            return
        except Exception as err:  # any failure (network, proxy, timeout, HTTP status): cannot be had
            reason = f"{url}: {type(err).__name__}: {_first_line(err)}"
    raise WeightsUnavailableError(
        f"train.pretrained: imagenet weights for encoder {encoder!r} are not in the Hugging Face cache "
        f"({constants.HF_HUB_CACHE}) and cannot be downloaded from {constants.ENDPOINT} ({reason}). "
        f"On a machine that can reach it (a login node) run `aerialseg prefetch-weights {encoder}` with the "
        "same HF_HOME, which compute nodes can share (with HF_HUB_OFFLINE=1); or set train.pretrained to "
        "the path of a local encoder weights file (a torch state dict)."
    )


def _env_true(name: str) -> bool:
    """huggingface_hub's reading of a boolean variable."""
    return os.environ.get(name, "").upper() in {"1", "ON", "YES", "TRUE"}


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else "no message"


def _in_hub_cache(repo_id: str, revision: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, WEIGHTS_FILE, revision=revision)
    return isinstance(found, str)
