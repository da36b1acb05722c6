"""One ISPRS tile -> image, label and eroded-label GeoTIFFs, read and written in row blocks.

Memory stays bounded by a block of BLOCK_ROWS rows of every input plus a coarse ground grid,
whatever the tile size (a Potsdam tile is 6000 x 6000 px: 864 MB as a 6-band float32 image).
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from rasterio.io import DatasetReader
from rasterio.windows import Window

from aerialseg.classes import decode_colours, unknown_colour_error
from aerialseg.config import SPECTRAL_BANDS
from aerialseg.datasets.errors import DatasetLayoutError
from aerialseg.datasets.heights import (
    GroundModel,
    estimate_ground,
    ground_level,
    normalised_heights,
    read_heights,
)
from aerialseg.datasets.isprs_files import RasterSource, TileFiles
from aerialseg.datasets.isprs_layout import (
    DSM,
    LABEL,
    LABEL_ERODED,
    NDSM,
    NDSM_JPEG_METRES_PER_VALUE,
    DatasetLayout,
)
from aerialseg.raster import FAST_DEFLATE_LEVEL, GeoReference, RasterError, geotiff_writer, pixel_read_error

BLOCK_ROWS = 512
"""Rows read and written at a time; a multiple of the output's 256-px GeoTIFF tiles."""

GDAL_CACHE_MB = 256
"""GDAL's block cache while converting; its default (5 % of RAM) would hold gigabytes of blocks on
a large machine. Blocks are written once, in order, so a cache of a few rows of tiles suffices."""

MAX_HEIGHT_PADDING_PX = 4
"""How many pixels a height raster (DSM or nDSM) may lack on its orthophoto's right or bottom edge.

The missing columns or rows are filled by repeating the raster's last column or row. The official
Potsdam tile 3_13 needs this: its DSM and its nDSM JPEG are 5999 x 6000 px, its orthophoto and
labels 6000 x 6000. 4 px is 20 cm at Potsdam's 5 cm (36 cm at Vaihingen's 9 cm), less than a car is
wide, along one border of the tile: edge replication is a fair guess of heights there. A raster
shorter than that, larger than the orthophoto, or short on the top or left edge (a shifted grid:
every pixel would be off) is more likely another crop or the wrong file and stays an error.
"""


def ndsm_metres_from_grey(grey: np.ndarray) -> np.ndarray:
    """Potsdam's nDSM JPEG grey values (`*_normalized_lastools.jpg`) -> float32 metres above ground.

    A grey value is a decimetre (NDSM_JPEG_METRES_PER_VALUE = 0.1 m: 120 -> 12.0 m, 255 -> 25.5 m).
    The JPEGs carry no scale; the decimetres are an inference: LAStools' lasheight writes 8-bit
    heights as decimetres clamped to 0..255, and the benchmark's own nDSMs for Vaihingen (M. Gerke)
    are documented as "heights encoded in dm". The one conversion of these values: the `tiles`
    stage and `aerialseg predict --units isprs` both call it.
    """
    return np.asarray(grey, dtype=np.float32) * np.float32(NDSM_JPEG_METRES_PER_VALUE)


NDSM_FROM_ARCHIVE = "archive"
NDSM_DERIVED = "derived"
NO_NDSM = "none"


@dataclass(frozen=True)
class TilePlan:
    """Which file gives which output band, decided before any pixel is read."""

    spectral: dict[str, list[tuple[int, int]]]
    """Orthophoto role -> (output band index, 1-based band in that file) pairs."""
    reference_role: str
    """The orthophoto whose grid the outputs take."""
    needs_dsm: bool
    ndsm_from_archive: bool

    @property
    def roles(self) -> list[str]:
        """Every file this tile's conversion reads."""
        roles = [self.reference_role, *(r for r in self.spectral if r != self.reference_role)]
        roles += [DSM] if self.needs_dsm else []
        roles += [NDSM] if self.ndsm_from_archive else []
        return [*roles, LABEL, LABEL_ERODED]


def plan_tile(tile: TileFiles, layout: DatasetLayout, bands: tuple[str, ...]) -> TilePlan:
    """Pick the file of each band. Raises DatasetLayoutError when a band's files are all missing."""
    spectral: dict[str, list[tuple[int, int]]] = {}
    for out_index, band in enumerate(bands):
        if band not in SPECTRAL_BANDS:
            continue
        role, order = _spectral_source(tile, layout, band)
        spectral.setdefault(role, []).append((out_index, order.index(band) + 1))
    present_orthos = [role for role in layout.ortho_roles if tile.get(role) is not None]
    ndsm_from_archive = "ndsm" in bands and tile.get(NDSM) is not None
    return TilePlan(
        spectral=spectral,
        reference_role=next(iter(spectral), present_orthos[0]),
        needs_dsm="dsm" in bands or ("ndsm" in bands and not ndsm_from_archive),
        ndsm_from_archive=ndsm_from_archive,
    )


