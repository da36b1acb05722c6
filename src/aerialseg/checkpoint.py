"""The self-describing checkpoint: evaluation and prediction rebuild the model from it alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from aerialseg.files import atomic_path
from aerialseg.model import TorchFileError, build_model, load_torch_file
from aerialseg.model_card import CARD_FORMAT, ModelCard, ModelCardError

CHECKPOINT_FORMAT = CARD_FORMAT


def save_checkpoint(path: Path, model: nn.Module, card: ModelCard) -> None:
    """The weights plus the model card (band order, normalisation, legend, window, model arguments,
    the training's params and metrics), written atomically."""
    payload = {
        **card.to_dict(),
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


EXPECTED_CHECKPOINT = (
    f"expected an aerialseg checkpoint (format {CHECKPOINT_FORMAT!r}, "
    "a model.ckpt written by the `train` stage)"
)


class CheckpointError(ValueError):
    """A file is not an aerialseg checkpoint, or one that cannot be read."""


def load_checkpoint(path: Path, device: str | torch.device = "cpu") -> tuple[nn.Module, ModelCard]:
    """Rebuild the model from a checkpoint alone; returns it in eval mode, with its model card.

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
    if not isinstance(payload.get("state_dict"), dict):
        raise CheckpointError(
            f"{path}: an aerialseg checkpoint without ['state_dict']; {EXPECTED_CHECKPOINT}"
        )
    try:
        card = ModelCard.from_dict(payload, str(path))
    except ModelCardError as err:
        raise CheckpointError(f"{err}; {EXPECTED_CHECKPOINT}") from None
    try:
        model = build_model(dict(card.model_args))
        model.load_state_dict(payload["state_dict"])
    except (RuntimeError, KeyError, TypeError, ValueError) as err:
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"{path}: its weights do not fit the network it describes ({payload['model_args']}): {detail}"
        ) from err
    model.to(device).eval()
    return model, card


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
