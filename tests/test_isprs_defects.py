"""Known defects of the official ISPRS archives, through the `tiles` stage's own script.

Potsdam tile 3_13 (an official test tile): its DSM `dsm_potsdam_03_13.tif` and its nDSM
`dsm_potsdam_03_13_normalized_lastools.jpg` are 5999 x 6000 px (width x height), one column short of
the 6000 x 6000 orthophoto and labels. The fixtures rebuild that at 64 x 64 px (heights 63 x 64), with
label colours a few values off the legend as Potsdam's have.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from affine import Affine
from archive_builders import (
    SMALL,
    Download,
    SourceTile,
    colour_label,
    ndsm_jpeg_values,
    potsdam_downloads,
    potsdam_tiles,
    raster_bytes,
    read_band,
    write_downloads,
)

from aerialseg.config import DataConfig
from aerialseg.datasets import isprs_convert
from aerialseg.datasets.isprs import build_tiles, read_tiles_table
from aerialseg.datasets.isprs_convert import MAX_HEIGHT_PADDING_PX
from aerialseg.datasets.isprs_layout import NDSM_JPEG_METRES_PER_VALUE
from aerialseg.datasets.synthetic import IMPERVIOUS
from aerialseg.raster import GeoReference, RasterError, read_raster

ROOT = Path(__file__).resolve().parents[1]
TILE_IDS = ("2_10", "2_11", "3_13")
SPLIT = {"train_tiles": ["2_10"], "val_tiles": ["2_11"], "test_tiles": ["3_13"]}
BANDS = ["r", "g", "b", "ir", "dsm", "ndsm"]
DSM_MEMBER = "1_DSM/dsm_potsdam_03_13.tif"
NDSM_MEMBER = "1_DSM_normalisation/dsm_potsdam_03_13_normalized_lastools.jpg"
ORTHO_MEMBER = "4_Ortho_RGBIR/top_potsdam_3_13_RGBIR.tif"
NEAR_WHITE = (253, 255, 252)  # 3 off impervious white, as Potsdam's labels have


@pytest.fixture(scope="module")
def tiles() -> list[SourceTile]:
    return potsdam_tiles(SMALL, TILE_IDS)


def downloads_3_13(
    tiles: list[SourceTile], short: tuple[int, int] = (1, 0), *, ndsm: bool = True
) -> list[Download]:
    """The Potsdam archives with 3_13's DSM and nDSM `short` (columns, rows) on the right/bottom and
    its impervious surfaces labelled NEAR_WHITE (3 off the legend)."""
    downloads = potsdam_downloads(tiles, rgb_irrg=False, ndsm=ndsm, heights_short={"3_13": short})
    t = tiles[2]
    full, eroded = colour_label(t.label), colour_label(t.eroded)
    full[:, t.label == IMPERVIOUS] = np.array(NEAR_WHITE, dtype=np.uint8)[:, None]
    eroded[:, t.eroded == IMPERVIOUS] = np.array(NEAR_WHITE, dtype=np.uint8)[:, None]
    for download in downloads:
        for member in download.members:
            if member == "top_potsdam_3_13_label.tif":
                download.members[member] = raster_bytes(full, None)
            elif member == "top_potsdam_3_13_label_noBoundary.tif":
                download.members[member] = raster_bytes(eroded, None)
    return downloads


def replaced(downloads: list[Download], member: str, content: bytes) -> list[Download]:
    """`downloads` with one member's content replaced."""
    return [
        Download(d.archive, {m: content if m == member else c for m, c in d.members.items()})
        for d in downloads
    ]


def run_tiles_stage(
    project: Path, raw: Path, bands: list[str] = BANDS, colour_tolerance: int = 3
) -> subprocess.CompletedProcess[str]:
    """`python pipeline/tiles.py` as `dvc repro` runs it, with a params.yaml of its own in `project`."""
    project.mkdir(parents=True, exist_ok=True)
    params = {
        "paths": {"tiles": "tiles"},
        "data": {
            "source": "potsdam",
            "raw_dir": str(raw),
            "bands": bands,
            "colour_tolerance": colour_tolerance,
            **SPLIT,
        },
    }
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "TQDM_DISABLE": "1"}
    return subprocess.run(
        [sys.executable, str(ROOT / "pipeline" / "tiles.py")],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def read_table(tiles_dir: Path) -> pd.DataFrame:
    return read_tiles_table(tiles_dir).set_index("tile_id")


def error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The stage's error: one line `tiles: <message>` (aerialseg.stage), which must hold the whole message."""
    assert result.returncode != 0, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1] == "(AERIALSEG_TRACEBACK=1 shows the traceback)" and "Traceback" not in result.stderr
    return lines[-2].removeprefix("tiles: ")


