"""The self-describing checkpoint: evaluation and prediction rebuild the model from it alone."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from aerialseg.classes import IGNORE_INDEX, legend
from aerialseg.files import atomic_path
from aerialseg.model import build_model
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


def load_checkpoint(path: Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model from a checkpoint alone; returns it in eval mode, with the metadata."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no checkpoint; run the `train` stage first")
    # weights_only: a checkpoint is data, never code to execute.
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not an aerialseg checkpoint (expected format {CHECKPOINT_FORMAT!r})")
    model = build_model(payload["model_args"])
    model.load_state_dict(payload["state_dict"])
    model.to(device).eval()
    return model, {k: v for k, v in payload.items() if k != "state_dict"}
