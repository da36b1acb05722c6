"""GeoTIFF reading and writing with rasterio; georeference kept end to end.

Every GeoTIFF the project writes (the `tiles` stage's images and label maps, the synthetic scenes,
evaluate's class maps, predict's outputs) goes through `geotiff_writer`, so they share one layout
(`geotiff_profile`): tiled 256 x 256 where the raster is at least that large, deflate, floating-point
predictor for float bands, BigTIFF where a classic TIFF could overflow. Class maps carry the ISPRS
colour table, written before any pixel: libtiff fixes the PhotometricInterpretation tag when the
first pixels are written, and a colour table set afterwards leaves the file tagged min-is-black, so
that readers following the tag (PIL, web viewers) show grey.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import rasterio
import rasterio.shutil
from affine import Affine
from rasterio.control import GroundControlPoint
from rasterio.crs import CRS
from rasterio.io import DatasetReader, DatasetWriter
from rasterio.windows import Window

from aerialseg.classes import CLASSES
from aerialseg.files import atomic_path, temp_name

TILE = 256
"""GeoTIFF tile edge in px (GDAL wants multiples of 16); a raster narrower or lower stays striped.
Streamed rows are written in whole tile rows, so no compressed tile is written twice."""

FAST_DEFLATE_LEVEL = 1
"""Deflate level for large rasters written once (the `tiles` stage): 2-3x faster than GDAL's
default 6, for a few % more disk."""

OverviewResampling = Literal["nearest", "mode"]
"""How COG overviews are computed: the most frequent class for class maps, nearest otherwise."""

COG_BLOCK = 512
"""Tile edge of the Cloud Optimized GeoTIFFs (GDAL's COG default, rio-cogeo's `deflate` profile)."""


@dataclass(frozen=True)
class GeoReference:
    """Where a raster lies on the ground: its CRS and pixel-to-map transform, or its ground
    control points (then `transform` is the identity and `crs` None, as rasterio reads such files)."""

    crs: CRS | None
    transform: Affine
    gcps: tuple[GroundControlPoint, ...] = ()
    gcps_crs: CRS | None = None

    @classmethod
    def of(cls, src: DatasetReader) -> GeoReference:
        """The georeference of an open raster, GCPs included."""
        gcps, gcps_crs = src.gcps
        return cls(src.crs, src.transform, tuple(gcps), gcps_crs if gcps else None)


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


def pixel_read_error(
    where: object, err: BaseException, advice: str = DOWNLOAD_AGAIN, part: str = ""
) -> RasterError:
    """The one-line error for a raster whose header opened but whose pixels cannot be read
    (an interrupted download or copy); `where` is the path, or `archive!member`; `part` says which
    pixels (`rows 0-512 of 6000`, `band 1, decimated`)."""
    part = f"{part}; " if part else ""
    return RasterError(
        f"{where}: pixel data cannot be read ({part}truncated or corrupt file? {gdal_detail(err)}); {advice}"
    )


def read_raster(path: str | Path, advice: str = RERUN_TILES) -> tuple[np.ndarray, GeoReference]:
    """Read all bands as a (bands, H, W) array with its georeference.

    Every failure is a RasterError naming `path`; a file whose pixels cannot be read ends with
    `advice` (the project's tiles by default: they are the files this function reads).
    """
    path = Path(path)
    with _open(path) as src:
        try:
            return src.read(), GeoReference.of(src)
        except rasterio.errors.RasterioError as err:
            raise pixel_read_error(path, err, advice) from err


def read_row_blocks(
    path: str | Path, rows: int = 512, advice: str = RERUN_TILES, dtype: str | None = None
) -> Iterator[np.ndarray]:
    """All bands, `rows` rows at a time: (bands, rows, W) arrays from the top down (in `dtype`
    where given), so that a whole large tile is never in memory. Errors as `read_raster`'s."""
    path = Path(path)
    with _open(path) as src:
        for top in range(0, src.height, rows):
            window = Window(0, top, src.width, min(rows, src.height - top))
            try:
                yield src.read(window=window, out_dtype=dtype)
            except rasterio.errors.RasterioError as err:
                raise pixel_read_error(path, err, advice) from err


def _open(path: Path) -> DatasetReader:
    if not path.exists():
        raise RasterError(f"{path}: file does not exist")
    try:
        return rasterio.open(path)
    except rasterio.errors.RasterioError as err:
        raise RasterError(f"{path}: not a readable raster ({gdal_detail(err)})") from err


# --------------------------------------------------------------------------- writing


def class_palette(nodata: int | None = None) -> dict[int, tuple[int, int, int, int]]:
    """The ISPRS colour table (index -> RGBA); `nodata`, where given, transparent black."""
    palette = {c.index: (*c.colour, 255) for c in CLASSES}
    if nodata is not None:
        palette[int(nodata)] = (0, 0, 0, 0)
    return palette


def geotiff_profile(
    height: int,
    width: int,
    count: int,
    dtype: Any,
    georef: GeoReference,
    *,
    nodata: float | None = None,
    deflate_level: int | None = None,
    threads: bool = True,
) -> dict[str, Any]:
    """rasterio's creation profile of every GeoTIFF the project writes (see the module doc).

    `deflate_level` None keeps GDAL's default (6); FAST_DEFLATE_LEVEL for large write-once rasters.
    `threads`: deflate on every free core (the compressed bytes are the same as on one).
    """
    profile: dict[str, Any] = {
        "driver": "GTiff",
        "height": height,
        "width": width,
        "count": count,
        "dtype": np.dtype(dtype).name,
        "compress": "deflate",
        "nodata": nodata,
        # A classic TIFF ends at 4 GB; GDAL switches to BigTIFF where the raster could pass that.
        "BIGTIFF": "IF_SAFER",
    }
    if not georef.gcps:  # with GCPs, the identity transform is no georeference (geotiff_writer sets them)
        profile.update(crs=georef.crs, transform=georef.transform)
    if deflate_level is not None:
        profile["zlevel"] = deflate_level
    if threads:
        profile["num_threads"] = "all_cpus"
    if height >= TILE and width >= TILE:
        profile.update(tiled=True, blockxsize=TILE, blockysize=TILE)
    if np.issubdtype(np.dtype(dtype), np.floating):
        profile["predictor"] = 3
    return profile


class GeoTiffRows:
    """A GeoTIFF being filled from the top down with finished row blocks (see `geotiff_writer`).

    Blocks of any height are buffered and written in whole tile rows (multiples of TILE rows), so
    memory is at most a block plus TILE - 1 rows, and no compressed tile is written twice.
    """

    def __init__(self, dst: DatasetWriter, path: Path, *, mask: bool = False) -> None:
        self.dst, self.path, self.mask = dst, path, mask
        self.row = 0
        """Rows written so far."""
        self._parts: list[np.ndarray] = []
        self._valid: list[np.ndarray] = []

    def add(self, rows: np.ndarray, valid: np.ndarray | None = None) -> None:
        """Append the next (bands, h, width) rows (or (h, width) for one band); `valid`: (h, width)
        bool, False where the internal mask marks nodata (only with mask=True; None: all valid).

        Raises ValueError naming the file when the block's bands or width do not fit, or it runs
        past the raster's last row."""
        data = rows[np.newaxis] if rows.ndim == 2 else rows
        buffered = sum(p.shape[1] for p in self._parts)
        if data.ndim != 3 or data.shape[0] != self.dst.count or data.shape[2] != self.dst.width:
            raise ValueError(
                f"{self.path}: a block of shape {rows.shape} does not fit a raster of "
                f"{self.dst.count} band(s) x {self.dst.width} px wide"
            )
        if self.row + buffered + data.shape[1] > self.dst.height:
            raise ValueError(
                f"{self.path}: rows {self.row + buffered}-{self.row + buffered + data.shape[1]} run past "
                f"the raster's {self.dst.height} rows"
            )
        self._parts.append(data)
        if self.mask:
            self._valid.append(np.ones(data.shape[1:], bool) if valid is None else valid)
        end = (self.row + buffered + data.shape[1]) // TILE * TILE
        if end > self.row:
            self._write(end - self.row)

    def close(self) -> None:
        """Write the buffered rows; raises ValueError when the raster is not complete."""
        buffered = sum(p.shape[1] for p in self._parts)
        if buffered:
            self._write(buffered)
        if self.row != self.dst.height:
            raise ValueError(f"{self.path}: {self.row} of {self.dst.height} rows written")

    def _write(self, rows: int) -> None:
        data = self._parts[0] if len(self._parts) == 1 else np.concatenate(self._parts, axis=1)
        window = Window(0, self.row, data.shape[2], rows)
        self.dst.write(data[:, :rows], window=window)
        self._parts = [data[:, rows:]] if data.shape[1] > rows else []
        if self.mask:
            valid = np.concatenate(self._valid, axis=0)
            self.dst.write_mask(np.where(valid[:rows], 255, 0).astype(np.uint8), window=window)
            self._valid = [valid[rows:]] if valid.shape[0] > rows else []
        self.row += rows


@contextlib.contextmanager
def geotiff_writer(
    path: str | Path,
    *,
    height: int,
    width: int,
    count: int,
    dtype: Any,
    georef: GeoReference,
    nodata: float | None = None,
    band_names: Sequence[str] | None = None,
    tags: dict[str, str] | None = None,
    scales: Sequence[float] | None = None,
    class_map: bool = False,
    mask: bool = False,
    deflate_level: int | None = None,
    cog: bool = False,
) -> Iterator[GeoTiffRows]:
    """Write a GeoTIFF at `path` from row blocks: `with geotiff_writer(...) as out: out.add(rows)`.

    The file appears under `path` only once every row was added and the block is left without an
    error (`files.atomic_path`). Metadata is set before the first pixel: georeference (GCPs
    included), band descriptions, dataset tags, band scales (value x scale = the quantity), and for
    a `class_map` (one uint8 band of class indices) the ISPRS colour table, so the file is a
    palette TIFF. `mask` adds an internal nodata mask, filled from `add`'s `valid`.

    `cog`: the file under `path` is a Cloud Optimized GeoTIFF with overviews (`to_cog`, from a
    temporary plain GeoTIFF beside it, removed after); overviews take the most frequent class
    (mode) for class maps, the nearest pixel otherwise.

    Raises ValueError for a class map that is not one uint8 band, band names not one per band, and
    blocks that do not fit (`GeoTiffRows.add`, `.close`).
    """
    path = Path(path)
    if class_map and (count != 1 or np.dtype(dtype) != np.uint8):
        raise ValueError(f"{path}: a class map is one uint8 band, not {count} x {np.dtype(dtype).name}")
    if band_names is not None and len(band_names) != count:
        raise ValueError(f"{path}: {len(band_names)} band names for {count} bands")
    # No compression threads with an internal mask: GDAL 3.10's threaded deflate logs
    # "Bad value 5 for ExtraSamples" errors when mask and pixel blocks of 6 bands alternate.
    profile = geotiff_profile(
        height, width, count, dtype, georef, nodata=nodata, deflate_level=deflate_level, threads=not mask
    )
    with atomic_path(path) as final_tmp:
        plain = temp_name(path.with_name(f"{path.stem}_plain{path.suffix}")) if cog else final_tmp
        try:
            with warnings.catch_warnings():
                # Georeferenced by GCPs, set right after it opens: not the "no georeference" it warns of.
                warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
                dst = rasterio.open(plain, "w", **profile)
            with dst:
                if georef.gcps:
                    dst.gcps = (list(georef.gcps), georef.gcps_crs)
                if class_map:
                    dst.write_colormap(1, class_palette(None if nodata is None else int(nodata)))
                if band_names is not None:
                    dst.descriptions = tuple(band_names)
                if scales is not None:
                    dst.scales = tuple(scales)
                if tags:
                    dst.update_tags(**tags)
                out = GeoTiffRows(dst, path, mask=mask)
                yield out
                out.close()
            if cog:
                to_cog(plain, final_tmp, overview_resampling="mode" if class_map else "nearest")
        finally:
            if cog:
                plain.unlink(missing_ok=True)


def write_raster(
    path: str | Path,
    array: np.ndarray,
    georef: GeoReference,
    *,
    band_names: Sequence[str] | None = None,
    colormap: bool = False,
    nodata: float | None = None,
    tags: dict[str, str] | None = None,
) -> Path:
    """Write a (bands, H, W) or (H, W) array as a GeoTIFF, atomically: `geotiff_writer` in one block.

    `colormap`: a class map (one uint8 band), written as a palette TIFF with the ISPRS colours, so
    GIS tools and image viewers show the classes in their official colours.
    """
    data = array[np.newaxis] if array.ndim == 2 else array
    with geotiff_writer(
        path,
        height=data.shape[1],
        width=data.shape[2],
        count=data.shape[0],
        dtype=data.dtype,
        georef=georef,
        nodata=nodata,
        band_names=band_names,
        tags=tags,
        class_map=colormap,
    ) as out:
        out.add(data)
    return Path(path)


def to_cog(source: Path, dest: Path, *, overview_resampling: OverviewResampling) -> None:
    """Copy the GeoTIFF `source` to `dest` as a Cloud Optimized GeoTIFF: GDAL's COG driver,
    deflate, COG_BLOCK px tiles, overviews halving until they fit one tile, by
    `overview_resampling`; colour table, nodata, internal mask, band descriptions, scales and tags
    kept. Memory: GDAL copies block by block, overviews through a temporary file beside `dest`
    (a 6000 x 6000 px class map: +119 MB peak, 1.3 s; `benchmarks/bench_gis_outputs.py`).

    GDAL's driver rather than rio-cogeo's `cog_translate`: cog_translate reads through a WarpedVRT,
    which drops an internal mask (rasterio issue 1454), so the probabilities' nodata mask came out
    all valid (rio-cogeo 7.0.4, GDAL 3.10). rio-cogeo's `cog_validate` checks the result in the tests.
    """
    with rasterio.open(source) as src:
        floating = np.issubdtype(np.dtype(src.dtypes[0]), np.floating)
    options: dict[str, Any] = {
        "driver": "COG",
        "compress": "DEFLATE",
        "blocksize": COG_BLOCK,
        "overview_resampling": overview_resampling.upper(),
        "num_threads": "ALL_CPUS",
        "BIGTIFF": "IF_SAFER",
    }
    if floating:
        options["predictor"] = "YES"
    rasterio.shutil.copy(source, dest, **options)