@pytest.mark.parametrize("form", ["zip", "folders"])
def test_3_13_heights_one_column_short_are_padded(tiles: list[SourceTile], tmp_path: Path, form: str) -> None:
    raw = write_downloads(tmp_path / "raw", downloads_3_13(tiles), form)
    result = run_tiles_stage(tmp_path / "project", raw)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert (
        "potsdam_3_13: dsm_potsdam_03_13.tif is 63 x 64 px, the orthophoto 64 x 64: last 1 column repeated; "
        "dsm_potsdam_03_13_normalized_lastools.jpg is 63 x 64 px, the orthophoto 64 x 64: "
        "last 1 column repeated"
    ) in output.splitlines()
    assert sum("column repeated" in line or "row repeated" in line for line in output.splitlines()) == 1

    out = tmp_path / "project" / "tiles"
    table = read_table(out)
    padding = ["dsm_padded_cols", "dsm_padded_rows", "ndsm_padded_cols", "ndsm_padded_rows"]
    assert table.loc["3_13", padding].tolist() == [1, 0, 1, 0]
    assert (table.loc[["2_10", "2_11"], padding] == 0).all().all()
    t = tiles[2]
    # Off-legend label colours (3 off) still snap within data.colour_tolerance.
    assert table.loc["3_13", "snapped_pixels"] == (t.label == IMPERVIOUS).sum()
    assert table.loc["3_13", "snapped_pixels_eroded"] == (t.eroded == IMPERVIOUS).sum()
    np.testing.assert_array_equal(read_band(out / "potsdam_3_13_label.tif"), t.label)

    image, georef = read_raster(out / "potsdam_3_13_image.tif")
    assert image.shape == (6, SMALL, SMALL) and georef == t.georef
    dsm, ndsm = image[4], image[5]
    np.testing.assert_array_equal(dsm[:, -1], dsm[:, -2])
    np.testing.assert_array_equal(ndsm[:, -1], ndsm[:, -2])
    short_dsm = t.dsm[:, :-1]
    np.testing.assert_allclose(dsm[:, :-1], short_dsm - np.percentile(short_dsm, 1.0), atol=1e-4)
    assert np.abs(ndsm[:, :-1] - ndsm_jpeg_values(t)[:, :-1] * NDSM_JPEG_METRES_PER_VALUE).mean() < 0.2
    # The spectral bands and the labels keep all 64 columns of their own.
    np.testing.assert_allclose(image[0], t.bands["r"] / np.float32(255), atol=1e-7)


@pytest.mark.parametrize("ndsm_source", ["archive", "derived"])
def test_rows_short_at_the_bottom_are_padded_in_any_block_size(
    tiles: list[SourceTile], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ndsm_source: str
) -> None:
    """Row blocks that lie wholly below the short raster repeat its last row too; an nDSM derived from
    a short DSM covers the whole tile."""
    n = MAX_HEIGHT_PADDING_PX
    raw = write_downloads(
        tmp_path / "raw", downloads_3_13(tiles, (n, n), ndsm=ndsm_source == "archive"), "zip"
    )
    data = DataConfig(source="potsdam", bands=("dsm", "ndsm", "r"), colour_tolerance=3, **SPLIT)
    whole = build_tiles(raw, tmp_path / "whole" / "tiles", data).set_index("tile_id")
    monkeypatch.setattr(isprs_convert, "BLOCK_ROWS", 2)
    blocks = build_tiles(raw, tmp_path / "blocks" / "tiles", data).set_index("tile_id")
    pd.testing.assert_frame_equal(blocks, whole)
    assert whole.loc["3_13", "ndsm_source"] == ndsm_source
    padding = ["dsm_padded_cols", "dsm_padded_rows", "ndsm_padded_cols", "ndsm_padded_rows"]
    expected = [n, n, n, n] if ndsm_source == "archive" else [n, n, 0, 0]
    assert whole.loc["3_13", padding].tolist() == expected
    image, _ = read_raster(tmp_path / "whole" / "tiles" / "potsdam_3_13_image.tif")
    in_blocks, _ = read_raster(tmp_path / "blocks" / "tiles" / "potsdam_3_13_image.tif")
    np.testing.assert_array_equal(in_blocks, image)
    assert image.shape == (3, SMALL, SMALL) and np.isfinite(image).all()
    for band in image[:2] if ndsm_source == "archive" else image[:1]:
        assert (band[-n:] == band[-n - 1]).all() and (band[:, -n:] == band[:, -n - 1 : -n]).all()
    assert image[1].min() >= 0.0


