"""Every shipped real-data preset runs: `aerialseg preset <name>` then `dvc repro`, on fake official archives.

Issue 9: the shipped Potsdam preset could not run on any data (its unquoted `2_10` became 210, and
tile 3_13's DSM is a column short). Here each real-data preset is applied with the real entry point
in a copy of the project whose `data/raw/<dataset>/` holds the official archives, rebuilt by the
archive builders of tests/archive_builders.py with EVERY official tile id (an `official` split checks
them) and Potsdam 3_13's DSM and nDSM one column short, as in the real download. Only what a
CPU-only machine without internet needs is overridden afterwards (one epoch of one batch, a
ResNet18 encoder, no ImageNet weights, no TTA, a tiny `scenes` stage); every `data.*` key, the
split and the tile ids stay exactly as the preset wrote them. Tiles are as small as the preset's
`patches.size_px` allows, so each train tile gives one patch and each test tile one window.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import rasterio
import yaml
from archive_builders import (
    SourceTile,
    potsdam_downloads,
    potsdam_tiles,
    vaihingen_downloads,
    vaihingen_tiles,
    write_downloads,
)
from project_copy import COPIED, copy_project, run, set_params, stages_run
from ruamel.yaml import YAML

from aerialseg.classes import IGNORE_INDEX
from aerialseg.config import load_params
from aerialseg.datasets.isprs_layout import POTSDAM, VAIHINGEN, DatasetLayout

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
DISTINCT_SCENES = 4
"""Generated scenes per dataset, dealt out over its tile ids: a 512 px scene takes ~0.5 s to generate,
and 38 Potsdam tiles need not all differ to test that the split and the stages are right."""

# Only what a CPU without internet needs; nothing under data.*.
CPU_OVERRIDES: dict[str, dict[str, Any]] = {
    "synthetic": {"tiles": 3, "size_px": 128},  # the `scenes` stage still runs; the presets do not read it
    "model": {"encoder": "resnet18"},  # same architecture (fpn / fcn_skip), smaller encoder
    "train": {
        "epochs": 1,
        "limit_train_batches": 1,
        "batch_size": 2,
        "pretrained": "none",  # ImageNet weights cannot be downloaded here
    },
    "evaluate": {"tta": "none"},
}


@dataclass(frozen=True)
class Expected:
    """What a preset means: the dataset and the split tiles.csv must hold."""

    layout: DatasetLayout
    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]
    excluded: tuple[str, ...] = ()
    padded: tuple[str, ...] = ()
    """Tiles whose DSM and nDSM in the fake archives lack one column on the right."""


def _official_train(layout: DatasetLayout, *minus: str) -> tuple[str, ...]:
    return tuple(t for t in layout.official_train if t not in minus)


LECTURE_TRAIN = ("1", "3", "5", "7", "11", "13", "17", "21", "26", "28", "30", "32", "34")
EXPECTED = {
    "lecture": Expected(VAIHINGEN, LECTURE_TRAIN, ("37",), ("15", "23")),
    "benchmark-vaihingen": Expected(
        VAIHINGEN, _official_train(VAIHINGEN, "30"), ("30",), VAIHINGEN.official_test
    ),
    "benchmark-potsdam": Expected(
        POTSDAM,
        _official_train(POTSDAM, "2_10", "7_10"),
        ("2_10",),
        POTSDAM.official_test,
        excluded=("7_10",),
        padded=("3_13",),
    ),
}


def _fake_tiles(layout: DatasetLayout, size: int) -> list[SourceTile]:
    """A tile for every official id of `layout`, `size` px, from DISTINCT_SCENES generated scenes."""
    tile_ids = layout.official_train + layout.official_test
    make = potsdam_tiles if layout is POTSDAM else vaihingen_tiles
    scenes = make(size, tile_ids[:DISTINCT_SCENES])
    return [dataclasses.replace(scenes[i % len(scenes)], tile_id=t) for i, t in enumerate(tile_ids)]


def _write_archives(project: Path, expected: Expected, size: int) -> None:
    tiles = _fake_tiles(expected.layout, size)
    if expected.layout is POTSDAM:
        # As downloaded: 4_Ortho_RGBIR.zip (not the RGB + IRRG pair), 3_13's heights 5999 x 6000 px.
        short = {tile_id: (1, 0) for tile_id in expected.padded}
        downloads = potsdam_downloads(tiles, rgb_irrg=False, heights_short=short)
        write_downloads(project / "data/raw/potsdam", downloads, "zip")
    else:
        write_downloads(project / "data/raw/vaihingen", vaihingen_downloads(tiles), "zip")


def _override(params_path: Path, overrides: dict[str, dict[str, Any]]) -> None:
    """Set `overrides` in params.yaml with ruamel, keeping every other key and its quoting as written."""
    yaml_rt = YAML()
    yaml_rt.preserve_quotes = True
    # null as `null`, as params.yaml and `aerialseg preset` write it, not as an empty value.
    yaml_rt.representer.add_representer(
        type(None), lambda rep, _: rep.represent_scalar("tag:yaml.org,2002:null", "null")
    )
    params = yaml_rt.load(params_path.read_text())
    for section, values in overrides.items():
        assert section != "data", "the test must not change what the preset says about the data"
        for key, value in values.items():
            params[section][key] = value
    with params_path.open("w") as f:
        yaml_rt.dump(params, f)


def _data_section(params_path: Path) -> list[str]:
    """The text of params.yaml's `data:` section, comments and quotes included."""
    lines = params_path.read_text().splitlines()
    start = lines.index("data:")
    end = next(i for i in range(start + 1, len(lines)) if lines[i][:1].isalpha())
    return lines[start:end]


