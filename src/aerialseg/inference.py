"""Sliding-window prediction of whole tiles, overlapping windows blended by averaging probabilities."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from aerialseg.model import check_input_size
from aerialseg.progress import progress_bar
from aerialseg.windows import Window, window_grid


@torch.no_grad()
def predict_probabilities(
    model: nn.Module,
    image: np.ndarray,
    *,
    window: int,
    overlap: float,
    batch_size: int = 4,
    tta: bool = False,
    device: str | torch.device = "cpu",
    progress: str | None = None,
) -> np.ndarray:
    """(bands, H, W) normalised image -> (classes, H, W) float32 class probabilities.

    Every pixel's probabilities are the mean over all windows that cover it (plus flipped
    views with `tta`), so window borders, where the network sees least context, do not win
    over window centres the way last-write-wins stitching lets them. `progress` names a
    progress bar over the windows (aerialseg.progress); None shows none.
    """
    check_input_size(window, window)
    _, height, width = image.shape
    # A raster smaller than one window is padded by reflection and the padding cut off again.
    pad_h, pad_w = max(0, window - height), max(0, window - width)
    if pad_h or pad_w:
        image = np.pad(image, ((0, 0), (0, pad_h), (0, pad_w)), mode="reflect")
    grid = window_grid(image.shape[1], image.shape[2], window, overlap)
    total: np.ndarray | None = None
    counts = np.zeros(image.shape[1:], dtype=np.float32)
    with progress_bar(progress, total=len(grid), unit="window") as bar:
        for batch_windows in _batches(grid, batch_size):
            x = torch.from_numpy(np.stack([image[(slice(None), *w.slices)] for w in batch_windows]))
            probs = _forward(model, x.to(device).float(), tta).cpu().numpy()
            if total is None:
                total = np.zeros((probs.shape[1], *image.shape[1:]), dtype=np.float32)
            for w, p in zip(batch_windows, probs, strict=True):
                total[(slice(None), *w.slices)] += p
                counts[w.slices] += 1.0
            bar.update(len(batch_windows))
    assert total is not None
    return (total / counts)[:, :height, :width]


def _forward(model: nn.Module, x: torch.Tensor, tta: bool) -> torch.Tensor:
    # In float32 whatever precision the network ran in (bfloat16 autocast in training's validation).
    probs = torch.softmax(model(x).float(), dim=1)
    if not tta:
        return probs
    for dims in ((-1,), (-2,)):
        probs += torch.softmax(model(x.flip(dims)).float(), dim=1).flip(dims)
    return probs / 3.0


def _batches(windows: list[Window], size: int) -> Iterator[list[Window]]:
    for start in range(0, len(windows), size):
        yield windows[start : start + size]
