"""The one sliding-window inference engine: evaluate, whole-tile validation and predict use it.

A raster of any size is cut into the pipeline's window grid (`windows.window_grid`, row-major),
the windows go through the network in batches (averaged over the test-time augmentation views),
and each pixel's class probabilities are the blend of all windows covering it, weighted by the
window's blending weights. The rows are read on demand from a `RowReader` and handed on as soon as
no later window can touch them (`Block`s), so memory is O(width x window) whatever the height: a
6000 x 6000 Potsdam tile with 512 px windows holds about 2 x 512 rows of sums, not the whole tile.

Choices, each in one registry (`TTA`, `BLENDS`) and checked against it:

- TTA: `none`; `flip` (identity, left-right, up-down: 3 views); `d4` (the 8 flips and right-angle
  rotations). Each view's softmax is undone to the original orientation and the views averaged.
- Blending: `uniform` (every window pixel weighs 1: the mean over covering windows); `cosine` (a
  Hann window, sin^2, as TorchGeo and MONAI offer, so a pixel near a window's border, where the
  network sees least context, counts less than one near another window's centre); `gaussian`
  (MONAI's default: sigma = window / 8 along each axis). Weights never reach 0, so the raster's
  own border, which only window borders cover, is still predicted.
- Precision and device: `devices.resolve_device` / `resolve_inference_precision`, decided once by
  the caller (`Settings.resolve`); bfloat16 runs under autocast, sums are float32 either way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Literal, Protocol

import numpy as np
import torch
from torch import nn

from aerialseg.devices import resolve_device, resolve_inference_precision
from aerialseg.model import check_input_size
from aerialseg.progress import progress_bar
from aerialseg.registry import Registry
from aerialseg.windows import window_grid

Tta = Literal["none", "flip", "d4"]
Blend = Literal["uniform", "cosine", "gaussian"]
GAUSSIAN_SIGMA = 0.125
"""Gaussian blending's sigma as a fraction of the window side (MONAI's sliding-window default)."""
MIN_WEIGHT = 1e-3
"""Floor of the smooth blending weights: the raster's border pixels, covered by window borders only,
keep a defined (not 0/0) value."""


# ------------------------------------------------------------------ registries


Undo = Callable[[torch.Tensor], torch.Tensor]
Views = list[tuple[torch.Tensor, Undo]]


def _views_none(x: torch.Tensor) -> Views:
    return [(x, lambda p: p)]


def _views_flip(x: torch.Tensor) -> Views:
    return [
        (x, lambda p: p),
        (x.flip(-1), lambda p: p.flip(-1)),
        (x.flip(-2), lambda p: p.flip(-2)),
    ]


def _views_d4(x: torch.Tensor) -> Views:
    views: Views = []
    for flip in (False, True):
        base = x.flip(-1) if flip else x
        for k in range(4):

            def undo(p: torch.Tensor, k: int = k, flip: bool = flip) -> torch.Tensor:
                p = torch.rot90(p, -k, dims=(-2, -1))
                return p.flip(-1) if flip else p

            views.append((torch.rot90(base, k, dims=(-2, -1)), undo))
    return views


TTA: Registry[Callable[[torch.Tensor], Views]] = Registry(
    "a test-time augmentation", {"none": _views_none, "flip": _views_flip, "d4": _views_d4}
)
"""Test-time augmentation: a batch -> [(view, undo)], `undo` bringing the view's output back."""


def _uniform(size: int) -> np.ndarray:
    return np.ones(size, dtype=np.float32)


def _cosine(size: int) -> np.ndarray:
    return np.maximum(np.sin(np.pi * (np.arange(size) + 0.5) / size) ** 2, MIN_WEIGHT).astype(np.float32)


def _gaussian(size: int) -> np.ndarray:
    centre, sigma = (size - 1) / 2.0, GAUSSIAN_SIGMA * size
    return np.maximum(np.exp(-0.5 * ((np.arange(size) - centre) / sigma) ** 2), MIN_WEIGHT).astype(np.float32)


BLENDS: Registry[Callable[[int], np.ndarray]] = Registry(
    "a window blending", {"uniform": _uniform, "cosine": _cosine, "gaussian": _gaussian}
)
"""Blending: window side -> (side,) float32 weights along one axis; a window's are the outer product."""


def blend_weights(blend: str, window: int) -> np.ndarray:
    """(window, window) float32 weights of every window pixel."""
    axis = BLENDS.choose(blend)(window)
    return np.outer(axis, axis).astype(np.float32)


# ------------------------------------------------------------------ settings


