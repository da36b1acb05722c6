"""Real pixels: the ISPRS Vaihingen crop in ../shared (never committed) decodes and windows like ours.

Skipped where the folder is absent.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio

from aerialseg.classes import IGNORE_INDEX, NUM_CLASSES, colours_to_index, index_to_colours
from aerialseg.windows import window_grid

# ../shared/data/isprs-vaihingen-crop beside the project, or wherever AERIALSEG_ISPRS_CROP points.
CROP = Path(
    os.environ.get("AERIALSEG_ISPRS_CROP")
    or Path(__file__).resolve().parents[2] / "shared" / "data" / "isprs-vaihingen-crop"
)
pytestmark = pytest.mark.skipif(not CROP.is_dir(), reason=f"{CROP} is not available here")


def _read(name: str) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with rasterio.open(CROP / name) as src:
            return src.read()


@pytest.fixture(scope="module")
def crop() -> tuple[np.ndarray, np.ndarray]:
    irrg = _read("area1_0_0_512_512_irrg.png")
    # The crop's own coding: 0 = boundary, 1..6 = the classes in legend order.
    raw = _read("area1_0_0_512_512_label_eroded.png")[0]
    label = np.where(raw == 0, IGNORE_INDEX, raw.astype(np.int16) - 1).astype(np.uint8)
    return irrg, label


def test_the_eroded_label_decodes_through_the_official_colour_code(
    crop: tuple[np.ndarray, np.ndarray],
) -> None:
    _, label = crop
    # Render it as an official eroded ground-truth file would be, then decode it as the tiles stage does.
    decoded = colours_to_index(index_to_colours(label), CROP / "label", allow_boundary=True)
    np.testing.assert_array_equal(decoded, label)
    present = set(np.unique(decoded).tolist())
    assert present <= {*range(NUM_CLASSES), IGNORE_INDEX}
    assert {0, 1, 2, 3} <= present and IGNORE_INDEX in present
    # The eroded band is thin, as in the benchmark: most pixels keep their class.
    assert 0.05 < (decoded == IGNORE_INDEX).mean() < 0.4


def test_band_order_is_irrg(crop: tuple[np.ndarray, np.ndarray]) -> None:
    irrg, label = crop
    assert irrg.shape == (3, 512, 512) and irrg.dtype == np.uint8
    ir, red = irrg[0].astype(float), irrg[1].astype(float)
    # Vegetation reflects near-infrared far more than red, which false-colour IRRG shows as red;
    # on roads the two are about equal. A swapped band order breaks this.
    excess = ir - red
    for vegetation in (2, 3):
        assert excess[label == vegetation].mean() > excess[label == 0].mean() + 15


@pytest.mark.parametrize(("size", "overlap"), [(256, 0.6), (256, 0.5), (192, 0.0)])
def test_windows_cover_the_real_crop(crop: tuple[np.ndarray, np.ndarray], size: int, overlap: float) -> None:
    irrg, label = crop
    covered = np.zeros(label.shape, dtype=int)
    patches = []
    for w in window_grid(*label.shape, size, overlap):
        covered[w.slices] += 1
        patches.append(irrg[(slice(None), *w.slices)])
    assert covered.min() >= 1
    assert all(p.shape == (3, size, size) for p in patches)
