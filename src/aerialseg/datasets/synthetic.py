"""Procedural Vaihingen-like scenes, written exactly like the extracted ISPRS Vaihingen folders.

The pipeline must run end to end without the (licence-restricted) real data, so this module
draws small suburban scenes - roads, houses, gardens, trees, parked cars and odd clutter -
and writes them in the official layout:

    top/top_mosaic_09cm_area<N>.tif                                  IRRG, 3 x uint8
    dsm/dsm_09cm_matching_area<N>.tif                                surface height, float32 m
    gts_for_participants/top_mosaic_09cm_area<N>.tif                 full ground truth, RGB
    gts_eroded_for_participants/top_mosaic_09cm_area<N>_noBoundary.tif  eroded ground truth

The scenes are meant to be learnable the way real ones are: every class is separable from
IRRG + DSM + context, but not from one pixel's colour alone (texture, shadows, illumination
drift and overlapping palettes - grey roofs vs. asphalt, dry grass vs. paving, trees vs. lawn).

Everything is vectorised numpy; each object touches only its bounding window of the tile.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from affine import Affine
from rasterio.crs import CRS
from scipy import ndimage

from aerialseg.classes import CLASSES, IGNORE_INDEX, index_to_colours
from aerialseg.config import SyntheticConfig
from aerialseg.files import atomic_path
from aerialseg.raster import GeoReference, write_raster

_INDEX = {c.name: c.index for c in CLASSES}
IMPERVIOUS = _INDEX["impervious_surfaces"]
BUILDING = _INDEX["building"]
LOW_VEGETATION = _INDEX["low_vegetation"]
TREE = _INDEX["tree"]
CAR = _INDEX["car"]
CLUTTER = _INDEX["clutter"]

PIXEL_SIZE_M = 0.09
"""Ground sampling distance of the Vaihingen true orthophoto."""
VAIHINGEN_CRS = CRS.from_epsg(32632)
"""WGS 84 / UTM zone 32N, where Vaihingen an der Enz lies."""
REFERENCE_SIZE_PX = 512
"""Tile side at which objects have their true 9 cm size; smaller tiles shrink them."""
ERODE_RADIUS_PX = 3
"""Radius of the disk the official eroded ground truth was made with."""
MIN_SIZE_PX = 64

TOP_DIR = "top"
DSM_DIR = "dsm"
GTS_DIR = "gts_for_participants"
GTS_ERODED_DIR = "gts_eroded_for_participants"


def vaihingen_files(root: Path, area: int) -> dict[str, Path]:
    """The four files of one area in the official layout, keyed top / dsm / gts / gts_eroded."""
    return {
        "top": root / TOP_DIR / f"top_mosaic_09cm_area{area}.tif",
        "dsm": root / DSM_DIR / f"dsm_09cm_matching_area{area}.tif",
        "gts": root / GTS_DIR / f"top_mosaic_09cm_area{area}.tif",
        "gts_eroded": root / GTS_ERODED_DIR / f"top_mosaic_09cm_area{area}_noBoundary.tif",
    }


@dataclass(frozen=True)
class Scene:
    """One synthetic tile: what the sensor saw and what it is."""

    irrg: np.ndarray
    """(3, H, W) uint8 false-colour image, bands IR, R, G."""
    dsm: np.ndarray
    """(H, W) float32 surface height in metres."""
    label: np.ndarray
    """(H, W) uint8 class index 0..5; no ignore pixels."""


# --------------------------------------------------------------------------------------
# Public API


def generate_scene(size: int, rng: np.random.Generator) -> Scene:
    """Draw one square Vaihingen-like scene of `size` x `size` pixels from `rng`.

    Deterministic: the same generator state gives the same scene. Below REFERENCE_SIZE_PX
    objects shrink with the tile so that small test tiles still hold every main class;
    above it they keep their true size and the tile holds more of them.
    """
    if size < MIN_SIZE_PX:
        raise ValueError(f"synthetic scenes need at least {MIN_SIZE_PX} px a side, got {size}")
    return _SceneBuilder(size, rng).build()


def erode_label(label: np.ndarray, radius: int = ERODE_RADIUS_PX) -> np.ndarray:
    """Copy of `label` with IGNORE_INDEX on every pixel within `radius` px of another class.

    This is how the official `*_noBoundary` ground truth was made (disk of radius 3): the
    band where annotators cannot be exact is left out of training and scoring.
    """
    if label.ndim != 2:
        raise ValueError(f"expected an (H, W) label, got shape {label.shape}")
    if radius < 0:
        raise ValueError(f"erosion radius must be >= 0, got {radius}")
    eroded = label.astype(np.uint8, copy=True)
    if radius == 0:
        return eroded
    offsets = np.arange(-radius, radius + 1)
    disk = offsets[:, None] ** 2 + offsets[None, :] ** 2 <= radius**2
    # A pixel is boundary exactly when its disk holds two different values, i.e. max != min.
    # mode="nearest" pads with edge pixels, which are closer to the centre than the padding
    # itself, so the border adds no value that is not already inside the disk in the tile.
    highest = ndimage.maximum_filter(label, footprint=disk, mode="nearest")
    lowest = ndimage.minimum_filter(label, footprint=disk, mode="nearest")
    eroded[highest != lowest] = IGNORE_INDEX
    return eroded


def area_georeference(area: int, size: int) -> GeoReference:
    """Where area `area` lies: 9 cm pixels in UTM 32N, areas side by side around Vaihingen."""
    # Areas on a 4-wide grid with a gap between them, so no two tiles overlap on the ground.
    spacing = math.ceil((size * PIXEL_SIZE_M + 30.0) / 10.0) * 10.0
    column, row = (area - 1) % 4, (area - 1) // 4
    x0 = 496_200.0 + column * spacing
    y0 = 5_421_800.0 - row * spacing
    return GeoReference(VAIHINGEN_CRS, Affine(PIXEL_SIZE_M, 0.0, x0, 0.0, -PIXEL_SIZE_M, y0))


def write_vaihingen_layout(
    out_dir: Path, cfg: SyntheticConfig, *, erode_radius: int = ERODE_RADIUS_PX
) -> list[int]:
    """Write areas 1..cfg.tiles in the official Vaihingen layout under `out_dir`.

    The whole folder is built under a temporary name and renamed at the end, so a crash
    never leaves a half layout (and an existing `out_dir` is replaced only on success).
    Each area draws from its own generator seeded with (cfg.seed, area), so a tile does not
    change when the tile count does. Returns the area numbers written.
    """
    if cfg.seed < 0:
        raise ValueError(f"synthetic.seed must be >= 0 (numpy seeds are unsigned), got {cfg.seed}")
    areas = list(range(1, cfg.tiles + 1))
    with atomic_path(Path(out_dir)) as tmp:
        tmp.mkdir()
        for area in areas:
            scene = generate_scene(cfg.size_px, np.random.default_rng([cfg.seed, area]))
            georef = area_georeference(area, cfg.size_px)
            files = vaihingen_files(tmp, area)
            full_gt = index_to_colours(scene.label).transpose(2, 0, 1)
            eroded_gt = index_to_colours(erode_label(scene.label, erode_radius)).transpose(2, 0, 1)
            write_raster(files["top"], scene.irrg, georef, band_names=["ir", "r", "g"])
            write_raster(files["dsm"], scene.dsm, georef, band_names=["dsm"])
            write_raster(files["gts"], full_gt, georef, band_names=["red", "green", "blue"])
            write_raster(files["gts_eroded"], eroded_gt, georef, band_names=["red", "green", "blue"])
    return areas


# --------------------------------------------------------------------------------------
# Geometry and noise helpers

_RectSpec = tuple[tuple[float, float], float, float, float]
"""An oriented rectangle as (centre (row, col), half length, half width, angle in rad)."""


@dataclass(frozen=True)
class _Stamp:
    """An object's footprint: the window of the tile it touches and its pixels there.

    `u` runs along the object's long axis and `v` across it, in pixels from its centre, so
    shapes (roof ridges, car windows, lane markings) can be drawn in the object's own frame.
    """

    window: tuple[slice, slice]
    mask: np.ndarray
    u: np.ndarray
    v: np.ndarray

    @property
    def area(self) -> int:
        return int(self.mask.sum())


def _oriented_rect(
    shape: tuple[int, int],
    centre: tuple[float, float],
    half_length: float,
    half_width: float,
    angle: float,
) -> _Stamp | None:
    """Rectangle centred at (row, col), long axis at `angle` rad from the column axis.

    None when it misses the tile.
    """
    row0, col0 = centre
    cos, sin = math.cos(angle), math.sin(angle)
    extent_row = abs(sin) * half_length + abs(cos) * half_width
    extent_col = abs(cos) * half_length + abs(sin) * half_width
    r0, r1 = max(0, math.floor(row0 - extent_row)), min(shape[0], math.ceil(row0 + extent_row) + 1)
    c0, c1 = max(0, math.floor(col0 - extent_col)), min(shape[1], math.ceil(col0 + extent_col) + 1)
    if r0 >= r1 or c0 >= c1:
        return None
    rows = np.arange(r0, r1, dtype=np.float32)[:, None] - np.float32(row0)
    cols = np.arange(c0, c1, dtype=np.float32)[None, :] - np.float32(col0)
    u = cols * np.float32(cos) + rows * np.float32(sin)
    v = rows * np.float32(cos) - cols * np.float32(sin)
    mask = (np.abs(u) <= half_length) & (np.abs(v) <= half_width)
    if not mask.any():
        return None
    return _Stamp((slice(r0, r1), slice(c0, c1)), mask, u, v)


def _disc(shape: tuple[int, int], centre: tuple[float, float], radius: float) -> _Stamp | None:
    """Disc of `radius` px; u and v are the column and row offsets from its centre."""
    square = _oriented_rect(shape, centre, radius, radius, 0.0)
    if square is None:
        return None
    mask = square.u**2 + square.v**2 <= radius**2
    return _Stamp(square.window, mask, square.u, square.v) if mask.any() else None


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], feature_px: float) -> np.ndarray:
    """Zero-mean, unit-std noise whose blobs are about `feature_px` wide."""
    if feature_px <= 2.0:
        field = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma=feature_px / 2.0)
    else:
        # Large features: cubic B-spline upsampling of coarse noise, done as two small matrix
        # products - far cheaper than a wide Gaussian blur or ndimage.zoom.
        rows = _bspline_upsampler(shape[0], feature_px)
        cols = _bspline_upsampler(shape[1], feature_px)
        coarse = rng.standard_normal((rows.shape[1], cols.shape[1]), dtype=np.float32)
        field = rows @ coarse @ cols.T
    field = field - field.mean()
    return (field / max(float(field.std()), 1e-6)).astype(np.float32)


def _bspline_upsampler(n_out: int, feature_px: float) -> np.ndarray:
    """(n_out, n_coarse) weights interpolating a coarse grid with knots `feature_px` apart."""
    n_coarse = math.ceil(n_out / feature_px) + 3
    # Offset by one knot so every output sample has its four supporting knots on the grid.
    position = np.arange(n_out, dtype=np.float32) / np.float32(feature_px) + 1.0
    t = np.abs(position[:, None] - np.arange(n_coarse, dtype=np.float32)[None, :])
    near = (2.0 / 3.0) - t**2 + 0.5 * t**3
    far = (2.0 - t) ** 3 / 6.0
    return np.where(t < 1.0, near, np.where(t < 2.0, far, 0.0)).astype(np.float32)


def _shifted(array: np.ndarray, d_row: int, d_col: int, fill: float) -> np.ndarray:
    """out[r, c] = array[r + d_row, c + d_col], `fill` where that falls outside."""
    out = np.full_like(array, fill)
    h, w = array.shape
    if abs(d_row) >= h or abs(d_col) >= w:
        return out
    src_rows = slice(max(d_row, 0), h + min(d_row, 0))
    dst_rows = slice(max(-d_row, 0), h + min(-d_row, 0))
    src_cols = slice(max(d_col, 0), w + min(d_col, 0))
    dst_cols = slice(max(-d_col, 0), w + min(-d_col, 0))
    out[dst_rows, dst_cols] = array[src_rows, src_cols]
    return out


# --------------------------------------------------------------------------------------
# Palettes, as (IR, R, G). Vegetation reflects strongly in the near infrared, so in IRRG it
# looks red; man-made surfaces have IR close to R and G. Palettes deliberately overlap across
# classes (grey roofs / asphalt / silver cars, brown roofs / dry grass / clutter).

_ROOF_COLOURS = np.array(
    [
        [142, 104, 92],  # red clay tiles
        [130, 90, 82],  # darker red tiles
        [128, 104, 86],  # brown tiles
        [132, 130, 134],  # grey concrete tiles
        [96, 94, 100],  # dark slate
        [172, 170, 174],  # light flat roof
    ],
    dtype=np.float32,
)
_CAR_COLOURS = np.array(
    [
        [215, 214, 216],  # white
        [44, 42, 46],  # black
        [160, 158, 164],  # silver
        [150, 172, 58],  # red paint (IR-bright, low green)
        [64, 42, 58],  # dark blue
        [118, 112, 108],  # grey
    ],
    dtype=np.float32,
)
_CLUTTER_COLOURS = np.array(
    [
        [52, 52, 58],  # dark container / bin
        [92, 118, 168],  # blue tarp
        [226, 212, 150],  # pale material heap
        [116, 138, 70],  # odd greenish plastic
        [150, 112, 96],  # timber stack
    ],
    dtype=np.float32,
)


# --------------------------------------------------------------------------------------
# Scene builder


class _SceneBuilder:
    """Paints one scene object by object into label, height and colour arrays.

    Order matters and mirrors how the ISPRS annotators resolved overlaps: roads, buildings,
    paved yards, then trees, whose crowns overhang lawns and pavement (but not roofs), then
    cars and clutter on whatever pavement and lawn stays visible.
    """

    def __init__(self, size: int, rng: np.random.Generator) -> None:
        self.size = size
        self.shape = (size, size)
        self.rng = rng
        # Objects shrink with small tiles (so a 128 px tile still holds every main class) but
        # never grow past true scale; bigger tiles get more objects instead.
        self.scale = min(1.0, size / REFERENCE_SIZE_PX)
        self.metres_per_px = PIXEL_SIZE_M / self.scale
        self.count_factor = max(1.0, (size / REFERENCE_SIZE_PX) ** 2)
        # Vaihingen streets run in a few directions; one grid angle per tile keeps roads,
        # houses and parked cars aligned with each other like a real street block.
        self.grid_angle = 0.0 if rng.random() < 0.5 else float(rng.uniform(0.0, math.pi / 2))
        sun_azimuth = math.radians(rng.uniform(110.0, 250.0))  # clockwise from north
        self.sun_elevation = math.radians(rng.uniform(35.0, 60.0))
        # Unit vector towards the sun in (row, col): north is -row, east is +col.
        self.sun_dir = (-math.cos(sun_azimuth), math.sin(sun_azimuth))

        self.label = np.full(self.shape, LOW_VEGETATION, dtype=np.uint8)
        self.height = np.zeros(self.shape, dtype=np.float32)  # above the ground surface
        self.colour = np.empty((3, *self.shape), dtype=np.float32)
        self.colour[:] = self._jitter(np.array([188.0, 102.0, 112.0]), 8.0)[:, None, None]
        self.ground = self._ground()
        # Where a new house may not go: roads plus a setback, houses plus a gap.
        self.blocked = np.zeros(self.shape, dtype=bool)
        # For impervious pixels, which street direction (0 or 1) they belong to; -1 = yard.
        self.direction = np.full(self.shape, -1, dtype=np.int8)
        self.house_parts: list[_RectSpec] = []

    # -- helpers ---------------------------------------------------------------------

    def px(self, metres: float) -> float:
        return metres / self.metres_per_px

    def _count(self, low: int, high: int) -> int:
        """Object count drawn from [low, high], scaled up on tiles larger than the reference."""
        return round(int(self.rng.integers(low, high + 1)) * self.count_factor)

    def _jitter(self, colour: np.ndarray, spread: float) -> np.ndarray:
        return (colour + self.rng.normal(0.0, spread, size=3)).astype(np.float32)

    def _paint(self, stamp: _Stamp, mask: np.ndarray, cls: int, colour: np.ndarray) -> None:
        window = stamp.window
        self.label[window][mask] = cls
        self.colour[(slice(None), *window)][:, mask] = colour[:, None]

    def _random_pixel(self, candidates: np.ndarray) -> tuple[int, int] | None:
        flat = np.flatnonzero(candidates)
        if flat.size == 0:
            return None
        row, col = divmod(int(flat[self.rng.integers(flat.size)]), self.size)
        return row, col

    # -- scene parts -----------------------------------------------------------------

    def build(self) -> Scene:
        self._add_roads()
        self._add_buildings()
        self._add_yards()
        self._add_trees()
        self._add_cars()
        self._add_clutter()
        dsm = self._finish_dsm()
        irrg = self._render()
        return Scene(irrg=irrg, dsm=dsm, label=self.label.copy())

    def _ground(self) -> np.ndarray:
        """Terrain: 250-270 m, a gentle slope of up to 3 % and soft undulation."""
        base = self.rng.uniform(252.0, 266.0)
        slope_row, slope_col = self.rng.uniform(-0.03, 0.03, size=2)
        rows = np.arange(self.size, dtype=np.float32)[:, None] - self.size / 2
        cols = np.arange(self.size, dtype=np.float32)[None, :] - self.size / 2
        plane = (slope_row * rows + slope_col * cols) * self.metres_per_px
        undulation = 0.35 * _smooth_noise(self.rng, self.shape, self.px(15.0))
        return (base + plane + undulation).astype(np.float32)

    def _add_roads(self) -> None:
        """A few straight streets, 4-8 m wide, crossing the tile in the two grid directions."""
        n_roads = max(1, self._count(1, 3))
        placed: list[tuple[int, float, float]] = []  # (direction, offset, width)
        for i in range(n_roads):
            direction = i % 2 if self.rng.random() < 0.7 else int(self.rng.integers(2))
            width = self.px(self.rng.uniform(4.0, 8.0))
            # The first street passes near the centre so every tile has one well inside.
            reach = 0.25 if i == 0 else 0.45
            offset = self.rng.uniform(-reach, reach) * self.size
            too_close = any(
                d == direction and abs(o - offset) < (w + width) / 2 + self.px(12.0) for d, o, w in placed
            )
            if too_close:
                continue
            placed.append((direction, offset, width))
            angle = self.grid_angle + direction * math.pi / 2
            # Centre line through the tile centre, moved `offset` px along its normal.
            centre = (
                self.size / 2 + offset * math.cos(angle),
                self.size / 2 - offset * math.sin(angle),
            )
            road = _oriented_rect(self.shape, centre, 2.0 * self.size, width / 2, angle)
            if road is None:
                continue
            grey = self.rng.uniform(92.0, 140.0)
            asphalt = self._jitter(np.array([grey + 4.0, grey, grey + 2.0]), 3.0)
            self._paint(road, road.mask, IMPERVIOUS, asphalt)
            self.direction[road.window][road.mask] = direction
            if self.rng.random() < 0.6:
                # Dashed centre line: thin, bright, still impervious surface.
                dash = self.px(3.0)
                line = (np.abs(road.v) <= max(0.6, self.px(0.08))) & ((road.u % (2 * dash)) < dash)
                self._paint(road, road.mask & line, IMPERVIOUS, np.full(3, 215.0, np.float32))
            setback = _oriented_rect(self.shape, centre, 2.0 * self.size, width / 2 + self.px(1.5), angle)
            if setback is not None:
                self.blocked[setback.window] |= setback.mask

    def _house_fits(self, parts: list[_Stamp | None], full_areas: list[float]) -> bool:
        for part, full_area in zip(parts, full_areas, strict=True):
            # Houses may be cut by the tile edge, but not down to a sliver.
            if part is None or part.area < 0.4 * full_area:
                return False
            if self.blocked[part.window][part.mask].any():
                return False
        return True

    def _add_buildings(self) -> None:
        """Rectangular and L-shaped houses with gable, hip or flat roofs, 3-15 m high."""
        target = max(1, self._count(3, 6))
        max_building_px = 0.4 * self.size * self.size
        building_px = 0
        shrink = 1.0
        placed = 0
        for attempt in range(80 * target):
            if placed >= target:
                break
            if attempt and attempt % 25 == 0:
                shrink *= 0.8  # crowded tile: try smaller houses
            length = max(8.0, self.px(self.rng.uniform(9.0, 22.0)) * shrink)
            width = max(7.0, min(length, self.px(self.rng.uniform(7.0, 13.0)) * shrink))
            centre = (self.rng.uniform(0, self.size), self.rng.uniform(0, self.size))
            angle = self.grid_angle + int(self.rng.integers(2)) * math.pi / 2
            specs = [(centre, length / 2, width / 2, angle)]
            if self.rng.random() < 0.35:
                specs.append(self._wing(centre, length / 2, width / 2, angle))
            parts = [_oriented_rect(self.shape, *spec) for spec in specs]
            full_areas = [4.0 * hl * hw for _, hl, hw, _ in specs]
            if not self._house_fits(parts, full_areas):
                continue
            footprint = sum(p.area for p in parts if p is not None)
            if placed and building_px + footprint > max_building_px:
                continue
            self._build_house(specs)
            building_px += footprint
            placed += 1
        if placed == 0:
            self._build_house([self._fallback_house_spec()])

    def _wing(
        self, centre: tuple[float, float], half_length: float, half_width: float, angle: float
    ) -> _RectSpec:
        """A perpendicular wing at one end of the main block, making an L-shaped house."""
        wing_half_width = half_width * self.rng.uniform(0.6, 0.9)
        wing_half_length = half_width * self.rng.uniform(1.2, 2.0)
        along = self.rng.choice([-1.0, 1.0]) * (half_length - wing_half_width)
        across = self.rng.choice([-1.0, 1.0]) * (half_width + wing_half_length - half_width * 0.9)
        cos, sin = math.cos(angle), math.sin(angle)
        wing_centre = (
            centre[0] + along * sin + across * cos,
            centre[1] + along * cos - across * sin,
        )
        return wing_centre, wing_half_length, wing_half_width, angle + math.pi / 2

    def _fallback_house_spec(self) -> _RectSpec:
        """The largest square house that fits the free space (only for very crowded tiles)."""
        room = ndimage.distance_transform_cdt(~self.blocked, metric="chessboard")
        row, col = np.unravel_index(int(np.argmax(room)), room.shape)
        half = max(3.0, min(float(room[row, col]) - 1.0, self.px(6.0)))
        return (float(row), float(col)), half, half, self.grid_angle

    def _build_house(self, specs: list[_RectSpec]) -> None:
        row, col = (min(max(int(c), 0), self.size - 1) for c in specs[0][0])
        # One floor level for the whole house, taken where it stands.
        floor = float(self.ground[row, col])
        eave = self.rng.uniform(3.0, 10.0)
        rise = self.rng.uniform(1.0, min(5.0, 15.0 - eave))
        roof_kind = self.rng.choice(["gable", "gable", "hip", "flat"])
        roof_colour = self._jitter(_ROOF_COLOURS[self.rng.integers(len(_ROOF_COLOURS))], 6.0)
        for spec in specs:
            part = _oriented_rect(self.shape, *spec)
            if part is None:
                continue
            _, half_length, half_width, _ = spec
            across = np.clip(1.0 - np.abs(part.v) / half_width, 0.0, 1.0)
            if roof_kind == "gable":
                roof = rise * across
            elif roof_kind == "hip":
                along = np.clip((half_length - np.abs(part.u)) / half_width, 0.0, 1.0)
                roof = rise * np.minimum(across, along)
            else:
                roof = np.zeros_like(across)
            roof_height = floor + eave + roof - self.ground[part.window]
            # Wing and main block share eaves; where they overlap the higher ridge wins.
            current = self.height[part.window]
            current[part.mask] = np.where(
                self.label[part.window][part.mask] == BUILDING,
                np.maximum(current[part.mask], roof_height[part.mask]),
                roof_height[part.mask],
            )
            self._paint(part, part.mask, BUILDING, roof_colour)
            centre, _, _, angle = spec
            gap = _oriented_rect(
                self.shape, centre, half_length + self.px(2.5), half_width + self.px(2.5), angle
            )
            if gap is not None:
                self.blocked[gap.window] |= gap.mask
            self.house_parts.append(spec)

    def _add_yards(self) -> None:
        """Paved courtyards and driveways around most houses (impervious, not building)."""
        for centre, half_length, half_width, angle in self.house_parts:
            if self.rng.random() > 0.7:
                continue
            margin = self.px(self.rng.uniform(1.0, 3.5))
            yard = _oriented_rect(self.shape, centre, half_length + margin, half_width + margin, angle)
            if yard is None:
                continue
            lawn = yard.mask & (self.label[yard.window] == LOW_VEGETATION)
            grey = self.rng.uniform(135.0, 180.0)
            paving = self._jitter(np.array([grey + 3.0, grey, grey - 2.0]), 4.0)
            self._paint(yard, lawn, IMPERVIOUS, paving)

    def _add_cars(self) -> None:
        """Cars (about 4.5 x 1.8 m, never under 8 x 4 px) parked on streets and yards."""
        half_length = max(4.0, self.px(4.5) / 2)
        half_width = max(2.0, self.px(1.8) / 2)
        full_area = 4.0 * half_length * half_width
        target = max(1, self._count(2, 6))
        # A car must stand wholly on pavement, clear of the other cars.
        forbidden = self.label != IMPERVIOUS
        placed = 0
        for _ in range(60 * target):
            if placed >= target:
                break
            spot = self._random_pixel(~forbidden)
            if spot is None:
                break
            direction = int(self.direction[spot])
            if direction < 0:
                direction = int(self.rng.integers(2))
            angle = self.grid_angle + direction * math.pi / 2 + self.rng.normal(0.0, 0.04)
            car = _oriented_rect(self.shape, spot, half_length, half_width, angle)
            if car is None or car.area < 0.6 * full_area or forbidden[car.window][car.mask].any():
                continue
            colour = self._jitter(_CAR_COLOURS[self.rng.integers(len(_CAR_COLOURS))], 6.0)
            self._paint(car, car.mask, CAR, colour)
            # Windscreen and rear window: dark glass bands across the cabin.
            along = car.u / half_length * (1.0 if self.rng.random() < 0.5 else -1.0)
            glass = car.mask & (((along > 0.15) & (along < 0.42)) | ((along < -0.4) & (along > -0.6)))
            self.colour[(slice(None), *car.window)][:, glass] *= 0.35
            cabin = np.abs(along) < 0.5
            self.height[car.window][car.mask] = np.where(cabin, 1.5, 0.95)[car.mask]
            gap = _oriented_rect(
                self.shape, spot, half_length + self.px(0.5), half_width + self.px(0.4), angle
            )
            if gap is not None:
                forbidden[gap.window] |= gap.mask
            placed += 1

    def _add_clutter(self) -> None:
        """A few small irregular odd objects (bins, heaps, tarps), under 2 % of the tile."""
        max_clutter_px = 0.015 * self.size * self.size
        clutter_px = 0
        free = (self.label == LOW_VEGETATION) | (self.label == IMPERVIOUS)
        for _ in range(int(self.rng.poisson(2.5 * self.count_factor))):
            spot = self._random_pixel(free)
            if spot is None:
                break
            radius = max(3.0, self.px(self.rng.uniform(0.6, 1.6)))
            square = _oriented_rect(self.shape, spot, 1.6 * radius, 1.6 * radius, 0.0)
            if square is None:
                continue
            # Irregular outline: a disc whose radius wobbles with smooth noise.
            wobble = _smooth_noise(self.rng, square.mask.shape, max(1.0, radius / 2))
            stretch = self.rng.uniform(0.6, 1.0)
            distance = np.hypot(square.u * stretch, square.v)
            blob = (distance <= radius * (1.0 + 0.3 * wobble)) & free[square.window]
            if not blob.any() or clutter_px + blob.sum() > max_clutter_px:
                continue
            colour = self._jitter(_CLUTTER_COLOURS[self.rng.integers(len(_CLUTTER_COLOURS))], 10.0)
            self._paint(square, blob, CLUTTER, colour)
            self.height[square.window][blob] = self.rng.uniform(0.3, 2.0) + 0.15 * wobble[blob]
            free[square.window] &= ~blob
            clutter_px += int(blob.sum())

    def _add_trees(self) -> None:
        """Clumps of round crowns, 4-15 m high, over lawns and overhanging the streets."""
        max_tree_px = 0.3 * self.size * self.size
        n_clumps = max(1, self._count(2, 5))
        overwritable = np.isin(self.label, [LOW_VEGETATION, IMPERVIOUS])
        tree_px = 0
        for _ in range(n_clumps):
            # Trees stand in gardens; their crowns may spread over pavement.
            spot = self._random_pixel(self.label == LOW_VEGETATION)
            if spot is None:
                spot = self._random_pixel(overwritable)
            if spot is None:
                return
            top = self.rng.uniform(4.0, 15.0)
            crown = self.px(self.rng.uniform(2.5, 6.0))
            colour = self._jitter(np.array([194.0, 96.0, 106.0]), 8.0)
            for _ in range(int(self.rng.integers(2, 7))):
                if tree_px > max_tree_px:
                    return
                radius = max(4.0, crown * self.rng.uniform(0.7, 1.2))
                offset = self.rng.normal(0.0, 0.7 * crown, size=2)
                disc = _disc(self.shape, (spot[0] + offset[0], spot[1] + offset[1]), radius)
                if disc is None:
                    continue
                fall_off = np.sqrt(np.clip(1.0 - (disc.u**2 + disc.v**2) / radius**2, 0.0, 1.0))
                canopy = top * self.rng.uniform(0.85, 1.0) * (0.55 + 0.45 * fall_off)
                already_tree = self.label[disc.window] == TREE
                crown_px = disc.mask & (overwritable[disc.window] | already_tree)
                tree_px += int((crown_px & ~already_tree).sum())
                heights = self.height[disc.window]
                heights[crown_px] = np.maximum(heights[crown_px], canopy[crown_px])
                self._paint(disc, crown_px, TREE, colour)

    # -- final rasters ---------------------------------------------------------------

    def _finish_dsm(self) -> np.ndarray:
        is_lawn = self.label == LOW_VEGETATION
        is_tree = self.label == TREE
        # Grass and low shrubs: a few decimetres of bumpy height above the terrain.
        shrubs = np.clip(_smooth_noise(self.rng, self.shape, self.px(1.5)), 0.0, None)
        self.height[is_lawn] = 0.08 + 0.3 * shrubs[is_lawn]
        # Crowns are rough: individual branches poke out of the dome.
        roughness = _smooth_noise(self.rng, self.shape, self.px(0.6))
        self.height[is_tree] += 0.3 * roughness[is_tree]
        # Dense image matching blurs height edges over a pixel or so and adds noise.
        surface = ndimage.gaussian_filter(self.ground + self.height, sigma=0.8)
        noise = 0.05 * self.rng.standard_normal(self.shape, dtype=np.float32)
        return (surface + noise).astype(np.float32)

    def _shadow(self) -> np.ndarray:
        """Where objects block the sun: 1 in light, about 0.55 in shadow (sky light remains)."""
        tan_elevation = math.tan(self.sun_elevation)
        longest_px = self.px(float(self.height.max()) / tan_elevation)
        # Rays rise this many metres per pixel travelled towards the sun.
        rise_per_px = tan_elevation * self.metres_per_px
        step = max(1.0, longest_px / 48.0)
        blocker = np.full(self.shape, -np.inf, dtype=np.float32)
        distance = step
        while distance <= longest_px:
            d_row = round(self.sun_dir[0] * distance)
            d_col = round(self.sun_dir[1] * distance)
            ahead = _shifted(self.height, d_row, d_col, fill=0.0)
            np.maximum(blocker, ahead - distance * rise_per_px, out=blocker)
            distance += step
        in_shadow = (blocker > self.height + 0.3).astype(np.float32)
        softened = ndimage.gaussian_filter(in_shadow, sigma=0.8)
        return 1.0 - 0.45 * softened

    def _relief_shading(self) -> np.ndarray:
        """Lambertian shading of roofs, crowns and cars; 1 on flat ground."""
        grad_row, grad_col = np.gradient(ndimage.gaussian_filter(self.height, sigma=1.0), self.metres_per_px)
        cos_el, sin_el = math.cos(self.sun_elevation), math.sin(self.sun_elevation)
        facing = (
            -grad_row * cos_el * self.sun_dir[0] - grad_col * cos_el * self.sun_dir[1] + sin_el
        ) / np.sqrt(1.0 + grad_row**2 + grad_col**2)
        shade = np.clip(facing / sin_el, 0.5, 1.35)
        raised = np.isin(self.label, [BUILDING, TREE, CAR])
        return np.where(raised, shade, 1.0).astype(np.float32)

    def _render(self) -> np.ndarray:
        rng = self.rng
        grain = _smooth_noise(rng, self.shape, 1.0)  # blades, tiles, gravel
        patches = _smooth_noise(rng, self.shape, self.px(1.5))  # metre-scale wear and mottling
        lawn_wear = _smooth_noise(rng, self.shape, self.px(6.0))  # dry lawn patches
        leaves = _smooth_noise(rng, self.shape, self.px(0.5))
        label = self.label
        is_lawn = label == LOW_VEGETATION

        # Texture per class, applied as whole-tile fields (cheaper than masked fancy indexing).
        lawn_mottle = np.where(is_lawn, 10.0 * patches + 6.0 * grain, 0.0)
        colour = self.colour + lawn_mottle[None] * np.array([1.0, 0.6, 0.6], np.float32)[:, None, None]
        # Dry, worn grass loses its IR brightness and drifts towards paving and brown roofs.
        dryness = np.where(is_lawn, np.clip((lawn_wear - 0.5) * 0.8, 0.0, 0.75), 0.0)[None]
        dry = np.array([142.0, 124.0, 112.0], np.float32)[:, None, None]
        colour = colour * (1.0 - dryness) + dry * dryness

        # Gaps between leaves and branches show as dark speckle inside the crowns.
        foliage = (1.0 + 0.12 * leaves) * np.where(grain < -1.2, 0.65, 1.0)
        gain = np.select([label == TREE, label == BUILDING], [foliage, 1.0 + 0.05 * grain], default=1.0)
        offset = np.select(
            [label == IMPERVIOUS, label == CLUTTER], [5.0 * grain + 7.0 * patches, 12.0 * grain]
        )
        colour = colour * gain[None] + offset[None]

        # Mosaics differ in exposure and colour balance from tile to tile, and drift slowly
        # within a tile (vignetting, haze).
        exposure = rng.uniform(0.9, 1.1) * rng.uniform(0.96, 1.04, size=3).astype(np.float32)
        drift = 1.0 + 0.05 * _smooth_noise(rng, self.shape, self.px(20.0))
        light = self._shadow() * self._relief_shading() * drift
        image = colour * light[None] * exposure[:, None, None]
        image += 2.5 * rng.standard_normal(image.shape, dtype=np.float32)
        return np.clip(np.rint(image), 0, 255).astype(np.uint8)