@dataclass(frozen=True)
class Settings:
    """How to slide the window. `device` and `precision` are the caller's choice words until
    `resolve()` turns them into what this machine has (once, before the first window)."""

    window: int
    overlap: float = 0.5
    batch_size: int = 4
    tta: str = "none"
    blend: str = "cosine"
    precision: str = "32"
    """`auto`, `32` or `bf16` (autocast); `32` inside Lightning, whose own autocast then applies."""
    device: str = "cpu"
    """`auto`, `cpu`, `cuda`, `mps`, or a torch device string such as `cuda:1`."""

    def check(self) -> Settings:
        """Raises ValueError naming the first setting not usable (for a choice: its options)."""
        check_input_size(self.window, self.window)
        window_grid(self.window, self.window, self.window, self.overlap)  # checks the overlap
        TTA.choose(self.tta)
        blend_weights(self.blend, self.window)
        if self.batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {self.batch_size}")
        return self

    def resolve(self) -> Settings:
        """The device and precision this machine gives for the choices (devices.py)."""
        device = resolve_device(self.device) if ":" not in self.device else torch.device(self.device)
        return replace(
            self, device=str(device), precision=resolve_inference_precision(self.precision, device)
        )


# ------------------------------------------------------------------ reading rows


@dataclass(frozen=True)
class Block:
    """A run of finished rows: no window after this point touches them."""

    row: int
    """The first row, in the raster."""
    probabilities: np.ndarray
    """(classes, rows, width) float32: the blend over the windows (and TTA views) covering a pixel."""
    valid: np.ndarray | None
    """(rows, width) bool, False where the input is nodata; None when every pixel is valid."""