def _spectral_source(tile: TileFiles, layout: DatasetLayout, band: str) -> tuple[str, tuple[str, ...]]:
    for role, order in layout.spectral_sources:
        if band in order and tile.get(role) is not None:
            return role, order
    options = " or ".join(
        f"{layout.role(role).example.format(tile=tile.tile_id)} ({layout.role(role).where})"
        for role, order in layout.spectral_sources
        if band in order
    )
    found = ", ".join(str(tile.files[role]) for role in layout.ortho_roles if role in tile.files)
    raise DatasetLayoutError(
        f"{layout.tile_name(tile.tile_id)}: band '{band}' needs {options}; found only {found}"
    )


@dataclass(frozen=True)
class HeightPadding:
    """A height raster (DSM or nDSM) a few pixels short of its orthophoto, filled by edge replication."""

    role: str
    """DSM or NDSM (isprs_layout's roles)."""
    source: RasterSource
    width: int
    height: int
    """The file's own size."""
    cols: int
    rows: int
    """Columns repeated on the right and rows repeated at the bottom to reach the orthophoto's size."""

    def describe(self, reference_width: int, reference_height: int) -> str:
        """'dsm_potsdam_03_13.tif is 5999 x 6000 px, the orthophoto 6000 x 6000: last 1 column repeated'."""
        repeated = [
            f"last {count} {unit}{'s' if count > 1 else ''}"
            for count, unit in ((self.cols, "column"), (self.rows, "row"))
            if count
        ]
        return (
            f"{self.source.name} is {self.width} x {self.height} px, the orthophoto "
            f"{reference_width} x {reference_height}: {' and '.join(repeated)} repeated"
        )


@dataclass(frozen=True)
class ConvertedTile:
    height: int
    width: int
    ndsm_source: str
    snapped_pixels: int
    """Label pixels whose colour was within data.colour_tolerance of a legend colour, not on it."""
    snapped_pixels_eroded: int
    height_padding: tuple[HeightPadding, ...] = ()
    """Height rasters padded to the orthophoto's size (at most MAX_HEIGHT_PADDING_PX per edge)."""

    def padding(self, role: str) -> tuple[int, int]:
        """(columns, rows) repeated to pad the `role` raster; (0, 0) when it was not padded or not read."""
        return next(((p.cols, p.rows) for p in self.height_padding if p.role == role), (0, 0))


def convert_tile(
    tile: TileFiles,
    plan: TilePlan,
    layout: DatasetLayout,
    bands: tuple[str, ...],
    outputs: dict[str, Path],
    colour_tolerance: int,
) -> ConvertedTile:
    """Write outputs["image"], ["label"] and ["label_eroded"] for `tile` as `plan` says."""
    with ExitStack() as stack:
        stack.enter_context(rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB))
        opened = {role: stack.enter_context(_open(tile.files[role])) for role in plan.roles}
        reference = opened[plan.reference_role]
        padding = _check_inputs(tile, plan, layout, opened)
        image = _ImageBlocks(plan, layout, bands, opened, tile.files)
        _write_blocks(outputs["image"], reference, bands, np.float32, image.read)
        image.check_not_empty()
        snapped = _write_label(
            opened[LABEL], tile.files[LABEL], reference, outputs["label"], colour_tolerance, eroded=False
        )
        snapped_eroded = _write_label(
            opened[LABEL_ERODED],
            tile.files[LABEL_ERODED],
            reference,
            outputs["label_eroded"],
            colour_tolerance,
            eroded=True,
        )
        return ConvertedTile(
            height=reference.height,
            width=reference.width,
            ndsm_source=image.ndsm_source,
            snapped_pixels=snapped,
            snapped_pixels_eroded=snapped_eroded,
            height_padding=padding,
        )


# --------------------------------------------------------------------------------------
# Reading and checking inputs


