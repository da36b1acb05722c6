"""One raster source for the sliding window: an input GeoTIFF read in full-width row blocks, its
bands converted to the units the model was trained in, normalised (the model card's `normalise`,
as a step), nodata masked.

Units: `tiles` takes the bands as the `tiles` stage writes them (spectral reflectances in [0, 1],
heights in metres); `isprs` takes the ISPRS products as distributed, stacked in the model's band
order (spectral 0-255, `dsm` in metres above sea level, `ndsm` as the grey values of Potsdam's nDSM
JPEGs), converted with the `tiles` stage's own functions. Spectral values that fit neither are
stopped before anything is predicted (`check_units`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import rasterio
from rasterio.enums import ColorInterp, MaskFlags, Resampling
from rasterio.errors import RasterioError
from rasterio.io import DatasetReader
from rasterio.windows import Window as RasterWindow

from aerialseg.config import SPECTRAL_BANDS
from aerialseg.datasets.heights import ground_level
from aerialseg.datasets.isprs_convert import ndsm_metres_from_grey
from aerialseg.model_card import ModelCard
from aerialseg.raster import gdal_detail, pixel_read_error

Units = Literal["tiles", "isprs"]
UNITS_CHOICES: tuple[str, ...] = ("tiles", "isprs")
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


class InputError(ValueError):
    """An input raster cannot be used (missing, not a raster, unreadable, wrong bands or units)."""


def expected_input(card: ModelCard) -> str:
    return f"a GeoTIFF with {card.expected_bands()}"


def open_input(path: Path, card: ModelCard) -> DatasetReader:
    """Open an input raster and check its band count; every failure names the file and what was expected."""
    expected = expected_input(card)
    if not path.exists():
        raise InputError(f"{path}: no such file; expected {expected}")
    if not path.is_file():
        raise InputError(f"{path}: not a file; expected {expected}")
    try:
        src = rasterio.open(path)
    except RasterioError as err:
        raise InputError(f"{path}: not a readable raster ({gdal_detail(err)}); expected {expected}") from err
    if input_bands(src, len(card.bands)) is None:
        extra = ""
        if src.count == len(card.bands) + 1:
            interp = ", ".join(f"{i} {c.name}" for i, c in enumerate(src.colorinterp, start=1))
            extra = f" (one band more is read only when it is an alpha band, and none is: {interp})"
        src.close()
        raise InputError(f"{path}: {src.count} band(s), but the model expects {expected}{extra}")
    if src.width < 1 or src.height < 1:
        src.close()
        raise InputError(f"{path}: empty raster ({src.width} x {src.height}); expected {expected}")
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


def check_units(src: DatasetReader, card: ModelCard, units: Units) -> None:
    """Stop on spectral bands that are not in `units`, before anything is predicted.

    The model was trained on the tiles stage's bands, whose spectral bands are reflectances in
    [0, 1] (float32). `tiles`: each spectral band must be floating point and within [0, 1] (give
    or take REFLECTANCE_MARGIN); `isprs`: within 0-255, and not all within [0, 1] when floating
    point (reflectances already). Each band is checked on a decimated read of its valid pixels
    (UNITS_SAMPLE_PIXELS); height bands are metres and not checked.
    """
    bands = input_bands(src, len(card.bands))
    assert bands is not None  # open_input checked it
    for name, index in zip(card.bands, bands.indexes, strict=True):
        if name not in SPECTRAL_BANDS:
            continue
        values = _sample(src, index, bands.alpha, expected_input(card))
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
            raise InputError(
                f"{what}, but the model expects reflectances in [0, 1] as the tiles stage writes them "
                f"(float32); {hint}"
            )
        if reflectances:
            raise InputError(
                f"{what}, but --units isprs expects the ISPRS products' 8-bit values 0-{ISPRS_SPECTRAL_MAX}; "
                "these look like reflectances in [0, 1] already: leave out --units isprs"
            )
        if not fits_8_bit:
            raise InputError(
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
        raise _read_error(src.name, f"band {band}, decimated", err, expected) from err
    values = np.asarray(sample.data)[keep]
    return values[np.isfinite(values)]


def _value(x: float) -> str:
    return f"{x:.0f}" if float(x).is_integer() else f"{x:.4g}"


class RasterSource:
    """An open raster as an `inference.RowReader`: full-width windowed reads in the model's band
    order, converted to tile units, normalised by the model card, nodata masked.

    A pixel is nodata where any band is masked (the bands' nodata value, an internal mask, an
    alpha band), where the alpha band (a band beyond the model's, see `input_bands`) is 0, or where
    a band is not finite; the network sees the band mean there (0 after normalisation), so
    nodata values do not leak into the neighbouring pixels' predictions.
    """

    def __init__(self, src: DatasetReader, card: ModelCard, units: Units = "tiles") -> None:
        self.src = src
        self.card = card
        self.expected = expected_input(card)
        bands = input_bands(src, len(card.bands))
        if bands is None:
            raise InputError(f"{src.name}: {src.count} band(s), but the model expects {self.expected}")
        self.indexes, self.alpha = bands.indexes, bands.alpha
        # tiles units = scale * input + offset, per band (identity for tiles-stage inputs), then
        # ndsm_metres_from_grey for the bands in `grey_ndsm`.
        self.scale, self.offset, self.grey_ndsm = _to_tile_units(src, list(card.bands), self.indexes, units)
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
            raise _read_error(
                self.src.name, f"rows {top}-{bottom} of {self.height}", err, self.expected
            ) from err
        if self.floating:
            finite = np.isfinite(data).all(axis=0)
            if not finite.all():
                valid = finite if valid is None else valid & finite
        data = data * self.scale + self.offset
        for i in self.grey_ndsm:
            data[i] = ndsm_metres_from_grey(data[i])
        data = self.card.normalise(data)
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
                raise InputError(f"{err}; expected heights in metres") from err
            except RasterioError as err:
                raise _read_error(src.name, f"band {index}, decimated", err) from err
        elif band == "ndsm":
            grey_ndsm.append(i)
    return scale, offset, grey_ndsm


def _read_error(where: str, part: str, err: RasterioError, expected: str | None = None) -> InputError:
    """The one line for pixels that cannot be read (raster.pixel_read_error's wording)."""
    advice = READ_AGAIN if expected is None else f"{READ_AGAIN}; expected {expected}"
    return InputError(str(pixel_read_error(where, err, advice, part)))