class RowReader(Protocol):
    """Normalised input rows, read on demand, in increasing order."""

    @property
    def height(self) -> int: ...

    @property
    def width(self) -> int: ...

    def read(self, top: int, bottom: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Rows [top, bottom) -> ((bands, rows, width) float32 normalised, valid mask or None)."""
        ...


class ArrayRows:
    """A normalised (bands, H, W) array in memory as a RowReader."""

    def __init__(self, image: np.ndarray) -> None:
        self.image = image

    @property
    def height(self) -> int:
        return int(self.image.shape[1])

    @property
    def width(self) -> int:
        return int(self.image.shape[2])

    def read(self, top: int, bottom: int) -> tuple[np.ndarray, np.ndarray | None]:
        return self.image[:, top:bottom], None


class _PaddedRows:
    """The reader's rows, padded by reflection up to one window where the raster is smaller, and
    cached so that each row is read once although consecutive window rows overlap."""

    def __init__(self, reader: RowReader, window: int) -> None:
        self.reader = reader
        self.pad_rows = max(0, window - reader.height)
        self.pad_cols = max(0, window - reader.width)
        self.top = 0
        self.data: np.ndarray | None = None
        self.valid: np.ndarray | None = None
        if self.pad_rows:  # shorter than one window: read it whole (it is small) and pad it
            data, self.valid = reader.read(0, reader.height)
            self.data = np.pad(data, ((0, 0), (0, self.pad_rows), (0, self.pad_cols)), mode="reflect")

    @property
    def bottom(self) -> int:
        return self.top + (0 if self.data is None else self.data.shape[1])

    def get(self, top: int, bottom: int) -> np.ndarray:
        """Padded rows [top, bottom); `top` never decreases from one call to the next."""
        if self.pad_rows:
            assert self.data is not None
            return self.data[:, top:bottom]
        if self.data is None or top >= self.bottom:
            self.data, self.valid = self._read(top, bottom)
        elif bottom > self.bottom or top > self.top:
            keep = top - self.top
            data, valid = self.data[:, keep:], None if self.valid is None else self.valid[keep:]
            if bottom > self.bottom:
                new, new_valid = self._read(self.bottom, bottom)
                valid = _concat_valid(valid, data.shape[1], new_valid, new.shape[1], self.reader.width)
                data = np.concatenate([data, new], axis=1)
            self.data, self.valid = data, valid
        self.top = top
        return self.data[:, : bottom - top]

    def valid_rows(self, top: int, bottom: int) -> np.ndarray | None:
        """The valid mask of real (not padded) rows [top, bottom), real columns only."""
        if self.valid is None:
            return None
        return self.valid[top - self.top : bottom - self.top, : self.reader.width]

    def _read(self, top: int, bottom: int) -> tuple[np.ndarray, np.ndarray | None]:
        data, valid = self.reader.read(top, bottom)
        if self.pad_cols:
            data = np.pad(data, ((0, 0), (0, 0), (0, self.pad_cols)), mode="reflect")
        return data, valid


def _concat_valid(
    old: np.ndarray | None, old_rows: int, new: np.ndarray | None, new_rows: int, width: int
) -> np.ndarray | None:
    if old is None and new is None:
        return None
    old = np.ones((old_rows, width), bool) if old is None else old
    new = np.ones((new_rows, width), bool) if new is None else new
    return np.concatenate([old, new], axis=0)


class _Sums:
    """Weighted probability sums and weight sums for the rows [top, top + rows) of the padded
    raster, in a buffer allocated once (two windows high) and shifted when rows are handed on."""

    def __init__(self, classes: int, width: int, window: int) -> None:
        self.top = 0
        self.total = np.zeros((classes, 2 * window, width), dtype=np.float32)
        self.weights = np.zeros((2 * window, width), dtype=np.float32)

    def cover(self, bottom: int) -> None:
        rows = bottom - self.top
        if rows > self.weights.shape[0]:  # a larger step than expected: grow (never in the grid's order)
            total = np.zeros((self.total.shape[0], rows, self.total.shape[2]), dtype=np.float32)
            weights = np.zeros((rows, self.weights.shape[1]), dtype=np.float32)
            total[:, : self.weights.shape[0]] = self.total
            weights[: self.weights.shape[0]] = self.weights
            self.total, self.weights = total, weights

    def take(self, bottom: int) -> np.ndarray:
        """Blended probabilities of rows [top, bottom), whose sums are then dropped."""
        n = bottom - self.top
        mean = self.total[:, :n] / self.weights[:n]
        rest = self.weights.shape[0] - n
        self.total[:, :rest] = self.total[:, n:]
        self.total[:, rest:] = 0.0
        self.weights[:rest] = self.weights[n:]
        self.weights[rest:] = 0.0
        self.top = bottom
        return mean


# ------------------------------------------------------------------ the engine


@torch.no_grad()
def stream_blocks(
    model: nn.Module,
    reader: RowReader,
    settings: Settings,
    *,
    progress: Callable[[int], object] | None = None,
) -> Iterator[Block]:
    """Sliding-window class probabilities of `reader`'s raster, as consecutive blocks of finished rows.

    `settings` must be resolved (`Settings.resolve`) or hold a plain device and `32`/`bf16`.
    `progress(n)` is called with the number of windows done after each batch.
    """
    settings.check()
    window = settings.window
    height, width = reader.height, reader.width
    rows = _PaddedRows(reader, window)
    padded_h, padded_w = max(height, window), max(width, window)
    grid = window_grid(padded_h, padded_w, window, settings.overlap)
    device = torch.device(settings.device)
    forward = _views_forward(model, settings.tta, device, settings.precision)
    weights = blend_weights(settings.blend, window)
    uniform = settings.blend == "uniform"
    sums: _Sums | None = None
    step = settings.batch_size
    for start in range(0, len(grid), step):
        batch = grid[start : start + step]
        top, bottom = batch[0].row, batch[-1].row + window  # rows never decrease along the grid
        image = rows.get(top, bottom)
        x = torch.from_numpy(
            np.stack([image[:, w.row - top : w.row - top + window, w.col : w.col + window] for w in batch])
        )
        probs = forward(x.to(device).float()).cpu().numpy()
        if sums is None:
            sums = _Sums(probs.shape[1], padded_w, window)
        sums.cover(bottom)
        for w, p in zip(batch, probs, strict=True):
            r = w.row - sums.top
            at = (slice(r, r + window), slice(w.col, w.col + window))
            if uniform:  # the plain sum, bit for bit what the mean over windows has always been
                sums.total[(slice(None), *at)] += p
                sums.weights[at] += 1.0
            else:
                sums.total[(slice(None), *at)] += p * weights
                sums.weights[at] += weights
        if progress is not None:
            progress(len(batch))
        # Rows above the next window's top edge are final.
        done = grid[start + step].row if start + step < len(grid) else padded_h
        if done > sums.top:
            first = sums.top
            mean = sums.take(done)
            last = min(done, height)
            if last > first:
                yield Block(first, mean[:, : last - first, :width], rows.valid_rows(first, last))


def predict_probabilities(
    model: nn.Module,
    image: np.ndarray,
    settings: Settings,
    *,
    progress: str | None = None,
) -> np.ndarray:
    """(bands, H, W) normalised array -> (classes, H, W) float32 probabilities, through the engine.

    `progress` names a progress bar over the windows (aerialseg.progress); None shows none.
    """
    reader = ArrayRows(image)
    n = count_windows(reader.height, reader.width, settings)
    with progress_bar(progress, total=n, unit="window") as bar:
        blocks = list(stream_blocks(model, reader, settings, progress=bar.update))
    return np.concatenate([b.probabilities for b in blocks], axis=1)


def count_windows(height: int, width: int, settings: Settings) -> int:
    w = settings.window
    return len(window_grid(max(height, w), max(width, w), w, settings.overlap))


class _Float32Logits(nn.Module):
    """Logits as float32 whatever autocast computed them in, so softmax and numpy see float32."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).float()


def _views_forward(
    model: nn.Module, tta: str, device: torch.device, precision: str
) -> Callable[[torch.Tensor], torch.Tensor]:
    """softmax(model(x)) averaged over the TTA views, in float32, under bf16 autocast if asked."""
    if precision not in ("32", "bf16"):
        raise ValueError(f"precision must be resolved to 32 or bf16 first, got {precision!r}")
    net = _Float32Logits(model)
    make_views = TTA[tta]

    def views(x: torch.Tensor) -> torch.Tensor:
        probs: torch.Tensor | None = None
        pairs = make_views(x)
        for view, undo in pairs:
            p = undo(torch.softmax(net(view), dim=1))
            probs = p if probs is None else probs + p
        assert probs is not None
        return probs if len(pairs) == 1 else probs / float(len(pairs))

    if precision == "32":
        return views

    def autocast_views(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return views(x)

    return autocast_views