@contextmanager
def _reading(where: object) -> Iterator[None]:
    """Pixel reads of the file `where` (a path or `archive!member`): a failed read names it.

    A file whose header is intact but whose data is cut (an interrupted download) opens, and
    fails only here, with rasterio's "Read failed" that names neither file nor block.
    """
    try:
        yield
    except rasterio.errors.RasterioError as err:
        raise pixel_read_error(where, err) from err


def _open(source: RasterSource) -> DatasetReader:
    try:
        with warnings.catch_warnings():
            # Label files and the nDSM JPEGs may lack georeferencing; _check_grid handles that.
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            return rasterio.open(source.uri)
    except rasterio.errors.RasterioError as err:
        raise RasterError(f"{source}: not a readable raster ({err})") from err


def _check_inputs(
    tile: TileFiles, plan: TilePlan, layout: DatasetLayout, opened: dict[str, DatasetReader]
) -> tuple[HeightPadding, ...]:
    """Check every input against the orthophoto; returns the height rasters that will be padded."""
    reference_role = plan.reference_role
    reference = opened[reference_role]
    band_orders = dict(layout.spectral_sources)
    for role in plan.spectral:
        what = f"an 8-bit {'-'.join(band_orders[role]).upper()} orthophoto"
        _check_bands(opened[role], tile.files[role], np.uint8, len(band_orders[role]), what)
    checks = [(role, "orthophoto", True) for role in plan.spectral if role != reference_role]
    checks += [(DSM, "DSM", True)] if plan.needs_dsm else []
    checks += [(NDSM, "nDSM", False)] if plan.ndsm_from_archive else []
    checks += [(LABEL, "label", False), (LABEL_ERODED, "eroded label", False)]
    reference_source = tile.files[reference_role]
    padding = []
    for role, what, strict in checks:
        src = opened[role]
        heights = role in (DSM, NDSM)
        cols, rows = _check_grid(
            reference_source, reference, tile.files[role], src, what, strict=strict, may_pad=heights
        )
        if cols or rows:
            padding.append(HeightPadding(role, tile.files[role], src.width, src.height, cols, rows))
    for role in (LABEL, LABEL_ERODED):
        _check_bands(opened[role], tile.files[role], np.uint8, 3, "an RGB colour label")
    return tuple(padding)


def _check_bands(src: DatasetReader, source: RasterSource, dtype: type, count: int, what: str) -> None:
    if src.count < count or any(np.dtype(d) != np.dtype(dtype) for d in src.dtypes[:count]):
        raise RasterError(
            f"{source}: expected {what} ({count} {np.dtype(dtype).name} bands), "
            f"found {src.count} band(s) of {', '.join(sorted(set(src.dtypes)))}"
        )


def _check_grid(
    reference_source: RasterSource,
    reference: DatasetReader,
    source: RasterSource,
    src: DatasetReader,
    what: str,
    *,
    strict: bool,
    may_pad: bool = False,
) -> tuple[int, int]:
    """`src` must cover the orthophoto pixel for pixel; returns the (columns, rows) it lacks.

    Sizes must match, except that a height raster (`may_pad`) may lack up to MAX_HEIGHT_PADDING_PX
    columns on the right and rows at the bottom, which are then filled by edge replication. CRS and
    transform must match where both files are georeferenced, so a raster short on the top or left
    edge (its origin moved) is an error; label files and nDSM JPEGs (`strict=False`) may also carry
    no georeferencing at all, which some official downloads do, and are then taken to lie on the
    orthophoto's grid from its top-left corner. Every error is one line naming both files and sizes.
    """
    cols, rows = reference.width - src.width, reference.height - src.height
    paddable = may_pad and all(0 <= short <= MAX_HEIGHT_PADDING_PX for short in (cols, rows))
    if (cols, rows) != (0, 0) and not paddable:
        limit = (
            f"; a DSM or nDSM may lack at most {MAX_HEIGHT_PADDING_PX} columns on the right and "
            f"{MAX_HEIGHT_PADDING_PX} rows at the bottom (filled by repeating its last column and row), "
            f"no more, and may not be larger"
            if may_pad
            else ""
        )
        raise RasterError(
            f"{source}: the {what} is {src.width} x {src.height} px (width x height), but the "
            f"orthophoto {reference_source} is {reference.width} x {reference.height} px; "
            f"the {what} must cover it pixel for pixel{limit}"
        )
    georeferenced = src.crs is not None or not src.transform.is_identity
    if not georeferenced and not strict:
        return cols, rows
    same_crs = src.crs == reference.crs or src.crs is None or reference.crs is None
    if not same_crs or not src.transform.almost_equals(reference.transform, precision=1e-6):
        raise RasterError(
            f"{source}: the {what}'s grid ({src.width} x {src.height} px, CRS {src.crs}, "
            f"transform {tuple(src.transform)[:6]}) differs from the orthophoto {reference_source} "
            f"({reference.width} x {reference.height} px, CRS {reference.crs}, "
            f"transform {tuple(reference.transform)[:6]}){_shift(src, reference) if same_crs else ''}"
        )
    return cols, rows


