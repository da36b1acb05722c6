"""Presets switch params.yaml to a named setup and back, keeping the user's comments."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from dvc.fs import LocalFileSystem
from dvc.utils.serialize import load_path as dvc_load_path
from ruamel.yaml import YAML
from typer.testing import CliRunner

from aerialseg.cli import app
from aerialseg.config import TILE_ID_KEYS, ConfigError, load_params
from aerialseg.datasets.isprs import assign_splits
from aerialseg.datasets.isprs_layout import POTSDAM
from aerialseg.presets import apply_preset, available

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ROOT / "presets"


@pytest.fixture
def params_file(tmp_path: Path) -> Path:
    return Path(shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml"))


def test_the_documented_presets_exist() -> None:
    assert {"synthetic", "lecture", "benchmark-vaihingen", "benchmark-potsdam"} <= set(available(PRESETS))


def test_lecture_preset_is_the_lectures_setup(params_file: Path) -> None:
    apply_preset("lecture", params_file, PRESETS)
    params = load_params(params_file)
    assert params.data.source == "vaihingen" and params.data.bands == ("ir", "r", "g")
    assert params.data.test_tiles == ("15", "23")
    assert params.patches.size_px == 256 and params.patches.overlap == 0.6
    assert params.train.epochs == 20 and params.train.augment
    assert params.model.arch == "fcn_skip" and params.model.encoder == "resnet50"
    # Settings no preset touches stay as the user had them, comments included.
    assert params.train.num_workers == load_params(ROOT / "params.yaml").train.num_workers
    assert "# multiple of 32" in params_file.read_text()


@pytest.mark.parametrize(
    ("name", "source", "bands"),
    [
        ("benchmark-vaihingen", "vaihingen", ("ir", "r", "g", "ndsm")),
        ("benchmark-potsdam", "potsdam", ("r", "g", "b", "ir", "ndsm")),
    ],
)
def test_benchmark_presets_use_the_official_split(
    params_file: Path, name: str, source: str, bands: tuple[str, ...]
) -> None:
    apply_preset(name, params_file, PRESETS)
    params = load_params(params_file)
    assert params.data.source == source and params.data.bands == bands
    assert params.data.split == "official" and params.data.test_tiles == ()


@pytest.mark.parametrize("name", ["lecture", "benchmark-vaihingen", "benchmark-potsdam", "ci"])
def test_synthetic_preset_restores_the_default(params_file: Path, name: str) -> None:
    default = load_params(params_file)
    apply_preset(name, params_file, PRESETS)
    assert load_params(params_file) != default
    apply_preset("synthetic", params_file, PRESETS)
    assert load_params(params_file) == default


def test_a_bad_preset_leaves_params_untouched(params_file: Path, tmp_path: Path) -> None:
    presets = tmp_path / "presets"
    presets.mkdir()
    (presets / "typo.yaml").write_text("train:\n  epohcs: 3\n")
    before = params_file.read_text()
    with pytest.raises(ConfigError, match=r"train\.epohcs"):
        apply_preset("typo", params_file, presets)
    with pytest.raises(ConfigError, match="available: typo"):
        apply_preset("missing", params_file, presets)
    assert params_file.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml", "presets"]


# --------------------------------------------------------------------------------------
# Tile ids survive YAML: what the preset means reaches the split, and every reader agrees

TILE_IDS_MEANT: dict[str, dict[str, tuple[str, ...] | None]] = {
    "synthetic": {"train_tiles": None, "val_tiles": ("6",), "test_tiles": ("7", "8"), "exclude_tiles": ()},
    "ci": {"train_tiles": None, "val_tiles": ("3",), "test_tiles": ("4",), "exclude_tiles": ()},
    "lecture": {
        "train_tiles": tuple(str(a) for a in (1, 3, 5, 7, 11, 13, 17, 21, 26, 28, 30, 32, 34)),
        "val_tiles": ("37",),
        "test_tiles": ("15", "23"),
        "exclude_tiles": (),
    },
    "benchmark-vaihingen": {"train_tiles": None, "val_tiles": ("30",), "test_tiles": (), "exclude_tiles": ()},
    "benchmark-potsdam": {
        "train_tiles": None,
        "val_tiles": ("2_10",),
        "test_tiles": (),
        "exclude_tiles": ("7_10",),  # known label errors
    },
}
"""The tile ids each shipped preset means, written out by hand (not read with any YAML reader)."""


def project_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, presets: Path = PRESETS) -> Path:
    """params.yaml and presets/ in tmp_path, which becomes the working directory."""
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    shutil.copytree(presets, tmp_path / "presets")
    monkeypatch.chdir(tmp_path)
    return tmp_path / "params.yaml"


def run_preset_command(name: str) -> None:
    result = CliRunner().invoke(app, ["preset", name])
    assert result.exit_code == 0, result.output


def tile_ids_by_reader(params_path: Path) -> dict[str, dict[str, object]]:
    """data.<tile-id key> as PyYAML (load_params), ruamel's round trip and DVC's reader see them."""
    dvc_view = dvc_load_path(str(params_path), LocalFileSystem())  # what `dvc params diff` reads
    return {
        "pyyaml": {key: yaml.safe_load(params_path.read_text())["data"][key] for key in TILE_ID_KEYS},
        "ruamel": {key: YAML().load(params_path.read_text())["data"][key] for key in TILE_ID_KEYS},
        "dvc": {key: dvc_view["data"][key] for key in TILE_ID_KEYS},
    }


def test_every_preset_sets_every_tile_id_key() -> None:
    # A key a preset leaves out keeps the previous preset's tiles (Potsdam's 7_10 in a Vaihingen run).
    for name in available(PRESETS):
        data = yaml.safe_load((PRESETS / f"{name}.yaml").read_text())["data"]
        assert set(TILE_ID_KEYS) <= set(data), name


@pytest.mark.parametrize("name", available(PRESETS))
def test_each_preset_applied_with_the_command_reaches_the_split_as_meant(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    params_path = project_copy(tmp_path, monkeypatch)
    assert name in TILE_IDS_MEANT, f"add the tile ids preset {name!r} means to TILE_IDS_MEANT"
    run_preset_command(name)
    data = load_params(params_path).data
    for key, meant in TILE_IDS_MEANT[name].items():
        assert getattr(data, key) == meant, key
    # PyYAML (the stages), ruamel (`aerialseg preset`) and DVC (`dvc params diff`, `dvc exp show`)
    # read the very same values: '2_10' is a string to all three, 15 a number to all three.
    views = tile_ids_by_reader(params_path)
    assert views["pyyaml"] == views["ruamel"] == views["dvc"]
    for key, meant in TILE_IDS_MEANT[name].items():
        seen = views["dvc"][key]
        assert (None if seen is None else tuple(str(v) for v in seen)) == meant, key  # type: ignore[attr-defined]


def test_preset_quotes_tile_ids_whatever_the_preset_file_says(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A preset written by hand with the ids unquoted: taken as written, not as YAML reads them.
    presets = tmp_path / "mine"
    presets.mkdir()
    (presets / "potsdam-unquoted.yaml").write_text(
        "data:\n  source: potsdam\n  raw_dir: data/raw/potsdam\n  bands: [r, g, b]\n  split: custom\n"
        "  train_tiles: null\n  val_tiles: [2_10]\n  test_tiles: [02_13, 2_14]\n  exclude_tiles: [7_10]\n"
    )
    params_path = project_copy(tmp_path, monkeypatch, presets)
    run_preset_command("potsdam-unquoted")
    text = params_path.read_text()
    assert "val_tiles: ['2_10']" in text
    assert "test_tiles: ['02_13', '2_14']" in text
    assert "exclude_tiles: ['7_10']" in text
    data = load_params(params_path).data
    assert (data.val_tiles, data.test_tiles, data.exclude_tiles) == (("2_10",), ("02_13", "2_14"), ("7_10",))
    views = tile_ids_by_reader(params_path)
    assert views["pyyaml"] == views["ruamel"] == views["dvc"]


def test_potsdam_preset_split_holds_out_2_10_and_leaves_out_7_10(params_file: Path) -> None:
    apply_preset("benchmark-potsdam", params_file, PRESETS)
    data = load_params(params_file).data
    splits = assign_splits([*POTSDAM.official_train, *POTSDAM.official_test], data)
    assert "7_10" not in splits
    assert [tile for tile, split in splits.items() if split == "val"] == ["2_10"]
    assert sorted(tile for tile, split in splits.items() if split == "train") == sorted(
        set(POTSDAM.official_train) - {"2_10", "7_10"}
    )
    assert sorted(tile for tile, split in splits.items() if split == "test") == sorted(POTSDAM.official_test)
