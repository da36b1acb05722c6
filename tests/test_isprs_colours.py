"""Label colours a few values off the legend (as Potsdam's are): snapped and counted within
`data.colour_tolerance`, named with their file, colour and count beyond it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from archive_builders import (
    POTSDAM_CUSTOM,
    SourceTile,
    assert_no_output,
    colour_label,
    potsdam_downloads,
    raster_bytes,
    read_band,
    write_downloads,
)

from aerialseg.classes import (
    BOUNDARY_COLOUR,
    CLASSES,
    IGNORE_INDEX,
    UnknownColourError,
    colours_to_index,
    decode_colours,
)
from aerialseg.config import DataConfig
from aerialseg.datasets.isprs import build_tiles, read_tiles_table
from aerialseg.datasets.synthetic import BUILDING, IMPERVIOUS

NEAR_WHITE = (252, 255, 253)  # 3 off impervious white
NEAR_BLUE = (2, 1, 255)  # 2 off building blue
NEAR_BLACK = (3, 0, 1)  # 3 off boundary black


@pytest.fixture(scope="module")
def off_colour_raw(tmp_path_factory: pytest.TempPathFactory, potsdam: list[SourceTile]) -> Path:
    """Potsdam whose tile 2_10 labels carry colours up to 3 values off the legend. Do not modify."""
    downloads = potsdam_downloads(potsdam, rgb_irrg=False, ndsm=False)
    t = potsdam[0]
    full, eroded = colour_label(t.label), colour_label(t.eroded)
    full[:, t.label == IMPERVIOUS] = np.array(NEAR_WHITE, dtype=np.uint8)[:, None]
    full[:, t.label == BUILDING] = np.array(NEAR_BLUE, dtype=np.uint8)[:, None]
    eroded[:, t.eroded == IGNORE_INDEX] = np.array(NEAR_BLACK, dtype=np.uint8)[:, None]
    for download in downloads:
        for member in download.members:
            if member == "top_potsdam_2_10_label.tif":
                download.members[member] = raster_bytes(full, None)
            elif member == "top_potsdam_2_10_label_noBoundary.tif":
                download.members[member] = raster_bytes(eroded, None)
    return write_downloads(tmp_path_factory.mktemp("potsdam_off_colours"), downloads, "zip")


def test_colours_within_tolerance_are_snapped_and_counted(
    off_colour_raw: Path, potsdam: list[SourceTile], out_dir: Path
) -> None:
    data = DataConfig(source="potsdam", bands=("r",), colour_tolerance=3, **POTSDAM_CUSTOM)
    table = build_tiles(off_colour_raw, out_dir, data).set_index("tile_id")
    t = potsdam[0]
    assert table.loc["2_10", "snapped_pixels"] == np.isin(t.label, [IMPERVIOUS, BUILDING]).sum()
    assert table.loc["2_10", "snapped_pixels_eroded"] == (t.eroded == IGNORE_INDEX).sum()
    assert table.loc["2_11", "snapped_pixels"] == 0
    np.testing.assert_array_equal(read_band(out_dir / "potsdam_2_10_label.tif"), t.label)
    np.testing.assert_array_equal(read_band(out_dir / "potsdam_2_10_label_eroded.tif"), t.eroded)
    assert read_tiles_table(out_dir)["snapped_pixels"].tolist() == table["snapped_pixels"].tolist()


@pytest.mark.parametrize("tolerance", [0, 2])
def test_colours_beyond_tolerance_fail_with_file_colour_and_count(
    off_colour_raw: Path, potsdam: list[SourceTile], out_dir: Path, tolerance: int
) -> None:
    data = DataConfig(source="potsdam", bands=("r",), colour_tolerance=tolerance, **POTSDAM_CUSTOM)
    with pytest.raises(UnknownColourError) as info:
        build_tiles(off_colour_raw, out_dir, data)
    message = str(info.value)
    t = potsdam[0]
    assert f"{off_colour_raw / '5_Labels_all.zip'}!top_potsdam_2_10_label.tif" in message
    assert f"{NEAR_WHITE}: {(t.label == IMPERVIOUS).sum()} px" in message
    if tolerance == 0:
        assert f"{NEAR_BLUE}: {(t.label == BUILDING).sum()} px" in message
    else:
        assert str(NEAR_BLUE) not in message  # 2 off: snapped
    assert_no_output(out_dir)


def test_decode_colours_snaps_within_tolerance() -> None:
    rgb = np.array([[CLASSES[1].colour, NEAR_BLUE, NEAR_BLACK, (40, 40, 40)]], dtype=np.uint8)
    decoded = decode_colours(rgb, allow_boundary=True, tolerance=3)
    assert decoded.index.tolist() == [[1, 1, IGNORE_INDEX, IGNORE_INDEX]]
    assert decoded.snapped == 2
    assert decoded.unknown == {(40, 40, 40): 1}
    # Near-black is only boundary where boundary is allowed.
    assert decode_colours(rgb, tolerance=3).unknown == {NEAR_BLACK: 1, (40, 40, 40): 1}
    assert decode_colours(rgb).snapped == 0


def test_colours_to_index_tolerance_defaults_to_exact() -> None:
    rgb = np.array([[NEAR_BLUE, BOUNDARY_COLOUR]], dtype=np.uint8)
    with pytest.raises(UnknownColourError, match=r"\(2, 1, 255\): 1 px"):
        colours_to_index(rgb, "x.tif", allow_boundary=True)
    assert colours_to_index(rgb, allow_boundary=True, tolerance=2).tolist() == [[1, IGNORE_INDEX]]
    with pytest.raises(UnknownColourError, match="within 1 of one"):
        colours_to_index(rgb, allow_boundary=True, tolerance=1)
