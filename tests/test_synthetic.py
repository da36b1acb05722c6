"""Procedural Vaihingen-like scenes and the official folder layout they are written in."""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest
import rasterio
from affine import Affine
from scipy import ndimage

from aerialseg.classes import IGNORE_INDEX, colours_to_index
from aerialseg.config import SyntheticConfig
from aerialseg.datasets import synthetic
from aerialseg.datasets.synthetic import Scene, erode_label, generate_scene, write_vaihingen_layout

IMPERVIOUS, BUILDING, LOW_VEGETATION, TREE, CAR, CLUTTER = range(6)


def scene(size: int, seed: int) -> Scene:
    return generate_scene(size, np.random.default_rng(seed))


def boundary_by_brute_force(label: np.ndarray, radius: int) -> np.ndarray:
    """True where some pixel of the tile within `radius` (Euclidean) has another class."""
    h, w = label.shape
    boundary = np.zeros(label.shape, dtype=bool)
    for dr in range(-radius, radius + 1):
        for dc in range(-radius, radius + 1):
            if dr * dr + dc * dc > radius * radius:
                continue
            # Pixel p = (r, c) in `here` is compared with its neighbour p + (dr, dc) in `there`.
            here = (slice(max(-dr, 0), h + min(-dr, 0)), slice(max(-dc, 0), w + min(-dc, 0)))
            there = (slice(max(dr, 0), h + min(dr, 0)), slice(max(dc, 0), w + min(dc, 0)))
            boundary[here] |= label[here] != label[there]
    return boundary


class Grid(NamedTuple):
    epsg: int | None
    transform: Affine
    res: tuple[float, float]
    width: int
    height: int


def read(path: Path) -> tuple[np.ndarray, Grid]:
    with rasterio.open(path) as src:
        grid = Grid(src.crs.to_epsg() if src.crs else None, src.transform, src.res, src.width, src.height)
        return src.read(), grid


# --------------------------------------------------------------------------------------
# generate_scene


def test_same_seed_gives_identical_scene() -> None:
    first, second = scene(160, 3), scene(160, 3)
    assert first.irrg.shape == (3, 160, 160) and first.irrg.dtype == np.uint8
    assert first.dsm.shape == (160, 160) and first.dsm.dtype == np.float32
    assert first.label.shape == (160, 160) and first.label.dtype == np.uint8
    np.testing.assert_array_equal(first.irrg, second.irrg)
    np.testing.assert_array_equal(first.dsm, second.dsm)
    np.testing.assert_array_equal(first.label, second.label)


def test_different_seed_gives_different_scene() -> None:
    first, second = scene(160, 3), scene(160, 4)
    assert not np.array_equal(first.label, second.label)
    assert not np.array_equal(first.irrg, second.irrg)
    assert not np.array_equal(first.dsm, second.dsm)


@pytest.mark.parametrize("seed", range(5))
def test_every_main_class_present_at_256_px(seed: int) -> None:
    label = scene(256, seed).label
    assert label.max() <= CLUTTER
    assert {IMPERVIOUS, BUILDING, LOW_VEGETATION, TREE, CAR} <= set(np.unique(label).tolist())


def test_small_tiles_still_hold_every_main_class() -> None:
    for seed in range(5):
        present = set(np.unique(scene(128, seed).label).tolist())
        assert {IMPERVIOUS, BUILDING, LOW_VEGETATION, TREE, CAR} <= present, seed


def test_heights_and_infrared_are_physically_plausible() -> None:
    # Pooled over a few tiles: one tile may be mostly in shadow, the population may not.
    heights: dict[int, list[np.ndarray]] = {c: [] for c in range(6)}
    infrared: dict[int, list[np.ndarray]] = {c: [] for c in range(6)}
    for seed in range(4):
        s = scene(256, seed)
        assert float(s.dsm.min()) > 245.0 and float(s.dsm.max()) < 290.0
        above_median = s.dsm - np.median(s.dsm)
        for c in range(6):
            heights[c].append(above_median[s.label == c])
            infrared[c].append(s.irrg[0][s.label == c].astype(float))
    height = {c: float(np.concatenate(v).mean()) for c, v in heights.items()}
    ir = {c: float(np.concatenate(v).mean()) for c, v in infrared.items()}

    assert height[BUILDING] > height[IMPERVIOUS] + 4.0
    assert height[TREE] > height[IMPERVIOUS] + 4.0
    assert height[CAR] > height[IMPERVIOUS] + 0.5
    assert abs(height[LOW_VEGETATION] - height[IMPERVIOUS]) < 1.0
    # Vegetation is bright in the near infrared, man-made surfaces are not.
    assert min(ir[LOW_VEGETATION], ir[TREE]) > max(ir[IMPERVIOUS], ir[BUILDING]) + 15.0


