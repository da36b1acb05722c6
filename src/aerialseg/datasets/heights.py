"""Heights for the model: the DSM relative to the tile's ground, and an nDSM (height above terrain).

Both are computed from a DSM that is read in row blocks, so that a 6000 x 6000 Potsdam DSM
never sits in memory at full resolution more than one block at a time.

`dsm` band: DSM minus the tile's DSM_GROUND_PERCENTILE. One number per tile, so the model sees
object heights plus the terrain's relief within the tile, not the absolute elevation that
varies between tiles.

`ndsm` band (when the archive has none): DSM minus a local ground estimate, clipped at 0:

1. the DSM is cut into cells of about GROUND_CELL_M and each cell is reduced to its
   GROUND_CELL_PERCENTILE (a robust local minimum: isolated matching blunders below the surface
   do not drag it down as a plain minimum would);
2. the tile's overall slope is taken out: a plane is fitted to the cells, then refitted to the
   lower half of them (ground, not roofs), GROUND_PLANE_REFITS times;
3. a grey-scale morphological opening with a square window of about GROUND_WINDOW_M removes
   everything narrower than the window - buildings, trees, cars - and keeps the terrain. An
   opening keeps a plane only away from the tile's edges (within half a window of the uphill
   edge it would cut the slope short), hence step 2; the plane is added back afterwards;
4. the coarse ground is interpolated bilinearly back to full resolution, block by block.

Buildings wider than the window in both directions are partly taken for ground; 25 m is the
LAStools `-city` step, a compromise between large roofs and terrain detail.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from rasterio.enums import Resampling
from rasterio.io import DatasetReader
from rasterio.windows import Window
from scipy import ndimage

DSM_GROUND_PERCENTILE = 1.0
"""The `dsm` band is height above this percentile of the tile's DSM."""
PERCENTILE_MAX_SAMPLES = 8_000_000
"""Larger DSMs (Potsdam: 36 M pixels) get their percentile from a decimated read (Vaihingen: exact)."""
GROUND_CELL_M = 0.5
GROUND_CELL_PERCENTILE = 10.0
GROUND_WINDOW_M = 25.0
GROUND_PLANE_REFITS = 2


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
    slope = _terrain_plane(coarse)
    window = max(1, round(GROUND_WINDOW_M / (cell * pixel_size_m)))
    ground = ndimage.grey_opening(coarse - slope, size=(window, window), mode="nearest") + slope
    return GroundModel(ground.astype(np.float32), cell)


def normalised_heights(dsm_block: np.ndarray, ground_block: np.ndarray) -> np.ndarray:
    """Height above the ground estimate; never negative (the ground is a lower envelope)."""
    return np.maximum(dsm_block - ground_block, 0.0).astype(np.float32)


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
