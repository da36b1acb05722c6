"""`aerialseg predict`: class maps of GeoTIFFs of any size, read and written in row blocks.

The sliding window is the pipeline's (`windows.window_grid` over the whole raster, windows in
the same row-major order and batches, probabilities averaged as `inference.predict_probabilities`
averages them), so a tile predicted here gets exactly the classes `evaluate` gives it. What
differs is memory: instead of the whole raster and all its probabilities, `stream_blocks` holds

- the input rows of the current batch of windows (about window + stride rows, normalised), and
- probability sums and counts for those same rows,

and hands on each run of rows as soon as no later window can touch it (the rows above the next
window's top edge). The memory is O(width x window), whatever the height: a 6000 x 6000 Potsdam
tile with 256 px windows needs about 60 MB of sums, not 860 MB.

Outputs, for an input `<stem>.tif`, in the output folder, each written under a temporary name
and renamed only when complete:

- `<stem>.tif`: uint8 class index (0-5), 255 = nodata, the input's CRS and transform, tiled
  256 x 256, deflate, the ISPRS colour table embedded;
- `<stem>_probabilities.tif` (optional): one uint8 band per class, round(255 x probability)
  (band scale 1/255 set, so GDAL-aware tools read probabilities), an internal mask for nodata;
- `<stem>.png` (optional): the class map in ISPRS colours, decimated to at most `preview_size` px
  on its longer side; nodata black.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import rasterio
import torch
from PIL import Image
from rasterio.enums import ColorInterp, MaskFlags, Resampling
from rasterio.errors import RasterioError
from rasterio.io import DatasetReader, DatasetWriter
from rasterio.windows import Window as RasterWindow
from torch import nn

from aerialseg.classes import CLASSES, IGNORE_INDEX, index_to_colours
from aerialseg.config import SPECTRAL_BANDS
from aerialseg.datasets.heights import ground_level
from aerialseg.datasets.isprs_convert import ndsm_metres_from_grey
from aerialseg.files import atomic_path
from aerialseg.inference import _forward as _forward_flips
from aerialseg.model import check_input_size
from aerialseg.progress import progress_bar
from aerialseg.raster import gdal_detail
from aerialseg.windows import window_grid

Tta = Literal["none", "flip", "d4"]
Units = Literal["tiles", "isprs"]
TTA_CHOICES: tuple[str, ...] = ("none", "flip", "d4")
DEVICE_CHOICES: tuple[str, ...] = ("auto", "cpu", "cuda")
PRECISION_CHOICES: tuple[str, ...] = ("32", "bf16")
NODATA = IGNORE_INDEX
"""Class value of pixels that are nodata in the input (255, also the output's nodata value)."""
TILE = 256
"""Output GeoTIFF tile size; finished rows are written in whole tile rows."""
GDAL_CACHE_MB = 64
"""GDAL's block cache, capped: its default (5% of RAM) would otherwise keep the blocks of a large
input that were already read, and hide whether prediction itself runs in bounded memory."""
RASTER_SUFFIXES = (".tif", ".tiff")
UNITS_SAMPLE_PIXELS = 1_000_000
"""Pixels per band read (decimated, nearest) to check an input's spectral units: a 6000 x 6000
tile is read at every 6th pixel, never whole."""
REFLECTANCE_MARGIN = 0.5
"""How far outside [0, 1] a spectral band in tiles units may go (surface reflectances slightly
above 1, noise below 0); 8-bit or 16-bit values are far beyond it."""
ISPRS_SPECTRAL_MAX = 255
"""The ISPRS orthophotos' spectral bands are 8-bit: 0-255."""


READ_AGAIN = "download or copy it again"
"""What to do about an input whose pixels cannot be read (an interrupted download or copy)."""


class PredictError(ValueError):
    """An input cannot be predicted (missing, not a raster, unreadable, wrong bands)."""


# --------------------------------------------------------------------------- the streaming core


@dataclass(frozen=True)
class Block:
    """A run of finished rows: no window after this point touches them."""

    row: int
    """The first row, in the raster."""
    probabilities: np.ndarray
    """(classes, rows, width) float32: the mean over the windows (and TTA views) covering a pixel."""
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
    """A normalised (bands, H, W) array in memory as a RowReader (tests, and callers that have one)."""

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
    """Input rows of the raster as `predict_probabilities` pads it (reflection up to one window),
    cached so that each row is read once although consecutive window rows overlap."""

    def __init__(self, reader: RowReader, window: int) -> None:
        self.reader = reader
        self.pad_rows = max(0, window - reader.height)
        self.pad_cols = max(0, window - reader.width)
        self.top = 0
        self.data: np.ndarray | None = None
        self.valid: np.ndarray | None = None
        if self.pad_rows:  # shorter than one window: read it whole (it is small), pad like the original
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
        else:
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
    """Probability sums and window counts for a band of rows [top, top + rows) of the padded raster."""

    def __init__(self, classes: int, width: int) -> None:
        self.top = 0
        self.total = np.zeros((classes, 0, width), dtype=np.float32)
        self.counts = np.zeros((0, width), dtype=np.float32)

    def cover(self, bottom: int) -> None:
        rows = self.counts.shape[0]
        if self.top + rows >= bottom:
            return
        total = np.zeros((self.total.shape[0], bottom - self.top, self.total.shape[2]), dtype=np.float32)
        counts = np.zeros((bottom - self.top, self.counts.shape[1]), dtype=np.float32)
        total[:, :rows] = self.total
        counts[:rows] = self.counts
        self.total, self.counts = total, counts

    def take(self, bottom: int) -> np.ndarray:
        """Mean probabilities of rows [top, bottom), which are then forgotten."""
        n = bottom - self.top
        # The same float32 division as predict_probabilities: identical values.
        mean = self.total[:, :n] / self.counts[:n]
        self.total, self.counts = self.total[:, n:].copy(), self.counts[n:].copy()
        self.top = bottom
        return mean


@torch.no_grad()
def stream_blocks(
    model: nn.Module,
    reader: RowReader,
    *,
    window: int,
    overlap: float,
    batch_size: int = 4,
    tta: Tta = "none",
    device: str | torch.device = "cpu",
    precision: str = "32",
    progress: Callable[[int], object] | None = None,
) -> Iterator[Block]:
    """Sliding-window probabilities of `reader`'s raster, as consecutive blocks of finished rows.

    The windows, their order, the batches and the float32 sums are those of
    `inference.predict_probabilities`, so the probabilities are the same, bit for bit, for the
    same model on the same device (tested). `progress(n)` is called with the windows done.
    """
    check_input_size(window, window)
    if tta not in TTA_CHOICES:
        raise ValueError(f"tta must be one of {TTA_CHOICES}, got {tta!r}")
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    height, width = reader.height, reader.width
    rows = _PaddedRows(reader, window)
    padded_h, padded_w = max(height, window), max(width, window)
    grid = window_grid(padded_h, padded_w, window, overlap)
    forward = _views_forward(model, tta, torch.device(device), precision)
    sums: _Sums | None = None
    for start in range(0, len(grid), batch_size):
        batch = grid[start : start + batch_size]
        top, bottom = batch[0].row, batch[-1].row + window  # rows never decrease along the grid
        image = rows.get(top, bottom)
        x = torch.from_numpy(
            np.stack([image[:, w.row - top : w.row - top + window, w.col : w.col + window] for w in batch])
        ).to(device)
        probs = forward(x.float()).cpu().numpy()
        if sums is None:
            sums = _Sums(probs.shape[1], padded_w)
        sums.cover(bottom)
        for w, p in zip(batch, probs, strict=True):
            r = w.row - sums.top
            sums.total[:, r : r + window, w.col : w.col + window] += p
            sums.counts[r : r + window, w.col : w.col + window] += 1.0
        if progress is not None:
            progress(len(batch))
        # Rows above the next window's top edge are final.
        done = grid[start + batch_size].row if start + batch_size < len(grid) else padded_h
        if done > sums.top:
            first = sums.top
            mean = sums.take(done)
            last = min(done, height)
            if last > first:
                yield Block(first, mean[:, : last - first, :width], rows.valid_rows(first, last))


def predict_array(
    model: nn.Module,
    image: np.ndarray,
    *,
    window: int,
    overlap: float,
    batch_size: int = 4,
    tta: Tta = "none",
    device: str | torch.device = "cpu",
    precision: str = "32",
) -> np.ndarray:
    """(bands, H, W) normalised array -> (classes, H, W) probabilities through the streaming code:
    the in-memory counterpart of `inference.predict_probabilities`, with the same result."""
    blocks = stream_blocks(
        model,
        ArrayRows(image),
        window=window,
        overlap=overlap,
        batch_size=batch_size,
        tta=tta,
        device=device,
        precision=precision,
    )
    return np.concatenate([b.probabilities for b in blocks], axis=1)


class _Float32Logits(nn.Module):
    """Logits as float32 whatever autocast computed them in, so softmax and numpy see float32."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).float()


def _views_forward(
    model: nn.Module, tta: Tta, device: torch.device, precision: str
) -> Callable[[torch.Tensor], torch.Tensor]:
    """softmax(model(x)) averaged over the TTA views; `none` and `flip` are the pipeline's own
    (`evaluate.tta: false / true`), `d4` adds the 90-degree rotations (8 views)."""
    if precision not in PRECISION_CHOICES:
        raise ValueError(f"precision must be one of {PRECISION_CHOICES}, got {precision!r}")
    net: nn.Module = _Float32Logits(model) if precision == "bf16" else model

    def views(x: torch.Tensor) -> torch.Tensor:
        if tta != "d4":
            return _forward_flips(net, x, tta == "flip")
        probs = torch.zeros(0)
        for flip in (False, True):
            base = x.flip(-1) if flip else x
            for k in range(4):
                p = torch.softmax(net(torch.rot90(base, k, dims=(-2, -1))), dim=1)
                p = torch.rot90(p, -k, dims=(-2, -1))
                p = p.flip(-1) if flip else p
                probs = p if probs.numel() == 0 else probs + p
        return probs / 8.0

    if precision == "32":
        return views

    def autocast_views(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return views(x)

    return autocast_views


def resolve_device(device: str) -> torch.device:
    """auto -> cuda where available, else cpu; cuda without a GPU is an error, not a silent CPU run."""
    if device not in DEVICE_CHOICES:
        raise PredictError(f"device must be one of {DEVICE_CHOICES}, got {device!r}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise PredictError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    return torch.device(device)


# --------------------------------------------------------------------------- GeoTIFF input


def expected_input(meta: dict[str, Any]) -> str:
    bands = list(meta["bands"])
    return f"a GeoTIFF with {len(bands)} bands ({', '.join(bands)}, in that order)"


def open_input(path: Path, meta: dict[str, Any]) -> DatasetReader:
    """Open an input raster and check its band count; every failure names the file and what was expected."""
    expected = expected_input(meta)
    if not path.exists():
        raise PredictError(f"{path}: no such file; expected {expected}")
    if not path.is_file():
        raise PredictError(f"{path}: not a file; expected {expected}")
    try:
        src = rasterio.open(path)
    except RasterioError as err:
        raise PredictError(
            f"{path}: not a readable raster ({gdal_detail(err)}); expected {expected}"
        ) from err
    if input_bands(src, len(meta["bands"])) is None:
        extra = ""
        if src.count == len(meta["bands"]) + 1:
            interp = ", ".join(f"{i} {c.name}" for i, c in enumerate(src.colorinterp, start=1))
            extra = f" (one band more is read only when it is an alpha band, and none is: {interp})"
        src.close()
        raise PredictError(f"{path}: {src.count} band(s), but the model expects {expected}{extra}")
    if src.width < 1 or src.height < 1:
        src.close()
        raise PredictError(f"{path}: empty raster ({src.width} x {src.height}); expected {expected}")
    return src


@dataclass(frozen=True)
class InputBands:
    """Which bands of an input raster the model reads, and its alpha band, if any."""

    indexes: list[int]
    """1-based, in the model's band order."""
    alpha: int | None
    """1-based; its 0 pixels are nodata. Never fed to the network."""


def input_bands(src: DatasetReader, count: int) -> InputBands | None:
    """The model's `count` bands of `src`: all of its bands, or all but its one alpha band
    (colour interpretation alpha, as GDAL reports an RGBA GeoTIFF's 4th band); None otherwise."""
    if src.count == count:
        return InputBands(list(range(1, count + 1)), None)
    alphas = [i for i, c in enumerate(src.colorinterp, start=1) if c == ColorInterp.alpha]
    if src.count == count + 1 and len(alphas) == 1:
        return InputBands([i for i in range(1, src.count + 1) if i != alphas[0]], alphas[0])
    return None


def check_units(src: DatasetReader, meta: dict[str, Any], units: Units) -> None:
    """Stop on spectral bands that are not in `units`, before anything is predicted.

    The model was trained on the tiles stage's bands, whose spectral bands are reflectances in
    [0, 1] (float32). `tiles`: each spectral band must be floating point and within [0, 1] (give
    or take REFLECTANCE_MARGIN); `isprs`: within 0-255, and not all within [0, 1] when floating
    point (reflectances already). Each band is checked on a decimated read of its valid pixels
    (UNITS_SAMPLE_PIXELS); height bands are metres and not checked.
    """
    bands = input_bands(src, len(meta["bands"]))
    assert bands is not None  # open_input checked it
    for name, index in zip(meta["bands"], bands.indexes, strict=True):
        if name not in SPECTRAL_BANDS:
            continue
        values = _sample(src, index, bands.alpha, expected_input(meta))
        if values.size == 0:
            continue  # all nodata: nothing of it is predicted
        dtype = np.dtype(src.dtypes[index - 1])
        lo, hi = float(values.min()), float(values.max())
        fits_8_bit = lo >= 0 and hi <= ISPRS_SPECTRAL_MAX
        floating = np.issubdtype(dtype, np.floating)
        reflectances = floating and lo >= -REFLECTANCE_MARGIN and hi <= 1 + REFLECTANCE_MARGIN
        what = (
            f"{src.name} band {index} ({name}): {dtype.name} values in [{_value(lo)}, {_value(hi)}] (sampled)"
        )
        if units == "tiles":
            if reflectances:
                continue
            hint = (
                "pass --units isprs to convert the ISPRS products' 8-bit values"
                if fits_8_bit
                else "scale the band to [0, 1] first (--units isprs takes 8-bit values 0-255)"
            )
            raise PredictError(
                f"{what}, but the model expects reflectances in [0, 1] as the tiles stage writes them "
                f"(float32); {hint}"
            )
        if reflectances:
            raise PredictError(
                f"{what}, but --units isprs expects the ISPRS products' 8-bit values 0-{ISPRS_SPECTRAL_MAX}; "
                "these look like reflectances in [0, 1] already: leave out --units isprs"
            )
        if not fits_8_bit:
            raise PredictError(
                f"{what}, but --units isprs expects the ISPRS products' 8-bit values 0-{ISPRS_SPECTRAL_MAX}; "
                "convert 16-bit or 12-bit imagery to 0-255 first (or to reflectances in [0, 1], with "
                "--units tiles)"
            )


def _sample(src: DatasetReader, band: int, alpha: int | None, expected: str) -> np.ndarray:
    """The finite, valid (not masked, not transparent) values of `band` on a decimated read."""
    step = max(1, math.ceil(math.sqrt(src.height * src.width / UNITS_SAMPLE_PIXELS)))
    shape = (max(1, src.height // step), max(1, src.width // step))
    try:
        sample = src.read(band, out_shape=shape, resampling=Resampling.nearest, masked=True)
        keep = ~np.ma.getmaskarray(sample)
        if alpha is not None:
            keep &= src.read(alpha, out_shape=shape, resampling=Resampling.nearest) > 0
    except RasterioError as err:
        raise PredictError(
            f"{src.name}: pixel data cannot be read (band {band}, decimated; truncated or corrupt file? "
            f"{gdal_detail(err)}); {READ_AGAIN}; expected {expected}"
        ) from err
    values = np.asarray(sample.data)[keep]
    return values[np.isfinite(values)]


def _value(x: float) -> str:
    return f"{x:.0f}" if float(x).is_integer() else f"{x:.4g}"


class RasterRows:
    """An open raster as a RowReader: full-width windowed reads, normalised, nodata masked.

    A pixel is nodata where any band is masked (the bands' nodata value, an internal mask, an
    alpha band), where the alpha band (a band beyond the model's, see `input_bands`) is 0, or where
    a band is not finite; the network sees the band mean there (0 after normalisation), so
    nodata values do not leak into the neighbouring pixels' predictions.
    """

    def __init__(self, src: DatasetReader, meta: dict[str, Any], units: Units = "tiles") -> None:
        self.src = src
        self.expected = expected_input(meta)
        self.mean = np.asarray(meta["band_mean"], dtype=np.float32)[:, None, None]
        self.std = np.asarray(meta["band_std"], dtype=np.float32)[:, None, None]
        bands = input_bands(src, len(meta["bands"]))
        if bands is None:
            raise PredictError(f"{src.name}: {src.count} band(s), but the model expects {self.expected}")
        self.indexes, self.alpha = bands.indexes, bands.alpha
        # tiles units = scale * input + offset, per band (identity for tiles-stage inputs), then
        # ndsm_metres_from_grey for the bands in `grey_ndsm`.
        self.scale, self.offset, self.grey_ndsm = _to_tile_units(
            src, list(meta["bands"]), self.indexes, units
        )
        self.masked = any(src.mask_flag_enums[i - 1] != [MaskFlags.all_valid] for i in self.indexes)
        self.floating = any(np.issubdtype(np.dtype(src.dtypes[i - 1]), np.floating) for i in self.indexes)

    @property
    def height(self) -> int:
        return int(self.src.height)

    @property
    def width(self) -> int:
        return int(self.src.width)

    def read(self, top: int, bottom: int) -> tuple[np.ndarray, np.ndarray | None]:
        window = RasterWindow(0, top, self.width, bottom - top)
        try:
            data = self.src.read(self.indexes, window=window, out_dtype=np.float32)
            valid = self.src.read_masks(self.indexes, window=window).all(axis=0) if self.masked else None
            if self.alpha is not None:
                opaque = self.src.read(self.alpha, window=window) > 0
                valid = opaque if valid is None else valid & opaque
        except RasterioError as err:
            raise PredictError(
                f"{self.src.name}: pixel data cannot be read (rows {top}-{bottom} of {self.height}; "
                f"truncated or corrupt file? {gdal_detail(err)}); {READ_AGAIN}; expected {self.expected}"
            ) from err
        if self.floating:
            finite = np.isfinite(data).all(axis=0)
            if not finite.all():
                valid = finite if valid is None else valid & finite
        data = data * self.scale + self.offset
        for i in self.grey_ndsm:
            data[i] = ndsm_metres_from_grey(data[i])
        data = (data - self.mean) / self.std
        if valid is not None:
            data[:, ~valid] = 0.0
        return data, valid


def _to_tile_units(
    src: DatasetReader, bands: list[str], indexes: list[int], units: Units
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Per-band scale and offset, and the bands to pass through `ndsm_metres_from_grey`, that
    bring `units` to those of the `tiles` stage's images (`indexes`: the bands' 1-based indexes
    in `src`).

    `isprs`: the products as distributed, stacked in the model's band order: spectral bands in
    0-255 (divided by 255), `dsm` in metres above sea level (made height above the raster's
    DSM_GROUND_PERCENTILE, from a decimated read as the tiles stage does for large tiles), `ndsm`
    as the grey values of Potsdam's nDSM JPEGs (decimetres), converted by the tiles stage's own
    function.
    """
    scale = np.ones((len(bands), 1, 1), dtype=np.float32)
    offset = np.zeros((len(bands), 1, 1), dtype=np.float32)
    grey_ndsm: list[int] = []
    if units == "tiles":
        return scale, offset, grey_ndsm
    for i, (band, index) in enumerate(zip(bands, indexes, strict=True)):
        if band in SPECTRAL_BANDS:
            scale[i] = 1.0 / 255.0
        elif band == "dsm":
            try:
                offset[i] = -ground_level(src, band=index)
            except ValueError as err:
                raise PredictError(f"{err}; expected heights in metres") from err
            except RasterioError as err:
                raise PredictError(
                    f"{src.name}: pixel data cannot be read (band {index}, decimated; truncated or "
                    f"corrupt file? {gdal_detail(err)}); {READ_AGAIN}"
                ) from err
        elif band == "ndsm":
            grey_ndsm.append(i)
    return scale, offset, grey_ndsm


# --------------------------------------------------------------------------- GeoTIFF output


class _TileRowWriter:
    """Buffers finished rows and writes them to a dataset in whole tile rows (multiples of TILE),
    so that no compressed tile is written twice."""

    def __init__(self, dst: DatasetWriter, *, mask: bool = False) -> None:
        self.dst, self.mask = dst, mask
        self.row = 0
        self.parts: list[np.ndarray] = []
        self.valid_parts: list[np.ndarray] = []

    def add(self, data: np.ndarray, valid: np.ndarray | None) -> None:
        self.parts.append(data)
        if self.mask:
            self.valid_parts.append(np.ones(data.shape[1:], bool) if valid is None else valid)
        buffered = sum(p.shape[1] for p in self.parts)
        end = (self.row + buffered) // TILE * TILE
        if end > self.row:
            self._write(end - self.row)

    def close(self) -> None:
        buffered = sum(p.shape[1] for p in self.parts)
        if buffered:
            self._write(buffered)

    def _write(self, rows: int) -> None:
        data = np.concatenate(self.parts, axis=1)
        window = RasterWindow(0, self.row, data.shape[2], rows)
        self.dst.write(data[:, :rows], window=window)
        self.parts = [data[:, rows:]] if data.shape[1] > rows else []
        if self.mask:
            valid = np.concatenate(self.valid_parts, axis=0)
            self.dst.write_mask(np.where(valid[:rows], 255, 0).astype(np.uint8), window=window)
            self.valid_parts = [valid[rows:]] if valid.shape[0] > rows else []
        self.row += rows


def _profile(src: DatasetReader, count: int, nodata: int | None) -> dict[str, Any]:
    profile: dict[str, Any] = {
        "driver": "GTiff",
        "height": src.height,
        "width": src.width,
        "count": count,
        "dtype": "uint8",
        "crs": src.crs,
        "transform": src.transform,
        "nodata": nodata,
        "compress": "deflate",
        "BIGTIFF": "IF_SAFER",
    }
    # GDAL tiles must be multiples of 16; rasters smaller than a tile stay striped.
    if src.height >= TILE and src.width >= TILE:
        profile.update(tiled=True, blockxsize=TILE, blockysize=TILE)
    return profile


def _copy_gcps(src: DatasetReader, dst: DatasetWriter) -> None:
    gcps, gcp_crs = src.gcps
    if gcps:  # georeferenced by ground control points rather than a transform
        dst.gcps = (gcps, gcp_crs)


# --------------------------------------------------------------------------- files and folders


@dataclass(frozen=True)
class PredictOptions:
    window: int | None = None
    """Window size in px (multiple of 32); None = the patch size the model was trained on."""
    overlap: float = 0.5
    batch_size: int = 4
    tta: Tta = "none"
    device: str = "auto"
    precision: str = "32"
    probabilities: bool = False
    preview: bool = True
    preview_size: int = 2048
    """Longest side of the PNG preview in px; larger class maps are decimated (nearest)."""
    progress: bool = True
    units: Units = "tiles"
    """tiles: bands as the `tiles` stage writes them; isprs: the ISPRS products' own units."""


@dataclass(frozen=True)
class OutputPaths:
    classes: Path
    probabilities: Path | None
    preview: Path | None

    def all(self) -> list[Path]:
        return [p for p in (self.classes, self.probabilities, self.preview) if p is not None]


@dataclass
class PredictResult:
    input: Path
    outputs: OutputPaths
    height: int
    width: int
    windows: int
    nodata_pixels: int
    seconds: float
    class_pixels: dict[str, int] = field(default_factory=dict)


def output_paths(path: Path, output_dir: Path, options: PredictOptions) -> OutputPaths:
    stem = path.stem
    return OutputPaths(
        classes=output_dir / f"{stem}.tif",
        probabilities=output_dir / f"{stem}_probabilities.tif" if options.probabilities else None,
        preview=output_dir / f"{stem}.png" if options.preview else None,
    )


def collect_inputs(inputs: Sequence[Path]) -> list[Path]:
    """Files as given, folders as the *.tif / *.tiff files in them (not recursive), sorted."""
    files: list[Path] = []
    for path in inputs:
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in RASTER_SUFFIXES)
            if not found:
                raise PredictError(f"{path}: folder has no *.tif or *.tiff files; expected GeoTIFFs")
            files.extend(found)
        else:
            files.append(path)  # a missing file is reported by open_input, with what was expected
    stems: dict[str, Path] = {}
    for path in files:
        if path.stem in stems:
            raise PredictError(
                f"{path} and {stems[path.stem]}: same name {path.stem!r}, so their outputs would collide"
            )
        stems[path.stem] = path
    return files


def predict_paths(
    model: nn.Module,
    meta: dict[str, Any],
    inputs: Sequence[Path],
    output_dir: Path,
    options: PredictOptions,
    *,
    model_name: str = "",
    on_done: Callable[[PredictResult], object] | None = None,
) -> list[PredictResult]:
    """Predict every input (files, or folders of GeoTIFFs) into `output_dir`.

    Every input is checked (exists, is a raster, has the model's band count, or one more that is
    alpha, its spectral bands are in `options.units`) before the first is predicted, so a bad file
    in a folder fails the command before it spends any time.
    """
    window = int(options.window or meta["patch_size"])
    try:
        check_input_size(window, window)
        window_grid(window, window, window, options.overlap)
    except ValueError as err:
        raise PredictError(f"window {window} px, overlap {options.overlap}: {err}") from None
    if options.tta not in TTA_CHOICES or options.precision not in PRECISION_CHOICES or options.batch_size < 1:
        raise PredictError(f"invalid options {options}")
    resolve_device(options.device)
    files = collect_inputs(inputs)
    for path in files:
        with open_input(path, meta) as src:
            check_units(src, meta, options.units)
        for out in output_paths(path, output_dir, options).all():
            if out.resolve() == path.resolve():
                raise PredictError(
                    f"{path}: the output {out} would overwrite the input; choose another --output"
                )
    results = []
    for path in files:
        result = predict_file(model, meta, path, output_dir, options, model_name=model_name, checked=True)
        if on_done is not None:
            on_done(result)
        results.append(result)
    return results


def predict_file(
    model: nn.Module,
    meta: dict[str, Any],
    path: Path,
    output_dir: Path,
    options: PredictOptions,
    *,
    model_name: str = "",
    checked: bool = False,
) -> PredictResult:
    """Predict one GeoTIFF into `output_dir` (see the module doc for the outputs).

    `checked`: its spectral units were checked already (`check_units`, as `predict_paths` does
    for every input first), so the decimated reads are not repeated."""
    started = time.perf_counter()
    window = int(options.window or meta["patch_size"])
    device = resolve_device(options.device)
    paths = output_paths(path, output_dir, options)
    output_dir.mkdir(parents=True, exist_ok=True)
    num_classes = len(meta["classes"])
    counts = np.zeros(256, dtype=np.int64)
    with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB), contextlib.ExitStack() as stack:
        src = stack.enter_context(open_input(path, meta))
        if not checked:
            check_units(src, meta, options.units)
        reader = RasterRows(src, meta, options.units)
        height, width = reader.height, reader.width
        n_windows = len(window_grid(max(height, window), max(width, window), window, options.overlap))
        # Temporary names first: on any error they are removed, and nothing appears under the final names.
        tmp_classes = stack.enter_context(atomic_path(paths.classes))
        tmp_probs = stack.enter_context(atomic_path(paths.probabilities)) if paths.probabilities else None
        tmp_preview = stack.enter_context(atomic_path(paths.preview)) if paths.preview else None
        tags = {
            "aerialseg_model": model_name,
            "aerialseg_input": path.name,
            "aerialseg_window": str(window),
            "aerialseg_overlap": str(options.overlap),
            "aerialseg_tta": options.tta,
            "aerialseg_classes": json.dumps(meta["classes"]),
        }
        dst = stack.enter_context(rasterio.open(tmp_classes, "w", **_profile(src, 1, NODATA)))
        _copy_gcps(src, dst)
        dst.write_colormap(1, {**{c.index: (*c.colour, 255) for c in CLASSES}, NODATA: (0, 0, 0, 0)})
        dst.set_band_description(1, "class")
        dst.update_tags(**tags)
        class_writer = _TileRowWriter(dst)
        prob_writer = None
        if tmp_probs is not None:
            pdst = stack.enter_context(rasterio.open(tmp_probs, "w", **_profile(src, num_classes, None)))
            _copy_gcps(src, pdst)
            pdst.scales = (1.0 / 255.0,) * num_classes
            for i, cls in enumerate(meta["classes"], start=1):
                pdst.set_band_description(i, str(cls["name"]))
            pdst.update_tags(**tags, aerialseg_scale="probability = value / 255")
            prob_writer = _TileRowWriter(pdst, mask=True)
        step = max(1, math.ceil(max(height, width) / options.preview_size))
        preview_rows: list[np.ndarray] = []
        desc = f"predict {path.name}" if options.progress else None
        with progress_bar(desc, total=n_windows, unit="window") as bar:
            for block in stream_blocks(
                model,
                reader,
                window=window,
                overlap=options.overlap,
                batch_size=options.batch_size,
                tta=options.tta,
                device=device,
                precision=options.precision,
                progress=bar.update,
            ):
                classes = block.probabilities.argmax(axis=0).astype(np.uint8)
                if block.valid is not None:
                    classes[~block.valid] = NODATA
                counts += np.bincount(classes.ravel(), minlength=256)
                class_writer.add(classes[np.newaxis], block.valid)
                if prob_writer is not None:
                    scaled = np.rint(block.probabilities * 255.0).astype(np.uint8)
                    if block.valid is not None:
                        scaled[:, ~block.valid] = 0
                    prob_writer.add(scaled, block.valid)
                if tmp_preview is not None:
                    preview_rows.append(classes[(-block.row) % step :: step, ::step])
        class_writer.close()
        if prob_writer is not None:
            prob_writer.close()
        if tmp_preview is not None:
            Image.fromarray(index_to_colours(np.concatenate(preview_rows, axis=0))).save(tmp_preview, "PNG")
    names = [str(c["name"]) for c in meta["classes"]]
    return PredictResult(
        input=path,
        outputs=paths,
        height=height,
        width=width,
        windows=n_windows,
        nodata_pixels=int(counts[NODATA]),
        seconds=time.perf_counter() - started,
        class_pixels={name: int(counts[i]) for i, name in enumerate(names)},
    )