def test_cars_are_small_rectangles_of_at_least_8_by_4_px() -> None:
    sizes = []
    for seed in range(4):
        label = scene(128, seed).label
        components, _ = ndimage.label(label == CAR)
        for box in ndimage.find_objects(components):
            rows, cols = box
            touches_edge = rows.start == 0 or cols.start == 0 or rows.stop == 128 or cols.stop == 128
            if not touches_edge:
                sizes.append(sorted((rows.stop - rows.start, cols.stop - cols.start)))
    assert sizes, "no whole car in four 128 px tiles"
    short, long = np.array(sizes).T
    assert short.min() >= 4 and long.min() >= 8
    # ... and cars, not car parks: the 128 px cars are about 12 x 5 px.
    assert long.max() <= 20


def test_clutter_is_rare_but_usually_present() -> None:
    fractions = [float((scene(256, seed).label == CLUTTER).mean()) for seed in range(10)]
    assert max(fractions) < 0.02
    assert sum(f > 0 for f in fractions) >= 6


def test_single_pixel_colour_is_not_enough_but_height_helps() -> None:
    """A per-pixel lookup table on quantised IRRG must not solve the task; adding the DSM must
    help a lot - the scenes need context and height, like real ones."""

    def codes(s: Scene, with_height: bool) -> np.ndarray:
        q = s.irrg.reshape(3, -1).astype(np.int64) // 16
        code = (q[0] * 16 + q[1]) * 16 + q[2]
        if with_height:
            height = (s.dsm - np.median(s.dsm)).ravel()
            code = code * 5 + np.digitize(height, [0.5, 1.2, 2.5, 5.0])
        return code

    train = [scene(256, seed) for seed in range(200, 204)]
    test = [scene(256, seed) for seed in range(204, 206)]
    accuracy = {}
    for with_height in (False, True):
        votes = np.zeros((16**3 * 5, 6))
        for s in train:
            np.add.at(votes, (codes(s, with_height), s.label.ravel()), 1)
        lookup = votes.argmax(axis=1)
        hits = sum(int((lookup[codes(s, with_height)] == s.label.ravel()).sum()) for s in test)
        accuracy[with_height] = hits / sum(s.label.size for s in test)
    # Measured: about 0.7 from colour alone, 0.9 with the height band.
    assert accuracy[False] < 0.85
    assert accuracy[True] > accuracy[False] + 0.1


def test_rejects_tiny_tiles() -> None:
    with pytest.raises(ValueError, match="at least"):
        generate_scene(32, np.random.default_rng(0))


# --------------------------------------------------------------------------------------
# erode_label


def test_erode_label_blanks_a_disk_around_an_isolated_pixel() -> None:
    label = np.zeros((11, 11), dtype=np.uint8)
    label[5, 5] = BUILDING
    eroded = erode_label(label, radius=3)
    # Every pixel within 3 px of the odd one out (29 pixels of a radius-3 disk) is boundary.
    rows, cols = np.ogrid[:11, :11]
    expected = (rows - 5) ** 2 + (cols - 5) ** 2 <= 9
    np.testing.assert_array_equal(eroded == IGNORE_INDEX, expected)
    assert int(expected.sum()) == 29
    assert (eroded[~expected] == 0).all()
    assert label[5, 5] == BUILDING, "input must not be modified"


@pytest.mark.parametrize("radius", [1, 2, 3, 5])
def test_erode_label_matches_brute_force_on_a_scene(radius: int) -> None:
    label = scene(128, 11).label
    eroded = erode_label(label, radius)
    boundary = boundary_by_brute_force(label, radius)
    assert boundary.any() and not boundary.all()
    np.testing.assert_array_equal(eroded == IGNORE_INDEX, boundary)
    np.testing.assert_array_equal(eroded[~boundary], label[~boundary])


def test_erode_label_radius_zero_and_bad_input() -> None:
    label = scene(128, 1).label
    unchanged = erode_label(label, 0)
    np.testing.assert_array_equal(unchanged, label)
    assert unchanged is not label
    with pytest.raises(ValueError, match="radius"):
        erode_label(label, -1)
    with pytest.raises(ValueError, match="shape"):
        erode_label(label[None], 3)


# --------------------------------------------------------------------------------------
# write_vaihingen_layout


