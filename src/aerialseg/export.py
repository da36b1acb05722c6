"""`aerialseg export`: the network as an ONNX model, checked against PyTorch with onnxruntime.

The ONNX graph takes `image`, a float32 (batch, bands, height, width) tensor already normalised
((value - band_mean) / band_std, bands in the metadata's order), with batch, height and width
dynamic (height and width multiples of 32), and returns `logits`, (batch, classes, height,
width); the class is the argmax over axis 1. Everything needed to feed it is in the model's
`metadata_props`: `aerialseg` (the whole model card as JSON, as in a checkpoint) and, one key
each, `bands`, `units`, `band_mean`, `band_std`, `patch_size`, `classes` (JSON values).

The file is written under a temporary name and renamed only once onnxruntime, on an input of a
size other than the patch size, gives the same classes as PyTorch.
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from aerialseg.files import atomic_path
from aerialseg.model import check_input_size, check_onnx_export
from aerialseg.model_card import ModelCard
from aerialseg.model_source import in_eval_mode

Exporter = Literal["dynamo", "torchscript"]
EXPORTER_CHOICES: tuple[str, ...] = ("dynamo", "torchscript")
INPUT_NAME, OUTPUT_NAME = "image", "logits"
DYNAMIC_AXES = {0: "batch", 2: "height", 3: "width"}
LOGIT_RTOL = 1e-3
"""Largest |onnxruntime - PyTorch| logit difference accepted, relative to the largest |logit| (>= 1)."""
METADATA_KEYS = ("bands", "units", "band_mean", "band_std", "patch_size", "classes")
"""The model card's keys also embedded one by one, for tools that read a single property."""


class ExportError(RuntimeError):
    """The export failed, or onnxruntime disagrees with PyTorch."""


@dataclass(frozen=True)
class Parity:
    """onnxruntime against PyTorch on one random input."""

    shape: tuple[int, ...]
    pixels: int
    disagreeing_pixels: int
    """Pixels whose argmax class differs."""
    tied_disagreements: int
    """Of those, pixels where PyTorch's two best logits are closer than the logits' own difference
    between the two runtimes: a tie that float rounding may break either way."""
    max_abs_logit_diff: float
    max_abs_logit: float

    @property
    def ok(self) -> bool:
        close = self.max_abs_logit_diff <= LOGIT_RTOL * max(1.0, self.max_abs_logit)
        return close and self.disagreeing_pixels == self.tied_disagreements

    def describe(self) -> str:
        return (
            f"input {self.shape}: {self.pixels - self.disagreeing_pixels}/{self.pixels} pixels "
            f"get the same class ({self.disagreeing_pixels} differ, {self.tied_disagreements} of them "
            f"ties within float tolerance); max |logit difference| {self.max_abs_logit_diff:.3g} "
            f"(logits up to {self.max_abs_logit:.3g})"
        )


@dataclass(frozen=True)
class ExportResult:
    path: Path
    exporter: str
    parity: Parity


def export_onnx(
    model: nn.Module,
    card: ModelCard,
    output: Path,
    *,
    exporter: Exporter = "dynamo",
    check_size: tuple[int, int] | None = None,
    opset: int | None = None,
    seed: int = 0,
) -> ExportResult:
    """Export `model` to `output` (ONNX, dynamic batch and spatial size, metadata embedded) and
    check it with onnxruntime; raises ExportError, leaving no file, when the check fails."""
    if exporter not in EXPORTER_CHOICES:
        raise ValueError(f"exporter must be one of {EXPORTER_CHOICES}, got {exporter!r}")
    arch = card.model_args.get("arch")  # None: a network model.build_model did not build
    if arch is not None:
        check_onnx_export(arch)  # OnnxUnsupportedError with the reason, before any work
    size, bands = card.window, len(card.bands)
    if check_size is None:
        check_size = (size + 32, size + 64)  # not the export size, and not square
    check_input_size(*check_size, arch)
    model = in_eval_mode(model.float().to(memory_format=torch.contiguous_format).cpu())
    if exporter == "torchscript" and isinstance(model, torch.fx.GraphModule):
        # The TorchScript exporter switches the module to training mode, which a graph refuses.
        raise ExportError(
            "the model is a torch.export graph (an MLflow model logged pickle-free, pt2): "
            "export it with --exporter dynamo, or export its checkpoint (models/model.ckpt)"
        )
    # Batch 2: torch.export specialises a dimension of size 1, which a ViT's reshapes (dpt) then keep.
    example = torch.zeros(2, bands, size, size)
    with atomic_path(output) as tmp:
        _export(model, example, tmp, exporter, opset)
        _add_metadata(tmp, card.to_dict(training=False))
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((2, bands, *check_size)).astype(np.float32)
        parity = check_parity(model, tmp, x)
        if not parity.ok:
            raise ExportError(f"{output}: onnxruntime does not reproduce PyTorch: {parity.describe()}")
    return ExportResult(Path(output), exporter, parity)