def _shift(src: DatasetReader, reference: DatasetReader) -> str:
    """Where `src`'s top-left corner lies on the orthophoto's pixel grid, if both have one pixel size."""
    a, e = src.transform.a, src.transform.e
    if not (np.isclose(a, reference.transform.a) and np.isclose(e, reference.transform.e)):
        return ""
    col, row = ~reference.transform * (src.transform.c, src.transform.f)
    return (
        f": its top-left corner lies at column {col:g}, row {row:g} of the orthophoto "
        f"(a shifted grid; only the right and bottom edges of a height raster are ever padded)"
    )


class _ImageBlocks:
    """Reads the output image of a tile one row block at a time, bands in data.bands order.

    `sources` (the tile's files by role) name the file in errors; without them, rasterio's name.
    """

    def __init__(
        self,
        plan: TilePlan,
        layout: DatasetLayout,
        bands: tuple[str, ...],
        opened: dict[str, DatasetReader],
        sources: Mapping[str, RasterSource] | None = None,
    ) -> None:
        self.plan, self.bands, self.opened = plan, bands, opened
        self.where = {role: str(sources[role]) if sources else src.name for role, src in opened.items()}
        self.dsm = opened[DSM] if plan.needs_dsm else None
        self.ground_level = 0.0
        if self.dsm is not None:
            with _reading(self.where[DSM]):
                self.ground_level = ground_level(self.dsm)
        self.ground: GroundModel | None = None
        self.ndsm_source = NO_NDSM
        if "ndsm" in bands:
            self.ndsm_source = NDSM_FROM_ARCHIVE if plan.ndsm_from_archive else NDSM_DERIVED
        if self.ndsm_source == NDSM_DERIVED and self.dsm is not None:
            pixel_size = _pixel_size_m(opened[plan.reference_role], layout)
            with _reading(self.where[DSM]):
                self.ground = estimate_ground(self.dsm, pixel_size, self.ground_level, BLOCK_ROWS)
        # Per orthophoto read: pixels not nodata, and of those, pixels not 0 in every band.
        self.valid = dict.fromkeys(plan.spectral, 0)
        self.nonzero = dict.fromkeys(plan.spectral, 0)

    def read(self, window: Window) -> np.ndarray:
        block = np.empty((len(self.bands), window.height, window.width), dtype=np.float32)
        for role, pairs in self.plan.spectral.items():
            with _reading(self.where[role]):
                pixels = self.opened[role].read([band for _, band in pairs], window=window, masked=True)
            data = np.ma.getdata(pixels)
            valid = ~np.ma.getmaskarray(pixels).any(axis=0)
            self.valid[role] += int(np.count_nonzero(valid))
            self.nonzero[role] += int(np.count_nonzero(valid & (data != 0).any(axis=0)))
            for (out_index, _), values in zip(pairs, data, strict=True):
                block[out_index] = values.astype(np.float32) / 255.0
        dsm = None
        if self.dsm is not None:
            dsm_src, fill = self.dsm, self.ground_level
            with _reading(self.where[DSM]):
                dsm = _read_edge_padded(dsm_src, window, lambda w: read_heights(dsm_src, w, fill))
        for out_index, band in enumerate(self.bands):
            if band == "dsm" and dsm is not None:
                block[out_index] = dsm - self.ground_level
            elif band == "ndsm":
                block[out_index] = self._ndsm(window, dsm)
        return block

    def check_not_empty(self) -> None:
        """Refuse an orthophoto without image data, as ground_level refuses an all-nodata DSM.

        Called once every block was read: an orthophoto whose every pixel is nodata (its nodata
        value, an internal mask or alpha band), or 0 in every band (an empty image), would be
        converted and trained on as black ground.
        """
        for role in self.plan.spectral:
            src = self.opened[role]
            if self.nonzero[role]:
                continue
            if not self.valid[role]:
                nodata = f", nodata value {src.nodata:g}" if src.nodata is not None else ""
                found = f"every pixel is nodata ({src.width} x {src.height} px{nodata})"
            else:
                found = f"every pixel is 0 in every band ({src.width} x {src.height} px): an empty image"
            raise RasterError(
                f"{self.where[role]}: the orthophoto has no valid pixel: {found}; expected image data "
                "(an interrupted download, or an export of an empty area?); download it again"
            )

    def _ndsm(self, window: Window, dsm: np.ndarray | None) -> np.ndarray:
        if self.plan.ndsm_from_archive:
            ndsm = self.opened[NDSM]
            with _reading(self.where[NDSM]):
                grey = _read_edge_padded(ndsm, window, lambda w: ndsm.read(1, window=w))
            return ndsm_metres_from_grey(grey)
        assert dsm is not None and self.ground is not None  # plan_tile asks for the DSM
        return normalised_heights(dsm, self.ground.block(window.row_off, window.height, window.width))