def expected_files(areas: list[int]) -> set[str]:
    files = set()
    for n in areas:
        files |= {
            f"top/top_mosaic_09cm_area{n}.tif",
            f"dsm/dsm_09cm_matching_area{n}.tif",
            f"gts_for_participants/top_mosaic_09cm_area{n}.tif",
            f"gts_eroded_for_participants/top_mosaic_09cm_area{n}_noBoundary.tif",
        }
    return files


def files_under(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def test_layout_matches_the_official_vaihingen_folders(tmp_path: Path) -> None:
    cfg = SyntheticConfig(tiles=3, size_px=128, seed=5)
    out = tmp_path / "synthetic"

    areas = write_vaihingen_layout(out, cfg)

    assert areas == [1, 2, 3]
    assert files_under(out) == expected_files(areas)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synthetic"], "temporary folder left"
    origins = set()
    for n in areas:
        expected = generate_scene(128, np.random.default_rng([5, n]))
        top, top_grid = read(out / f"top/top_mosaic_09cm_area{n}.tif")
        dsm, dsm_grid = read(out / f"dsm/dsm_09cm_matching_area{n}.tif")
        gts, gts_grid = read(out / f"gts_for_participants/top_mosaic_09cm_area{n}.tif")
        eroded, eroded_grid = read(
            out / f"gts_eroded_for_participants/top_mosaic_09cm_area{n}_noBoundary.tif"
        )
        for grid in (top_grid, dsm_grid, gts_grid, eroded_grid):
            assert grid.epsg == 32632
            assert grid.res == pytest.approx((0.09, 0.09))
            assert (grid.width, grid.height) == (128, 128)
            assert grid.transform == top_grid.transform
        origins.add((top_grid.transform.c, top_grid.transform.f))

        assert top.dtype == np.uint8 and top.shape == (3, 128, 128)
        assert dsm.dtype == np.float32 and dsm.shape == (1, 128, 128)
        assert gts.dtype == np.uint8 and gts.shape == (3, 128, 128)
        assert eroded.dtype == np.uint8 and eroded.shape == (3, 128, 128)
        np.testing.assert_array_equal(top, expected.irrg)
        np.testing.assert_array_equal(dsm[0], expected.dsm)

        full = colours_to_index(gts.transpose(1, 2, 0))
        np.testing.assert_array_equal(full, expected.label)
        no_boundary = colours_to_index(eroded.transpose(1, 2, 0), allow_boundary=True)
        boundary = boundary_by_brute_force(full, 3)
        np.testing.assert_array_equal(no_boundary == IGNORE_INDEX, boundary)
        np.testing.assert_array_equal(no_boundary[~boundary], full[~boundary])
    assert len(origins) == len(areas), "areas must lie at different places"


def test_tiles_do_not_change_with_the_tile_count(tmp_path: Path) -> None:
    write_vaihingen_layout(tmp_path / "three", SyntheticConfig(tiles=3, size_px=96, seed=2))
    write_vaihingen_layout(tmp_path / "four", SyntheticConfig(tiles=4, size_px=96, seed=2))
    assert files_under(tmp_path / "four") == expected_files([1, 2, 3, 4])
    for name in expected_files([1, 2, 3]):
        np.testing.assert_array_equal(read(tmp_path / "three" / name)[0], read(tmp_path / "four" / name)[0])


def test_a_crash_leaves_no_half_layout_and_keeps_the_old_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "synthetic"
    write_vaihingen_layout(out, SyntheticConfig(tiles=3, size_px=64, seed=0))
    old_top = read(out / "top/top_mosaic_09cm_area1.tif")[0]

    real_write = synthetic.write_raster
    calls = []

    def failing_write(*args: Any, **kwargs: Any) -> Path:
        calls.append(args[0])
        if len(calls) == 6:
            raise OSError("disk full")
        return real_write(*args, **kwargs)

    monkeypatch.setattr(synthetic, "write_raster", failing_write)
    with pytest.raises(OSError, match="disk full"):
        write_vaihingen_layout(out, SyntheticConfig(tiles=3, size_px=64, seed=1))

    assert len(calls) == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synthetic"], "temporary folder left"
    assert files_under(out) == expected_files([1, 2, 3])
    np.testing.assert_array_equal(read(out / "top/top_mosaic_09cm_area1.tif")[0], old_top)


def test_negative_seed_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="seed"):
        write_vaihingen_layout(tmp_path / "synthetic", SyntheticConfig(tiles=3, size_px=64, seed=-1))
    assert not (tmp_path / "synthetic").exists()
