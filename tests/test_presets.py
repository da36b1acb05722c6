"""Presets switch params.yaml to a named setup and back, keeping the user's comments."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from aerialseg.config import ConfigError, load_params
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
    assert params.patches.size == 256 and params.patches.overlap == 0.6
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


@pytest.mark.parametrize("name", ["lecture", "benchmark-vaihingen", "benchmark-potsdam"])
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