def _export(
    model: nn.Module, example: torch.Tensor, path: Path, exporter: Exporter, opset: int | None
) -> None:
    # The exporters report their steps on stdout and warn about things that do not concern us
    # (the TorchScript one about its own deprecation); keep both unless the export fails.
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if exporter == "dynamo":
                from torch.export import Dim

                torch.onnx.export(
                    model,
                    (example,),
                    str(path),
                    dynamo=True,
                    input_names=[INPUT_NAME],
                    output_names=[OUTPUT_NAME],
                    dynamic_shapes=({axis: Dim.AUTO for axis in DYNAMIC_AXES},),
                    opset_version=opset,
                    external_data=False,  # one file: a renamed file must not lose its weights
                    verbose=False,
                )
            else:
                torch.onnx.export(
                    model,
                    (example,),
                    str(path),
                    dynamo=False,
                    input_names=[INPUT_NAME],
                    output_names=[OUTPUT_NAME],
                    dynamic_axes={INPUT_NAME: DYNAMIC_AXES, OUTPUT_NAME: DYNAMIC_AXES},
                    opset_version=opset or 17,
                )
    except Exception as err:
        raise ExportError(
            f"the {exporter} ONNX exporter failed: {err}\n{log.getvalue()[-2000:]}"
            + ("\n(try --exporter torchscript)" if exporter == "dynamo" else "")
        ) from err


def _add_metadata(path: Path, meta: dict[str, Any]) -> None:
    """Embed the metadata and name the dynamic axes batch, height, width on input and output."""
    import onnx

    proto = onnx.load(str(path))
    props = {"aerialseg": json.dumps(meta), **{k: json.dumps(meta[k]) for k in METADATA_KEYS}}
    props["input"] = (
        f"{INPUT_NAME}: float32 (batch, bands, height, width), height and width multiples of 32, "
        "normalised as (value - band_mean) / band_std"
    )
    props["output"] = f"{OUTPUT_NAME}: float32 (batch, classes, height, width); class = argmax over axis 1"
    del proto.metadata_props[:]
    for key, value in props.items():
        proto.metadata_props.add(key=key, value=value)
    for value_info in (*proto.graph.input, *proto.graph.output):
        dims = value_info.type.tensor_type.shape.dim
        for axis, name in DYNAMIC_AXES.items():
            if axis < len(dims):
                dims[axis].dim_param = name
    onnx.save(proto, str(path))


def read_model_card(path: Path) -> ModelCard:
    """The model card embedded in an exported model; ModelCardError naming `path` without one."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    props = {p.key: p.value for p in proto.metadata_props}
    return ModelCard.from_dict(json.loads(props["aerialseg"]) if "aerialseg" in props else None, str(path))


@torch.no_grad()
def check_parity(model: nn.Module, path: Path, x: np.ndarray) -> Parity:
    """Run `x` through PyTorch and through onnxruntime (CPU) and compare logits and classes."""
    import onnxruntime as ort  # type: ignore[import-untyped]

    expected = model(torch.from_numpy(x)).float().numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = np.asarray(session.run([OUTPUT_NAME], {INPUT_NAME: x})[0])
    if got.shape != expected.shape:
        raise ExportError(f"{path}: onnxruntime output shape {got.shape}, PyTorch's {expected.shape}")
    diff = float(np.abs(got - expected).max())
    classes_pt, classes_ort = expected.argmax(axis=1), got.argmax(axis=1)
    differ = classes_pt != classes_ort
    # Where the classes differ, how far apart PyTorch put the two classes in question.
    pt_best = np.take_along_axis(expected, classes_pt[:, None], axis=1)[:, 0]
    pt_other = np.take_along_axis(expected, classes_ort[:, None], axis=1)[:, 0]
    ties = differ & (pt_best - pt_other <= 2 * diff)
    return Parity(
        shape=tuple(x.shape),
        pixels=int(differ.size),
        disagreeing_pixels=int(differ.sum()),
        tied_disagreements=int(ties.sum()),
        max_abs_logit_diff=diff,
        max_abs_logit=float(np.abs(expected).max()),
    )