@dataclass(frozen=True)
class Ran:
    name: str
    project: Path
    expected: Expected
    repro_output: str


@pytest.fixture(scope="module", params=list(EXPECTED))
def ran(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Ran:
    name: str = request.param
    expected = EXPECTED[name]
    preset = yaml.safe_load((ROOT / "presets" / f"{name}.yaml").read_text())
    project = copy_project(tmp_path_factory.mktemp(name), params={}, names=(*COPIED, "presets"))
    _write_archives(project, expected, size=preset["patches"]["size_px"])
    run(project, "aerialseg", "preset", name)
    data_as_applied = _data_section(project / "params.yaml")
    _override(project / "params.yaml", CPU_OVERRIDES)
    set_params(project, {"train": {"num_workers": 0}})  # settings.yaml
    assert _data_section(project / "params.yaml") == data_as_applied
    result = run(project, "dvc", "repro", timeout=600)
    output = result.stdout + result.stderr
    every_stage = set(yaml.safe_load((project / "dvc.yaml").read_text())["stages"])
    assert every_stage >= {"scenes", "tiles", "patches", "train", "evaluate"}
    assert stages_run(output) == every_stage, output[-3000:]
    return Ran(name, project, expected, output)


def _table(ran: Ran) -> pd.DataFrame:
    return pd.read_csv(ran.project / "data/tiles/tiles.csv", dtype={"tile": str, "tile_id": str})


def test_tiles_csv_holds_the_split_the_preset_means(ran: Ran) -> None:
    table = _table(ran)
    expected = ran.expected
    split = {s: sorted(table.loc[table["split"] == s, "tile_id"]) for s in ("train", "val", "test")}
    assert split == {
        "train": sorted(expected.train),
        "val": sorted(expected.val),
        "test": sorted(expected.test),
    }
    assert not set(expected.excluded) & set(table["tile_id"])
    assert list(table["tile"]) == [expected.layout.tile_name(t) for t in table["tile_id"]]
    # 3_13's one-column-short nDSM (and DSM, where a band reads it) is padded and counted; no
    # other tile is. A file the preset's bands do not read counts 0 (tiles_table.TABLE_COLUMNS).
    bands = load_params(ran.project / "params.yaml").data.bands
    archive_ndsm = expected.layout is POTSDAM and "ndsm" in bands
    read = {
        "dsm_padded_cols": "dsm" in bands or ("ndsm" in bands and not archive_ndsm),
        "ndsm_padded_cols": archive_ndsm,
    }
    for column, is_read in read.items():
        padded = dict(zip(table["tile_id"], table[column], strict=True))
        assert padded == {t: int(is_read and t in expected.padded) for t in table["tile_id"]}, column
    assert (table[["dsm_padded_rows", "ndsm_padded_rows"]] == 0).all().all()
    if expected.padded:
        assert archive_ndsm, "the preset should read the padded nDSM"
        for tile_id in expected.padded:
            # The stage's output names the tile, the file, both sizes and what it did.
            padded_id = "_".join(f"{int(p):02d}" for p in tile_id.split("_"))
            message = (
                rf"{expected.layout.tile_name(tile_id)}: dsm_potsdam_{padded_id}_normalized_lastools\.jpg "
                r"is (\d+) x \d+ px, the orthophoto \d+ x \d+: last 1 column repeated"
            )
            assert re.search(message, ran.repro_output), message


def test_the_test_tiles_are_scored_whole(ran: Ran) -> None:
    """Every test tile, and only they, each pixel once: eroded reference for the headline, full beside."""
    project = ran.project
    metrics = json.loads((project / "reports/metrics.json").read_text())
    scores = json.loads((project / "reports/scores.json").read_text())
    test = _table(ran).query("split == 'test'")
    assert sorted(scores["tiles"]) == sorted(test["tile"])
    for row in test.itertuples():
        tile = scores["tiles"][row.tile]
        assert tile["tile_id"] == row.tile_id
        with rasterio.open(project / "data/tiles" / row.label_eroded) as src:
            assert tile["pixels"] == np.count_nonzero(src.read(1) != IGNORE_INDEX) > 0
        assert tile["full_reference"]["pixels"] == row.height * row.width
        with rasterio.open(project / "reports/predictions" / f"{row.tile}.tif") as pred:
            assert pred.shape == (row.height, row.width)
    assert metrics["pixels"] == scores["pixels"] == sum(t["pixels"] for t in scores["tiles"].values())
    assert scores["full_reference"]["pixels"] == int((test["height"] * test["width"]).sum())
    assert 0.0 <= metrics["overall_accuracy"] <= 1.0
    if ran.name == "lecture":
        # Tiles 15 and 23 next to the lecture's figures, on the full reference: every pixel of the tile.
        comparison = pd.read_csv(project / "reports/lecture_comparison.csv").query("figure == 'pixels'")
        assert dict(zip(comparison["tile"], comparison["ours"], strict=True)) == {
            row.tile: row.height * row.width for row in test.itertuples()
        }


def test_dvc_status_is_clean_afterwards(ran: Ran) -> None:
    status = run(ran.project, "dvc", "status", "--json").stdout
    assert json.loads(status) == {}, status


def test_dvc_reads_the_tile_ids_as_the_stage_does(ran: Ran) -> None:
    """`dvc params diff` and `dvc exp show` (DVC's YAML reader) see the ids the stage used."""
    project = ran.project
    stage = load_params(project / "params.yaml").data
    diff = json.loads(run(project, "dvc", "params", "diff", "--all", "--json").stdout)["params.yaml"]
    (workspace,) = (
        e for e in json.loads(run(project, "dvc", "exp", "show", "--json").stdout) if e["rev"] == "workspace"
    )
    shown = workspace["data"]["params"]["params.yaml"]["data"]["data"]
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]["tiles"]["params"]["params.yaml"]
    for key in ("train_tiles", "val_tiles", "test_tiles", "exclude_tiles"):
        meant = getattr(stage, key)
        # Vaihingen's plain numbers are numbers to every reader; anything else is a string ('2_10').
        as_yaml = None if meant is None else [int(t) if t.isdigit() else t for t in meant]
        # `params diff --json` prints a list as Python's repr: "['2_10']" (210 would be "[210]").
        seen = {
            "dvc params diff": _literal(diff[f"data.{key}"]["new"]),
            "dvc exp show": shown[key],
            "dvc.lock": lock["data"][key],
        }
        assert seen == dict.fromkeys(seen, as_yaml), (key, meant)
    if ran.expected.layout is POTSDAM:
        assert shown["val_tiles"] == ["2_10"] and shown["exclude_tiles"] == ["7_10"]


def _literal(text: str | None) -> Any:
    return None if text is None else ast.literal_eval(text)
