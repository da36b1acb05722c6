"""Segmentation losses and class weights: what `train.loss` and `train.class_weights` select."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from segmentation_models_pytorch.losses import DiceLoss, FocalLoss
from torch import nn

from aerialseg.classes import IGNORE_INDEX, NUM_CLASSES
from aerialseg.patches import h5_dataset, open_h5

LOSSES = ("ce", "dice", "focal", "ce+dice")


class SumLoss(nn.Module):
    """The sum of several losses on the same logits and targets (e.g. CE + Dice)."""

    def __init__(self, *losses: nn.Module) -> None:
        super().__init__()
        self.losses = nn.ModuleList(losses)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.stack([loss(logits, target) for loss in self.losses]).sum()


def build_loss(name: str, class_weights: Sequence[float] | None = None) -> nn.Module:
    """The loss `name`; `class_weights` weight the cross-entropy part (Dice and focal ignore them)."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose from {list(LOSSES)}")
    if class_weights is not None and name not in ("ce", "ce+dice"):
        raise ValueError(f"class weights apply to the cross-entropy part of the loss; {name!r} has none")
    weight = None if class_weights is None else torch.tensor(list(class_weights), dtype=torch.float32)
    # nn.CrossEntropyLoss keeps `weight` as a buffer, so it follows the module to the GPU.
    ce = nn.CrossEntropyLoss(weight=weight, ignore_index=IGNORE_INDEX)
    if name == "ce":
        return ce
    dice = DiceLoss(mode="multiclass", ignore_index=IGNORE_INDEX)
    if name == "dice":
        return dice
    if name == "focal":
        return FocalLoss(mode="multiclass", ignore_index=IGNORE_INDEX)
    return SumLoss(ce, dice)


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
    with open_h5(path) as f:
        masks = h5_dataset(f, "mask")
        chunks = (masks[i : i + chunk] for i in range(0, len(masks), chunk))
        return inverse_frequency_weights(class_counts(chunks))
