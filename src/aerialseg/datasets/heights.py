"""Heights for the model: the DSM relative to the tile's ground, and an nDSM (height above terrain).

Both are computed from a DSM that is read in row blocks, so that a 6000 x 6000 Potsdam DSM
never sits in memory at full resolution more than one block at a time.

`dsm` band: DSM minus the tile's DSM_GROUND_PERCENTILE. One number per tile, so the model sees
object heights plus the terrain's relief within the tile, not the absolute elevation that
varies between tiles.

`ndsm` band (when the archive has none): DSM minus a terrain model found by the progressive
morphological filter (PMF) of Zhang et al. 2003, "A progressive morphological filter for removing
nonground measurements from airborne LIDAR data", IEEE TGRS 41(4), 872-882, clipped at 0:

1. the DSM is cut into cells of about GROUND_CELL_M and each cell is reduced to its
   GROUND_CELL_PERCENTILE (the paper's grid of minimum elevations, made robust: isolated
   matching blunders below the surface do not drag it down as a plain minimum would);
2. the tile's overall slope is taken out: a plane is fitted to the cells, then refitted to the
   lower half of them (ground, not roofs), GROUND_PLANE_REFITS times, so that the filter sees only
   the terrain's departures from it; pits narrower than GROUND_PIT_CELLS cells are filled in
   those by a grey closing;
3. the PMF: grey-scale openings with square windows of w_k = 2 b^k + 1 cells (the paper's eq. 5,
   b = PMF_BASE), k = 0, 1, ..., and last the widest odd window within GROUND_MAX_WINDOW_M, each
   applied to the previous opening. A cell whose height drops by more than
   dh_k = s (w_k - w_k-1) c + dh_0 (eq. 7: dh_0 for the first window, never more than dh_max;
   s = PMF_SLOPE, dh_0 = PMF_INITIAL_THRESHOLD_M, dh_max = PMF_MAX_THRESHOLD_M, c the cell size)
   in one step is non-ground: an object vanishes by its full height in the step whose window is
   wider than it, while terrain of slope s or less loses at most what the slope gives over the
   window's growth. The openings use only windows that lie wholly inside the tile, so a building
   cut by the tile's edge goes once the window is wider than its part in the tile (padding would
   extend it past the edge, and one in a corner would never go); the cost is at the uphill edge,
   where every window is downhill of the cell, which step 2 takes care of for a steady slope;
4. the non-ground cells, grown by GROUND_BUFFER_CELLS, are filled from the ground cells on their
   rim: linear interpolation on a Delaunay triangulation (a TIN) of the rim, the nearest ground
   cell outside its convex hull; the plane of step 2 is added back;
5. the coarse ground is interpolated bilinearly back to full resolution, block by block.

So a building is found if it is narrower than GROUND_MAX_WINDOW_M in its narrower direction and
taller than the threshold of the step that removes it (at most dh_max); terrain whose slope,
after step 2, exceeds PMF_SLOPE may be cut and is then interpolated over, and the ground under a
large object is a plane through its rim (a terrace step under it is not seen).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from rasterio.enums import Resampling
from rasterio.io import DatasetReader
from rasterio.windows import Window
from scipy import ndimage
from scipy.interpolate import LinearNDInterpolator
from scipy.spatial import QhullError

DSM_GROUND_PERCENTILE = 1.0
"""The `dsm` band is height above this percentile of the tile's DSM."""
PERCENTILE_MAX_SAMPLES = 8_000_000
"""Larger DSMs (Potsdam: 36 M pixels) get their percentile from a decimated read (Vaihingen: exact)."""
GROUND_CELL_M = 0.5
"""Cell size c of the filter's grid, in metres (rounded to whole pixels). Zhang et al. 2003 grid
the lidar points at about the point spacing (1 m and finer); 0.5 m keeps walls sharp enough that
the ground cells next to a building stay ground, and a 6000 x 6000 Potsdam tile is 600 x 600 cells."""
GROUND_CELL_PERCENTILE = 10.0
"""Each cell's height: this percentile of its pixels (the paper takes the minimum point)."""
GROUND_PIT_CELLS = 3
"""The grey closing of step 2 fills pits up to this many cells less one wide (1 m at 0.5 m cells):
low matching blunders, which the openings would otherwise spread over a whole window next to the
tile's edges, where every window that holds a cell also holds the pit. Not in the paper (lidar
has fewer low outliers than image matching)."""
GROUND_PLANE_REFITS = 2
"""Refits of the terrain plane to the lower half of the cells (step 2 of the module docstring)."""
PMF_BASE = 2
"""b of Zhang et al. 2003, eq. 5: windows of 2 b^k + 1 cells (3, 5, 9, 17, 33, 65, 129 at b = 2),
growing exponentially, so few openings reach a wide window."""
GROUND_MAX_WINDOW_M = 65.0
"""The last (largest) window, in metres: it must exceed the widest building in its narrower
direction (Zhang et al. 2003 set the largest window from the size of the largest building).
65 m removes a roof up to about 64 m wide however long (a 60 m x 40 m roof goes with the window
after 32 m; a 100 m x 15 m hall with the one after 15 m). The last window is the widest odd
number of cells within it; the ones before it are 2 b^k + 1 cells, so at 0.5 m cells the windows
are 1.5, 2.5, 4.5, 8.5, 16.5, 32.5 and 64.5 m."""
PMF_SLOPE = 0.3
"""s of Zhang et al. 2003, eq. 7: the steepest terrain slope, after the plane of step 2 is taken out,
that is not cut as an object (0.3: a 3 m terrace riser over 10 m). Larger tolerates steeper
terrain and misses low wide buildings; it sets how fast the threshold grows with the window."""
PMF_INITIAL_THRESHOLD_M = 0.3
"""dh_0 of Zhang et al. 2003, eq. 7, in metres: the threshold of the first window (1.5 m), above
the noise of a matched DSM's 10th percentile per cell; cars and hedges exceed it."""
PMF_MAX_THRESHOLD_M = 2.5
"""dh_max of Zhang et al. 2003, eq. 7, in metres: the threshold never grows past it, so any object
at least this tall is non-ground once the window is wider than it (2.5 m is also PDAL's default
max_distance for filters.pmf)."""
GROUND_BUFFER_CELLS = 1
"""The non-ground cells grow by this many cells before they are filled (step 4): the foot of a
tree's crown is lower than the threshold of the step that removes the crown, and would otherwise
lift the ground interpolated under it. Not in the paper."""


