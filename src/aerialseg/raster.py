"""GeoTIFF reading and writing with rasterio; georeference kept end to end."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from affine import Affine
from rasterio.crs import CRS

from aerialseg.classes import CLASSES
from aerialseg.files import atomic_path


@dataclass(frozen=True)
class GeoReference:
    """Where a raster lies on the ground: its CRS and pixel-to-map transform."""

    crs: CRS | None
    transform: Affine


class RasterError(ValueError):
    """A raster file is missing, unreadable or not what was expected."""


DOWNLOAD_AGAIN = "download it again"
RERUN_TILES = "rerun the `tiles` stage (`dvc repro tiles`, or `dvc checkout` for the stored one)"


def gdal_detail(err: BaseException) -> str:
    """The first line of what GDAL said about a failed read.

    rasterio's own message for a failed block read is "Read failed. See previous exception for
    details": the block, band and file are in the exception it was raised from.
    """
    for candidate in (err.__cause__, err.__context__, err):
        text = str(candidate).strip() if candidate is not None else ""
        if text and not text.startswith("Read failed. See previous exception"):
            return text.splitlines()[0]
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def pixel_read_error(where: object, err: BaseException, advice: str = DOWNLOAD_AGAIN) -> RasterError:
    """The one-line error for a raster whose header opened but whose pixels cannot be read
    (an interrupted download or copy); `where` is the path, or `archive!member`."""
    return RasterError(
        f"{where}: pixel data cannot be read (truncated or corrupt file? {gdal_detail(err)}); {advice}"
    )


def read_raster(path: str | Path, advice: str = RERUN_TILES) -> tuple[np.ndarray, GeoReference]:
    """Read all bands as a (bands, H, W) array with its georeference.

    Every failure is a RasterError naming `path`; a file whose pixels cannot be read ends with
    `advice` (the project's tiles by default: they are the files this function reads).
    """
    path = Path(path)
    if not path.exists():
        raise RasterError(f"{path}: file does not exist")
    try:
        src = rasterio.open(path)
    except rasterio.errors.RasterioError as err:
        raise RasterError(f"{path}: not a readable raster ({gdal_detail(err)})") from err
    with src:
        try:
            return src.read(), GeoReference(src.crs, src.transform)
        except rasterio.errors.RasterioError as err:
            raise pixel_read_error(path, err, advice) from err


def write_raster(
    path: str | Path,
    array: np.ndarray,
    georef: GeoReference,
    *,
    band_names: list[str] | None = None,
    colormap: bool = False,
    nodata: float | None = None,
) -> Path:
    """Write a (bands, H, W) or (H, W) array as a tiled, compressed GeoTIFF, atomically.

    `colormap` embeds the ISPRS palette (single-band uint8 class maps), so GIS tools show
    the classes in their official colours.
    """
    data = array[np.newaxis] if array.ndim == 2 else array
    profile: dict[str, Any] = {
        "driver": "GTiff",
        "height": data.shape[1],
        "width": data.shape[2],
        "count": data.shape[0],
        "dtype": data.dtype.name,
        "crs": georef.crs,
        "transform": georef.transform,
        "compress": "deflate",
        "nodata": nodata,
    }
    # GDAL requires tile sizes that are multiples of 16; small rasters stay striped.
    if data.shape[1] >= 256 and data.shape[2] >= 256:
        profile.update(tiled=True, blockxsize=256, blockysize=256)
    if np.issubdtype(data.dtype, np.floating):
        profile["predictor"] = 3
    path = Path(path)
    with atomic_path(path) as tmp, rasterio.open(tmp, "w", **profile) as dst:
        dst.write(data)
        if band_names:
            dst.descriptions = tuple(band_names)
        if colormap:
            dst.write_colormap(1, {c.index: (*c.colour, 255) for c in CLASSES})
    return path