def _read_edge_padded(src: DatasetReader, window: Window, read: Callable[[Window], np.ndarray]) -> np.ndarray:
    """read(window) of `src`, where the window may reach past its right or bottom edge: the part
    beyond repeats its last column or row (a height raster a few pixels short, _check_grid).

    Only the block's own rows are read. The derived ground model (heights.GroundModel) already keeps
    its edge values beyond the raster it was estimated from, so it needs no padding of its own.
    """
    if window.row_off + window.height <= src.height and window.col_off + window.width <= src.width:
        return read(window)
    rows = np.minimum(np.arange(window.row_off, window.row_off + window.height), src.height - 1)
    cols = np.minimum(np.arange(window.col_off, window.col_off + window.width), src.width - 1)
    inside = Window(int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1))
    return read(inside)[np.ix_(rows - rows[0], cols - cols[0])]


def _pixel_size_m(reference: DatasetReader, layout: DatasetLayout) -> float:
    """The orthophoto's pixel size in metres where its CRS says so, else the dataset's nominal one."""
    crs = reference.crs
    if crs is not None and crs.is_projected and crs.linear_units in ("metre", "meter"):
        return float(abs(reference.transform.a))
    return layout.pixel_size_m


# --------------------------------------------------------------------------------------
# Labels


def _write_label(
    src: DatasetReader,
    source: RasterSource,
    reference: DatasetReader,
    out: Path,
    tolerance: int,
    *,
    eroded: bool,
) -> int:
    """Decode a colour label block by block; returns the snapped pixel count.

    Only the eroded label may hold boundary black. Colours outside the legend are counted over
    the whole file before raising, so the error gives true totals rather than the first block's.
    """
    snapped = 0
    unknown: Counter[tuple[int, int, int]] = Counter()

    def decode(window: Window) -> np.ndarray:
        nonlocal snapped
        with _reading(source):
            rgb = np.moveaxis(src.read([1, 2, 3], window=window), 0, -1)
        decoded = decode_colours(rgb, allow_boundary=eroded, tolerance=tolerance)
        snapped += decoded.snapped
        unknown.update(decoded.unknown)
        return decoded.index[np.newaxis]

    _write_blocks(out, reference, None, np.uint8, decode, colormap=True)
    if unknown:
        raise unknown_colour_error(str(source), dict(unknown), allow_boundary=eroded, tolerance=tolerance)
    return snapped


# --------------------------------------------------------------------------------------
# Writing


def row_windows(height: int, width: int, rows: int | None = None) -> Iterator[Window]:
    """Full-width windows of `rows` rows (BLOCK_ROWS by default) from the top down."""
    rows = rows or BLOCK_ROWS
    for row in range(0, height, rows):
        yield Window(0, row, width, min(rows, height - row))


def _write_blocks(
    path: Path,
    reference: DatasetReader,
    band_names: tuple[str, ...] | None,
    dtype: type,
    read_block: Callable[[Window], np.ndarray],
    *,
    colormap: bool = False,
) -> None:
    """Write a GeoTIFF on `reference`'s grid (raster.geotiff_writer, fast deflate), filled with
    read_block(window) row block by row block; `colormap`: a class map with the ISPRS colours."""
    with geotiff_writer(
        path,
        height=reference.height,
        width=reference.width,
        count=len(band_names) if band_names else 1,
        dtype=dtype,
        georef=GeoReference.of(reference),
        band_names=band_names,
        class_map=colormap,
        deflate_level=FAST_DEFLATE_LEVEL,
    ) as out:
        for window in row_windows(reference.height, reference.width):
            out.add(read_block(window))