def read_heights(dsm: DatasetReader, window: Window | None, fill: float) -> np.ndarray:
    """Band 1 of `dsm` as float32, with nodata and non-finite pixels set to `fill`."""
    heights = dsm.read(1, window=window, masked=True).astype(np.float32)
    filled = np.ma.filled(heights, np.float32(fill))
    filled[~np.isfinite(filled)] = fill
    return filled


def ground_level(dsm: DatasetReader, band: int = 1) -> float:
    """The DSM_GROUND_PERCENTILE of `band` (the heights) over its valid pixels, on a decimated read
    for large rasters: the tiles stage's ground level, and `aerialseg predict --units isprs`'s."""
    step = max(1, math.ceil(math.sqrt(dsm.height * dsm.width / PERCENTILE_MAX_SAMPLES)))
    shape = (max(1, dsm.height // step), max(1, dsm.width // step))
    sample = dsm.read(band, out_shape=shape, resampling=Resampling.nearest, masked=True)
    valid = sample.compressed()
    valid = valid[np.isfinite(valid)]
    if valid.size == 0:
        raise ValueError(f"{dsm.name}: the DSM (band {band}) has no valid height (every pixel is nodata)")
    return float(np.percentile(valid, DSM_GROUND_PERCENTILE))


@dataclass(frozen=True)
class GroundModel:
    """The terrain under a tile, on a coarse grid of `cell` x `cell` pixel cells."""

    grid: np.ndarray
    cell: int

    def block(self, row_off: int, rows: int, width: int) -> np.ndarray:
        """(rows, width) float32 ground heights of the full-resolution rows row_off..row_off+rows."""
        r0, r1, wr = _linear_weights(row_off, rows, self.cell, self.grid.shape[0])
        c0, c1, wc = _linear_weights(0, width, self.cell, self.grid.shape[1])
        by_row = self.grid[r0] * (1 - wr)[:, None] + self.grid[r1] * wr[:, None]
        return (by_row[:, c0] * (1 - wc) + by_row[:, c1] * wc).astype(np.float32)


def estimate_ground(dsm: DatasetReader, pixel_size_m: float, fill: float, block_rows: int) -> GroundModel:
    """The tile's terrain from its DSM (see the module docstring), reading `block_rows` at a time."""
    cell = max(1, round(GROUND_CELL_M / pixel_size_m))
    strip = cell * max(1, block_rows // cell)
    strips = (Window(0, row, dsm.width, min(strip, dsm.height - row)) for row in range(0, dsm.height, strip))
    cells = [_cell_percentiles(read_heights(dsm, window, fill), cell) for window in strips]
    coarse = np.concatenate(cells, axis=0).astype(np.float64)
    return GroundModel(ground_surface(coarse, cell * pixel_size_m).astype(np.float32), cell)


def ground_surface(coarse: np.ndarray, cell_m: float) -> np.ndarray:
    """The terrain under `coarse`, a grid of cell heights `cell_m` metres apart (steps 1-4)."""
    plane = _terrain_plane(coarse)
    # Pits are filled in the relief: a closing would raise a sloping plane's downhill edge.
    size = tuple(min(GROUND_PIT_CELLS, n) for n in coarse.shape)
    relief = ndimage.grey_closing(coarse - plane, size=size, mode="nearest")
    ground = ~progressive_morphological_filter(relief, cell_m)
    return _fill_non_ground(relief, ground) + plane


def pmf_windows(cell_m: float) -> list[tuple[int, float]]:
    """The PMF's (window in cells, elevation-difference threshold in metres), Zhang et al. eqs. 5, 7."""
    largest = max(3, 2 * math.floor((GROUND_MAX_WINDOW_M / cell_m - 1) / 2) + 1)  # odd, <= the maximum
    sizes = []
    k = 0
    while (size := 2 * PMF_BASE**k + 1) < largest:
        sizes.append(size)
        k += 1
    sizes.append(largest)
    thresholds = [
        min(PMF_SLOPE * (size - previous) * cell_m + PMF_INITIAL_THRESHOLD_M, PMF_MAX_THRESHOLD_M)
        if size > 3
        else PMF_INITIAL_THRESHOLD_M
        for previous, size in zip([1, *sizes], sizes, strict=False)
    ]
    return list(zip(sizes, thresholds, strict=True))


def progressive_morphological_filter(heights: np.ndarray, cell_m: float) -> np.ndarray:
    """True where a cell of `heights` is non-ground (step 3 of the module docstring)."""
    surface = heights.astype(np.float64)
    non_ground = np.zeros(heights.shape, dtype=bool)
    for size, threshold in pmf_windows(cell_m):
        # A window never wider than the grid (odd, so that it is centred); openings with it are
        # restricted to the tile: outside reads as -inf to the erosion and is ignored by the dilation.
        shape = tuple(min(size, n - (1 - n % 2)) for n in heights.shape)
        eroded = ndimage.minimum_filter(surface, size=shape, mode="constant", cval=-np.inf)
        opened = ndimage.maximum_filter(eroded, size=shape, mode="constant", cval=-np.inf)
        non_ground |= surface - opened > threshold
        surface = opened
    return non_ground


def normalised_heights(dsm_block: np.ndarray, ground_block: np.ndarray) -> np.ndarray:
    """Height above the ground estimate; never negative (the ground is a lower envelope)."""
    return np.maximum(dsm_block - ground_block, 0.0).astype(np.float32)


def _fill_non_ground(heights: np.ndarray, ground: np.ndarray) -> np.ndarray:
    """`heights` with its non-ground cells interpolated from the ground cells (step 4)."""
    filled = heights.copy()
    if ground.all():
        return filled
    square = np.ones((3, 3), dtype=bool)
    holes = ndimage.binary_dilation(~ground, structure=square, iterations=GROUND_BUFFER_CELLS)
    if holes.all():  # a grid too small for the buffer
        holes = ~ground
    # Only the ground cells on a hole's rim matter to a TIN of the holes; the rest would slow it.
    rim = ~holes & ndimage.binary_dilation(holes, structure=square)
    rim_cells = np.argwhere(rim)
    hole_cells = np.argwhere(holes)
    values = np.full(len(hole_cells), np.nan)
    try:
        tin = LinearNDInterpolator(rim_cells.astype(np.float64), heights[rim])
        values = tin(hole_cells.astype(np.float64))
    except (QhullError, ValueError):  # fewer than 3 rim cells, or all on one line
        pass
    outside = ~np.isfinite(values)
    if outside.any():
        nearest = ndimage.distance_transform_edt(holes, return_distances=False, return_indices=True)
        rows, cols = hole_cells[outside].T
        values[outside] = heights[nearest[0][rows, cols], nearest[1][rows, cols]]
    filled[holes] = values
    return filled


def _terrain_plane(grid: np.ndarray) -> np.ndarray:
    """The plane through the lower half of `grid`'s values (see the module docstring, step 2)."""
    rows, cols = np.indices(grid.shape)
    design = np.column_stack([rows.ravel(), cols.ravel(), np.ones(grid.size)]).astype(np.float64)
    heights = grid.ravel()
    coefficients = np.linalg.lstsq(design, heights, rcond=None)[0]
    for _ in range(GROUND_PLANE_REFITS):
        residual = heights - design @ coefficients
        lower = residual <= np.median(residual)
        coefficients = np.linalg.lstsq(design[lower], heights[lower], rcond=None)[0]
    return (design @ coefficients).reshape(grid.shape)


def _cell_percentiles(heights: np.ndarray, cell: int) -> np.ndarray:
    """(ceil(H / cell), ceil(W / cell)) GROUND_CELL_PERCENTILE of each cell; edge cells are padded."""
    rows, cols = -heights.shape[0] % cell, -heights.shape[1] % cell
    padded = np.pad(heights, ((0, rows), (0, cols)), mode="edge")
    n_rows, n_cols = padded.shape[0] // cell, padded.shape[1] // cell
    cells = padded.reshape(n_rows, cell, n_cols, cell).transpose(0, 2, 1, 3).reshape(n_rows, n_cols, -1)
    return np.percentile(cells, GROUND_CELL_PERCENTILE, axis=-1).astype(np.float32)


def _linear_weights(
    start: int, count: int, cell: int, n_cells: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For pixels start..start+count: the two coarse cells around each and the second one's weight.

    Cell i's value sits at the centre of its pixels, (i + 0.5) * cell - 0.5; beyond the first
    and last centres the nearest cell's value is kept.
    """
    position = (np.arange(start, start + count, dtype=np.float64) + 0.5) / cell - 0.5
    position = np.clip(position, 0.0, n_cells - 1)
    lower = np.floor(position).astype(np.intp)
    upper = np.minimum(lower + 1, n_cells - 1)
    return lower, upper, (position - lower).astype(np.float32)
