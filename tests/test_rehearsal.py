"""`make rehearsal` scaled down: the same entry point, archives and stages on tiles 1/20th of the side.

The full-size run (benchmarks/rehearsal.py) takes ~half an hour and is not part of `make test`; this
runs its code path end to end: the official archives written block by block, a project copy with
each benchmark preset applied, `tiles` and `patches` for Vaihingen and two Potsdam counts, one
training step and the evaluation of the one test tile, each stage measured in its own process.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import rasterio

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import rehearsal_archives as archives  # noqa: E402

from aerialseg.datasets.isprs_files import find_tiles  # noqa: E402
from aerialseg.datasets.isprs_layout import POTSDAM, VAIHINGEN  # noqa: E402

MAIN = "ISPRS_semantic_labeling_Vaihingen"


def _shape(source: object) -> tuple[int, int]:
    path, member = source.path, source.member  # type: ignore[attr-defined]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)  # labels, nDSM JPEGs
        with rasterio.open(f"/vsizip/{path}/{member}" if member else path) as src:
            return src.height, src.width


def test_archives_are_found_with_the_official_names_and_sizes(tmp_path: Path) -> None:
    archives.write_potsdam(tmp_path / "potsdam", count=3, scale=0.02)
    tiles = find_tiles(tmp_path / "potsdam", POTSDAM)
    assert sorted(tiles) == sorted(archives.POTSDAM_ORDER[:3])
    side = archives.scaled((6000, 6000), 0.02)
    assert _shape(tiles["3_13"].files["rgbir"]) == side
    # 3_13's DSM and nDSM lack the last column, as the official files; the others are whole.
    assert _shape(tiles["3_13"].files["dsm"]) == (side[0], side[1] - 1)
    assert _shape(tiles["3_13"].files["ndsm"]) == (side[0], side[1] - 1)
    assert _shape(tiles["2_10"].files["dsm"]) == side

    areas = ("1", "38")
    archives.write_vaihingen(tmp_path / "vaihingen", scale=0.05, areas=areas)
    found = find_tiles(tmp_path / "vaihingen", VAIHINGEN)
    assert sorted(found) == sorted(areas)
    for area in areas:
        expected = archives.scaled(archives.VAIHINGEN_SIZES_PX[area], 0.05)
        assert _shape(found[area].files["irrg"]) == expected
        assert _shape(found[area].files["label_eroded"]) == expected


def test_rows_written_block_by_block_are_the_mirrored_scene(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Blocks smaller than the tile: the file must hold the same pixels as the scene mirrored whole.
    monkeypatch.setattr(archives, "BLOCK_ROWS", 50)
    archives.write_vaihingen(tmp_path, scale=0.1, areas=("17",))
    with zipfile.ZipFile(tmp_path / "ISPRS_semantic_labeling_Vaihingen.zip") as z:
        assert f"{MAIN}/top/top_mosaic_09cm_area17.tif" in z.namelist()
    shape = archives.scaled(archives.VAIHINGEN_SIZES_PX["17"], 0.1)
    tex = archives.texture(0, shape)
    member = f"{MAIN}.zip/{MAIN}/top/top_mosaic_09cm_area17.tif"
    with rasterio.open(f"/vsizip/{tmp_path}/{member}") as src:
        written = src.read()
    np.testing.assert_array_equal(written, tex.block(tex.irrg, 0, shape[0], shape[1]))
    # Mirrored, not wrapped: past the scene's last row comes its last row again, so no seam.
    still = archives.Texture(tex.irrg, tex.dsm, tex.label, tex.eroded, (0, 0))
    n = tex.label.shape[0]
    np.testing.assert_array_equal(still.index(0, 2 * n, 0), [*range(n), *range(n - 1, -1, -1)])


@pytest.mark.slow  # ~1 min: five stages in their own processes, torch and MLflow imported in each
def test_scaled_rehearsal_runs_every_stage_and_reports_them(tmp_path: Path) -> None:
    results = tmp_path / "out" / "rehearsal.json"
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "rehearsal.py"),
        *("--scale", "0.05", "--potsdam-counts", "3,4", "--vaihingen-areas", "1,3,30,2"),
        *("--patch-size", "64", "--encoder", "resnet18", "--train-steps", "1", "--num-workers", "0"),
        *("--workdir", str(tmp_path / "work"), "--results", str(results)),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(results.read_text())
    assert report["ok"]
    stages = {run["name"]: [s["name"] for s in run["stages"]] for run in report["runs"]}
    assert stages == {
        "vaihingen": ["generate", "tiles", "patches"],
        "potsdam-3": ["generate", "tiles", "patches"],
        "potsdam-4": ["generate", "tiles", "patches", "train", "evaluate"],
    }
    for run in report["runs"]:
        for stage in run["stages"]:
            assert stage["returncode"] == 0
            assert stage["wall_s"] > 0
            # A Python process with numpy and rasterio holds more than 50 MiB; 0 would mean unmeasured.
            assert stage["peak_rss_mib"] > 50
            assert stage["written_mib"] >= 0
    potsdam = next(r for r in report["runs"] if r["name"] == "potsdam-4")
    # The official split of what was written: 2_10 validates, 3_13 is the one test tile.
    assert potsdam["split"] == {"train": ["2_11", "2_12"], "val": ["2_10"], "test": ["3_13"]}
    # The tiles stage padded 3_13's nDSM by its missing column (dsm cols, rows, ndsm cols, rows);
    # the preset's bands have no dsm, so the DSM is not read.
    assert potsdam["heights_padded"] == {"3_13": [0, 0, 1, 0]}
    vaihingen = next(r for r in report["runs"] if r["name"] == "vaihingen")
    assert vaihingen["split"] == {"train": ["1", "3"], "val": ["30"], "test": ["2"]}
    table = results.with_suffix(".md").read_text()
    assert "| potsdam-4 | 4 |" in table and "evaluate" in table
    assert not (tmp_path / "work").exists()  # a run that passed leaves no scratch folder
