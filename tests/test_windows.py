"""The window grid shared by patch extraction and full-tile inference."""

from __future__ import annotations

import numpy as np
import pytest

from aerialseg.windows import Window, axis_offsets, stride_for, window_grid

# (height, width, size, overlap): square and non-square, exact multiples and remainders.
GRIDS = [
    (128, 128, 64, 0.5),
    (128, 128, 64, 0.0),
    (256, 96, 64, 0.0),
    (100, 130, 32, 0.25),
    (97, 203, 32, 0.5),
    (300, 70, 64, 0.75),
    (64, 64, 64, 0.5),
    (65, 64, 64, 0.0),
    (64, 200, 64, 0.9),
    (512, 384, 256, 0.5),
    (40, 41, 8, 0.3),
]


def coverage(height: int, width: int, windows: list[Window]) -> np.ndarray:
    count = np.zeros((height, width), dtype=np.int64)
    for w in windows:
        count[w.slices] += 1
    return count


def offsets(windows: list[Window]) -> tuple[list[int], list[int]]:
    return sorted({w.row for w in windows}), sorted({w.col for w in windows})


@pytest.mark.parametrize(("height", "width", "size", "overlap"), GRIDS)
def test_grid_covers_every_pixel(height: int, width: int, size: int, overlap: float) -> None:
    windows = window_grid(height, width, size, overlap)
    assert coverage(height, width, windows).min() >= 1


@pytest.mark.parametrize(("height", "width", "size", "overlap"), GRIDS)
def test_windows_stay_inside_the_raster(height: int, width: int, size: int, overlap: float) -> None:
    for w in window_grid(height, width, size, overlap):
        assert w.size == size
        assert 0 <= w.row <= height - size
        assert 0 <= w.col <= width - size
        rows, cols = w.slices
        assert (rows.start, rows.stop, cols.start, cols.stop) == (w.row, w.row + size, w.col, w.col + size)


@pytest.mark.parametrize(("height", "width", "size", "overlap"), GRIDS)
def test_regular_stride_and_last_window_flush(height: int, width: int, size: int, overlap: float) -> None:
    stride = stride_for(size, overlap)
    assert stride == max(1, round(size * (1 - overlap)))
    rows, cols = offsets(window_grid(height, width, size, overlap))
    for axis, length in ((rows, height), (cols, width)):
        assert axis[0] == 0
        assert axis[-1] == length - size
        steps = np.diff(axis)
        # Every step but the last is exactly the stride; the last is shifted in, never further.
        assert all(step == stride for step in steps[:-1])
        assert all(0 < step <= stride for step in steps[-1:])
        assert axis == axis_offsets(length, size, stride)


@pytest.mark.parametrize(("height", "width", "size", "overlap"), GRIDS)
def test_grid_is_row_major_product_without_duplicates(
    height: int, width: int, size: int, overlap: float
) -> None:
    windows = window_grid(height, width, size, overlap)
    rows, cols = offsets(windows)
    assert len(set(windows)) == len(windows)
    assert [(w.row, w.col) for w in windows] == [(r, c) for r in rows for c in cols]


@pytest.mark.parametrize(
    ("size", "overlap", "stride"),
    [(256, 0.5, 128), (256, 0.0, 256), (64, 0.25, 48), (100, 0.333, 67), (32, 0.75, 8), (32, 0.99, 1)],
)
def test_stride_for(size: int, overlap: float, stride: int) -> None:
    assert stride_for(size, overlap) == stride


@pytest.mark.parametrize(("height", "width", "size"), [(256, 128, 64), (128, 128, 128), (96, 320, 32)])
def test_no_overlap_on_exact_multiple_tiles_exactly(height: int, width: int, size: int) -> None:
    windows = window_grid(height, width, size, 0.0)
    assert len(windows) == (height // size) * (width // size)
    assert (coverage(height, width, windows) == 1).all()


def test_half_overlap_counts() -> None:
    # 128 px with 64 px windows and stride 32: offsets 0, 32, 64 on each axis.
    windows = window_grid(128, 160, 64, 0.5)
    rows, cols = offsets(windows)
    assert rows == [0, 32, 64]
    assert cols == [0, 32, 64, 96]
    assert len(windows) == 12


def test_remainder_adds_one_shifted_window() -> None:
    rows, cols = offsets(window_grid(100, 64, 32, 0.0))
    assert rows == [0, 32, 64, 68]
    assert cols == [0, 32]


def test_raster_equal_to_window_is_one_window() -> None:
    assert window_grid(64, 64, 64, 0.5) == [Window(0, 0, 64)]


@pytest.mark.parametrize(("height", "width"), [(63, 128), (128, 63), (10, 10)])
def test_side_smaller_than_window_raises(height: int, width: int) -> None:
    with pytest.raises(ValueError, match=r"smaller than the 64 px window") as info:
        window_grid(height, width, 64, 0.5)
    assert str(min(height, width)) in str(info.value)


@pytest.mark.parametrize("overlap", [1.0, -0.1, 1.5, -1.0])
def test_bad_overlap_raises(overlap: float) -> None:
    with pytest.raises(ValueError, match="overlap"):
        window_grid(128, 128, 64, overlap)
    with pytest.raises(ValueError, match="overlap"):
        stride_for(64, overlap)


@pytest.mark.parametrize("size", [0, -32])
def test_bad_size_raises(size: int) -> None:
    with pytest.raises(ValueError, match="size"):
        stride_for(size, 0.5)
