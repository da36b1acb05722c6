"""The self-describing checkpoint: evaluation and prediction rebuild the model from it alone."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from aerialseg.classes import IGNORE_INDEX, legend
from aerialseg.files import atomic_path
from aerialseg.model import TorchFileError, build_model, load_torch_file
from aerialseg.patches import BandStats

CHECKPOINT_FORMAT = "aerialseg-checkpoint/1"


def save_checkpoint(
    path: Path,
    model: nn.Module,
    args: Mapping[str, Any],
    *,
    bands: Sequence[str],
    stats: BandStats,
    patch_size: int,
    config: Mapping[str, Any],
    metrics: Mapping[str, float],
) -> None:
    """Weights plus everything needed to feed the model: band order, normalisation, legend."""
    payload = {
        **describe(args, bands=bands, stats=stats, patch_size=patch_size),
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
        "config": dict(config),
        "metrics": dict(metrics),
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def describe(
    args: Mapping[str, Any], *, bands: Sequence[str], stats: BandStats, patch_size: int
) -> dict[str, Any]:
    """What a model needs beside its weights to be used on new imagery (plain JSON data): the
    checkpoint's metadata and the MLflow model's `metadata`, so both sources load alike."""
    return {
        "format": CHECKPOINT_FORMAT,
        "model_args": dict(args),
        "bands": list(bands),
        "band_mean": [float(v) for v in stats.mean],
        "band_std": [float(v) for v in stats.std],
        "patch_size": int(patch_size),
        "classes": legend(),
        "ignore_index": IGNORE_INDEX,
    }


EXPECTED_CHECKPOINT = (
    f"expected an aerialseg checkpoint (format {CHECKPOINT_FORMAT!r}, "
    "a model.ckpt written by the `train` stage)"
)


class CheckpointError(ValueError):
    """A file is not an aerialseg checkpoint, or one that cannot be read."""


def load_checkpoint(path: Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model from a checkpoint alone; returns it in eval mode, with the metadata.

    Raises FileNotFoundError for a missing file and CheckpointError, naming the file, what it
    seems to be and what was expected, for anything else.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no checkpoint; run the `train` stage first")
    # weights_only: a checkpoint is data, never code to execute.
    try:
        payload = load_torch_file(path)
    except TorchFileError as err:
        raise CheckpointError(
            f"{path}: not a readable checkpoint ({err.looks_like}); {EXPECTED_CHECKPOINT}"
        ) from err
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: {_what_it_holds(payload)}; {EXPECTED_CHECKPOINT}")
    missing = [key for key in ("model_args", "state_dict") if not isinstance(payload.get(key), dict)]
    if missing:
        raise CheckpointError(f"{path}: an aerialseg checkpoint without {missing}; {EXPECTED_CHECKPOINT}")
    try:
        model = build_model(payload["model_args"])
        model.load_state_dict(payload["state_dict"])
    except (RuntimeError, KeyError, TypeError, ValueError) as err:
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"{path}: its weights do not fit the network it describes ({payload['model_args']}): {detail}"
        ) from err
    model.to(device).eval()
    return model, {k: v for k, v in payload.items() if k != "state_dict"}


def _what_it_holds(payload: Any) -> str:
    """A torch file that is not an aerialseg checkpoint, in a few words."""
    if not isinstance(payload, dict):
        return f"a torch file holding a {type(payload).__name__}, not an aerialseg checkpoint"
    if "pytorch-lightning_version" in payload:
        return (
            "a Lightning training checkpoint (models/checkpoints/), not the model the `train` stage "
            "publishes (models/model.ckpt)"
        )
    if payload and all(isinstance(v, torch.Tensor) for v in payload.values()):
        return (
            f"a plain state dict ({len(payload)} tensors) without aerialseg's metadata (bands, normalisation)"
        )
    keys = sorted(str(k) for k in payload)
    return f"a torch file with keys {keys[:8]}{' ...' if len(keys) > 8 else ''}, not an aerialseg checkpoint"