def test_ndsm_jpeg_alone_short_is_padded(tiles: list[SourceTile], tmp_path: Path) -> None:
    """The nDSM JPEG has no georeference: it lies on the orthophoto's grid from the top-left corner."""
    t = tiles[2]
    jpeg = raster_bytes(ndsm_jpeg_values(t)[:, :-2], None, driver="JPEG")
    raw = write_downloads(tmp_path / "raw", replaced(downloads_3_13(tiles, (0, 0)), NDSM_MEMBER, jpeg), "zip")
    result = run_tiles_stage(tmp_path / "project", raw, bands=["r", "ndsm"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        "potsdam_3_13: dsm_potsdam_03_13_normalized_lastools.jpg is 62 x 64 px, the orthophoto 64 x 64: "
        "last 2 columns repeated"
    ) in result.stderr.splitlines()
    table = read_table(tmp_path / "project" / "tiles")
    padding = table.loc["3_13", ["dsm_padded_cols", "ndsm_padded_cols", "ndsm_padded_rows"]]
    assert padding.tolist() == [0, 2, 0]
    ndsm = read_band(tmp_path / "project" / "tiles" / "potsdam_3_13_image.tif", 2)
    assert (ndsm[:, -2:] == ndsm[:, -3:-2]).all()


@pytest.mark.parametrize("what", ["dsm", "ndsm"])
def test_heights_short_beyond_the_limit_fail_naming_both_files_and_sizes(
    tiles: list[SourceTile], tmp_path: Path, what: str
) -> None:
    t, n = tiles[2], MAX_HEIGHT_PADDING_PX + 1
    downloads = downloads_3_13(tiles, (0, 0))
    if what == "dsm":
        member, archive, content = DSM_MEMBER, "1_DSM.zip", raster_bytes(t.dsm[:, :-n], t.georef)
        name = "DSM"
    else:
        jpeg = raster_bytes(ndsm_jpeg_values(t)[:, :-n], None, driver="JPEG")
        member, archive, content, name = NDSM_MEMBER, "1_DSM_normalisation.zip", jpeg, "nDSM"
    raw = write_downloads(tmp_path / "raw", replaced(downloads, member, content), "zip")
    line = error_line(run_tiles_stage(tmp_path / "project", raw))
    assert f"{raw / archive}!{member}: the {name} is {SMALL - n} x {SMALL} px (width x height)" in line
    assert f"the orthophoto {raw / '4_Ortho_RGBIR.zip'}!{ORTHO_MEMBER} is {SMALL} x {SMALL} px" in line
    n = MAX_HEIGHT_PADDING_PX
    assert f"may lack at most {n} columns on the right and {n} rows at the bottom" in line


def test_dsm_short_on_the_top_left_is_a_shifted_grid(tiles: list[SourceTile], tmp_path: Path) -> None:
    """A DSM that lacks its first column starts one pixel right of the orthophoto: not padded."""
    t = tiles[2]
    shifted = GeoReference(t.georef.crs, t.georef.transform @ Affine.translation(1, 0))
    dsm = raster_bytes(t.dsm[:, 1:], shifted)
    raw = write_downloads(tmp_path / "raw", replaced(downloads_3_13(tiles, (0, 0)), DSM_MEMBER, dsm), "zip")
    line = error_line(run_tiles_stage(tmp_path / "project", raw))
    assert f"{raw / '1_DSM.zip'}!{DSM_MEMBER}: the DSM's grid (63 x 64 px, CRS EPSG:32633" in line
    assert f"differs from the orthophoto {raw / '4_Ortho_RGBIR.zip'}!{ORTHO_MEMBER} (64 x 64 px" in line
    assert "its top-left corner lies at column 1, row 0 of the orthophoto" in line


def test_dsm_larger_than_the_orthophoto_fails(tiles: list[SourceTile], tmp_path: Path) -> None:
    t = tiles[2]
    dsm = raster_bytes(np.pad(t.dsm, ((0, 0), (0, 1)), mode="edge"), t.georef)
    raw = write_downloads(tmp_path / "raw", replaced(downloads_3_13(tiles, (0, 0)), DSM_MEMBER, dsm), "zip")
    with pytest.raises(RasterError) as info:
        build_tiles(raw, tmp_path / "out" / "tiles", DataConfig(source="potsdam", **SPLIT))
    message = str(info.value)
    assert "\n" not in message
    assert f"{DSM_MEMBER}: the DSM is 65 x 64 px (width x height)" in message
    assert f"{ORTHO_MEMBER} is 64 x 64 px" in message


def test_labels_are_never_padded(tiles: list[SourceTile], tmp_path: Path) -> None:
    t = tiles[2]
    label = raster_bytes(colour_label(t.label)[:, :, :-1], None)
    downloads = replaced(downloads_3_13(tiles, (0, 0)), "top_potsdam_3_13_label.tif", label)
    raw = write_downloads(tmp_path / "raw", downloads, "zip")
    data = DataConfig(source="potsdam", bands=("r",), colour_tolerance=3, **SPLIT)
    with pytest.raises(RasterError, match=r"top_potsdam_3_13_label\.tif: the label is 63 x 64 px"):
        build_tiles(raw, tmp_path / "out" / "tiles", data)
