"""Segmentation losses and class weights: what `train.loss` and `train.class_weights` select.

LOSSES maps a name to its entry; torch and smp are imported only where a loss is built, so the
configuration reads the registry's keys without them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from aerialseg.classes import IGNORE_INDEX, NUM_CLASSES
from aerialseg.registry import Registry

if TYPE_CHECKING:
    import torch
    from torch import nn


def sum_loss(*losses: nn.Module) -> nn.Module:
    """The sum of several losses on the same logits and targets (e.g. CE + Dice)."""
    return _sum_loss_type()(*losses)


@functools.cache
def _sum_loss_type() -> type[nn.Module]:
    import torch
    from torch import nn

    class SumLoss(nn.Module):
        def __init__(self, *losses: nn.Module) -> None:
            super().__init__()
            self.losses = nn.ModuleList(losses)

        def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return torch.stack([loss(logits, target) for loss in self.losses]).sum()

    return SumLoss


def _ce(weight: torch.Tensor | None) -> nn.Module:
    from torch import nn

    # nn.CrossEntropyLoss keeps `weight` as a buffer, so it follows the module to the GPU.
    return nn.CrossEntropyLoss(weight=weight, ignore_index=IGNORE_INDEX)


def _dice(weight: torch.Tensor | None) -> nn.Module:
    from segmentation_models_pytorch.losses import DiceLoss

    loss: nn.Module = DiceLoss(mode="multiclass", ignore_index=IGNORE_INDEX)
    return loss


def _focal(weight: torch.Tensor | None) -> nn.Module:
    from segmentation_models_pytorch.losses import FocalLoss

    loss: nn.Module = FocalLoss(mode="multiclass", ignore_index=IGNORE_INDEX)
    return loss


def _ce_dice(weight: torch.Tensor | None) -> nn.Module:
    return sum_loss(_ce(weight), _dice(None))


@dataclass(frozen=True)
class Loss:
    """One entry of LOSSES: the builder, given the class weights (a tensor) or None."""

    build: Callable[[torch.Tensor | None], nn.Module]
    class_weighted: bool
    """Whether `train.class_weights` apply (they weight the cross-entropy part)."""


LOSSES: Registry[Loss] = Registry(
    "a loss",
    {
        "ce": Loss(_ce, class_weighted=True),
        "dice": Loss(_dice, class_weighted=False),
        "focal": Loss(_focal, class_weighted=False),
        "ce+dice": Loss(_ce_dice, class_weighted=True),
    },
)
"""train.loss -> its entry: cross-entropy, smp's Dice or focal loss (multiclass), or CE + Dice; all
ignore the eroded boundary (IGNORE_INDEX)."""


def class_weights_problem(name: str, class_weights: object) -> str | None:
    """Why `class_weights` (anything but None or "none") cannot go with loss `name`; None if they can."""
    if class_weights is None or class_weights == "none" or LOSSES.choose(name).class_weighted:
        return None
    weighted = " or ".join(k for k, v in LOSSES.items() if v.class_weighted)
    return (
        f"train.class_weights weight the cross-entropy part of the loss; loss {name!r} has none "
        f"(use {weighted}, or class_weights none)"
    )


def build_loss(name: str, class_weights: Sequence[float] | None = None) -> nn.Module:
    """The loss `name`; `class_weights` weight the cross-entropy part (Dice and focal have none)."""
    import torch

    entry = LOSSES.choose(name)
    problem = class_weights_problem(name, class_weights)
    if problem:
        raise ValueError(problem)
    weight = None if class_weights is None else torch.tensor(list(class_weights), dtype=torch.float32)
    return entry.build(weight)


def class_counts(masks: Iterable[np.ndarray], num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Pixels per class over `masks`; the ignore label (and anything >= num_classes) is not counted."""
    counts = np.zeros(num_classes, dtype=np.int64)
    for mask in masks:
        values = np.asarray(mask).ravel()
        counts += np.bincount(values[values < num_classes], minlength=num_classes)[:num_classes]
    return counts


def inverse_frequency_weights(counts: np.ndarray) -> list[float]:
    """Weights proportional to 1 / class frequency, with mean 1 over the classes that occur.

    A class with no pixels never appears in a target, so its weight cannot matter: it gets 0
    rather than an infinite weight that would poison the normalisation.
    """
    counts = np.asarray(counts, dtype=np.float64)
    present = counts > 0
    if not present.any():
        raise ValueError("class weights: the masks contain no labelled pixel")
    weights = np.zeros_like(counts)
    weights[present] = counts[present].sum() / counts[present]
    weights[present] /= weights[present].mean()
    return [float(w) for w in weights]


def patch_file_class_weights(path: Path, chunk: int = 64) -> list[float]:
    """Inverse-frequency weights from the masks of an HDF5 patch file, read `chunk` patches at a time."""
    from aerialseg.patches import h5_dataset, open_h5

    with open_h5(path) as f:
        masks = h5_dataset(f, "mask")
        chunks = (masks[i : i + chunk] for i in range(0, len(masks), chunk))
        return inverse_frequency_weights(class_counts(chunks))
