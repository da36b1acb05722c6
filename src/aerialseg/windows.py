"""The window grid shared by patch extraction and full-tile inference.

One definition of `overlap` for the whole project: stride = round(size * (1 - overlap)),
and the last window on each axis is shifted in so that it ends at the raster's edge,
so every pixel is covered without padding (for rasters at least one window large).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Window:
    row: int
    col: int
    size: int

    @property
    def slices(self) -> tuple[slice, slice]:
        return slice(self.row, self.row + self.size), slice(self.col, self.col + self.size)


def stride_for(size: int, overlap: float) -> int:
    if size <= 0:
        raise ValueError(f"window size must be positive, got {size}")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must satisfy 0 <= overlap < 1, got {overlap}")
    return max(1, round(size * (1.0 - overlap)))


def axis_offsets(length: int, size: int, stride: int) -> list[int]:
    """Start offsets along one axis: regular steps, plus one window flush with the far edge."""
    if length < size:
        raise ValueError(f"a raster side of {length} px is smaller than the {size} px window")
    offsets = list(range(0, length - size + 1, stride))
    if offsets[-1] != length - size:
        offsets.append(length - size)
    return offsets


def window_grid(height: int, width: int, size: int, overlap: float) -> list[Window]:
    """Row-major windows of `size` covering a height x width raster with the given overlap."""
    stride = stride_for(size, overlap)
    return [
        Window(row, col, size)
        for row in axis_offsets(height, size, stride)
        for col in axis_offsets(width, size, stride)
    ]
