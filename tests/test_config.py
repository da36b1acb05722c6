"""params.yaml -> validated, frozen configuration; every mistake names its key and value."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, get_args

import pytest
import yaml
from pydantic import ValidationError

from aerialseg.config import ConfigError, Optimizer, Params, load_params

PROJECT_PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


@pytest.fixture(scope="module")
def project_raw() -> dict[str, Any]:
    raw = yaml.safe_load(PROJECT_PARAMS.read_text())
    assert isinstance(raw, dict)
    return raw


def load_with(tmp_path: Path, raw: dict[str, Any], key: str, value: Any) -> Params:
    """Set the dotted `key` of a copy of `raw` to `value`, write it and load it."""
    raw = copy.deepcopy(raw)
    *parents, leaf = key.split(".")
    section = raw
    for part in parents:
        section = section.setdefault(part, {})
    section[leaf] = value
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_params(path)


def config_error(tmp_path: Path, raw: dict[str, Any], key: str, value: Any) -> str:
    with pytest.raises(ConfigError) as info:
        load_with(tmp_path, raw, key, value)
    return str(info.value)


# --------------------------------------------------------------------------------------
# The project's own params.yaml


def test_project_params_load(project_raw: dict[str, Any]) -> None:
    params = load_params(PROJECT_PARAMS)
    assert isinstance(params, Params)
    # Values come from the file, not from the model defaults.
    assert params.data.bands == tuple(project_raw["data"]["bands"])
    # Tile ids are text: Vaihingen areas are numbers, Potsdam tiles look like "2_10".
    assert params.data.val_tiles == tuple(str(t) for t in project_raw["data"]["val_tiles"])
    assert params.data.test_tiles == tuple(str(t) for t in project_raw["data"]["test_tiles"])
    assert params.patches.size == project_raw["patches"]["size"]
    assert params.patches.overlap == project_raw["patches"]["overlap"]
    assert params.train.epochs == project_raw["train"]["epochs"]
    assert params.train.optimizer == project_raw["train"]["optimizer"]
    assert params.paths.tiles == Path(project_raw["paths"]["tiles"])
    assert params.raw_dir == Path(project_raw["data"]["raw_dir"])


def test_project_params_has_every_section(project_raw: dict[str, Any]) -> None:
    # dvc.yaml tracks params by section; a section left to its defaults would be invisible to DVC.
    assert set(project_raw) == set(Params.model_fields)


def test_one_changed_value_changes_only_that_value(tmp_path: Path, project_raw: dict[str, Any]) -> None:
    original = load_params(PROJECT_PARAMS)
    changed = load_with(tmp_path, project_raw, "train.epochs", original.train.epochs + 1)
    assert changed.train.epochs == original.train.epochs + 1
    assert changed != original
    assert changed.model_copy(update={"train": original.train}) == original


# --------------------------------------------------------------------------------------
# Unknown keys


@pytest.mark.parametrize(
    "key",
    ["train.epohcs", "patches.sise", "data.bandz", "evaluate.tta_flips", "paths.tile", "trian"],
)
def test_unknown_key_names_its_full_path(tmp_path: Path, project_raw: dict[str, Any], key: str) -> None:
    message = config_error(tmp_path, project_raw, key, 1)
    assert f"{key}: unknown key" in message
    assert str(tmp_path / "params.yaml") in message


# --------------------------------------------------------------------------------------
# Bad values


@pytest.mark.parametrize("value", [1.0, -0.1, 1.5])
def test_bad_patch_overlap(tmp_path: Path, project_raw: dict[str, Any], value: float) -> None:
    message = config_error(tmp_path, project_raw, "patches.overlap", value)
    assert "patches.overlap" in message
    assert repr(value) in message


def test_bad_evaluate_overlap(tmp_path: Path, project_raw: dict[str, Any]) -> None:
    message = config_error(tmp_path, project_raw, "evaluate.overlap", 1.0)
    assert "evaluate.overlap" in message and "1.0" in message


@pytest.mark.parametrize("value", [0.0, 0.5, 0.9])
def test_good_patch_overlap(tmp_path: Path, project_raw: dict[str, Any], value: float) -> None:
    assert load_with(tmp_path, project_raw, "patches.overlap", value).patches.overlap == value


@pytest.mark.parametrize("value", [100, 48, 250])
def test_patch_size_not_multiple_of_32(tmp_path: Path, project_raw: dict[str, Any], value: int) -> None:
    message = config_error(tmp_path, project_raw, "patches.size", value)
    assert "patches.size" in message
    assert str(value) in message
    assert "32" in message


@pytest.mark.parametrize("value", [32, 64, 512])
def test_patch_size_multiple_of_32(tmp_path: Path, project_raw: dict[str, Any], value: int) -> None:
    assert load_with(tmp_path, project_raw, "patches.size", value).patches.size == value


def test_unknown_optimizer_lists_allowed_values(tmp_path: Path, project_raw: dict[str, Any]) -> None:
    message = config_error(tmp_path, project_raw, "train.optimizer", "foo")
    assert "train.optimizer" in message
    assert "'foo'" in message
    allowed = get_args(Optimizer)
    assert len(allowed) == 7
    for name in allowed:
        assert f"'{name}'" in message


@pytest.mark.parametrize("name", get_args(Optimizer))
def test_every_listed_optimizer_loads(tmp_path: Path, project_raw: dict[str, Any], name: str) -> None:
    assert load_with(tmp_path, project_raw, "train.optimizer", name).train.optimizer == name


def test_duplicate_band(tmp_path: Path, project_raw: dict[str, Any]) -> None:
    message = config_error(tmp_path, project_raw, "data.bands", ["ir", "r", "ir"])
    assert "data.bands" in message
    assert "['ir', 'r', 'ir']" in message
    assert "twice" in message


def test_unknown_band(tmp_path: Path, project_raw: dict[str, Any]) -> None:
    message = config_error(tmp_path, project_raw, "data.bands", ["ir", "r", "g", "nir"])
    assert "data.bands" in message
    assert "'nir'" in message
    for band in ("ir", "r", "g", "dsm"):
        assert f"'{band}'" in message


def test_no_band(tmp_path: Path, project_raw: dict[str, Any]) -> None:
    message = config_error(tmp_path, project_raw, "data.bands", [])
    assert "data.bands" in message


def test_band_subset_keeps_its_order(tmp_path: Path, project_raw: dict[str, Any]) -> None:
    assert load_with(tmp_path, project_raw, "data.bands", ["dsm", "g"]).data.bands == ("dsm", "g")


def test_tile_in_both_val_and_test(tmp_path: Path, project_raw: dict[str, Any]) -> None:
    raw = copy.deepcopy(project_raw)
    raw["data"]["val_tiles"] = [5, 7]
    message = config_error(tmp_path, raw, "data.test_tiles", [7, 8])
    assert "val_tiles" in message and "test_tiles" in message
    assert "['7']" in message


@pytest.mark.parametrize("key", ["data.val_tiles", "data.test_tiles"])
def test_empty_val_or_test_tiles(tmp_path: Path, project_raw: dict[str, Any], key: str) -> None:
    message = config_error(tmp_path, project_raw, key, [])
    assert key in message


@pytest.mark.parametrize(
    ("key", "value"),
    [("train.epochs", 0), ("train.lr", 0), ("train.batch_size", -1), ("synthetic.tiles", 2)],
)
def test_out_of_range_numbers(tmp_path: Path, project_raw: dict[str, Any], key: str, value: int) -> None:
    message = config_error(tmp_path, project_raw, key, value)
    assert f"{key}:" in message
    assert f"(got {value!r})" in message


def test_missing_data_section(tmp_path: Path, project_raw: dict[str, Any]) -> None:
    raw = copy.deepcopy(project_raw)
    del raw["data"]
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"data: Field required"):
        load_params(path)


# --------------------------------------------------------------------------------------
# Unreadable files


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "params.yaml"
    with pytest.raises(ConfigError) as info:
        load_params(path)
    assert str(path) in str(info.value)
    assert "does not exist" in str(info.value)


@pytest.mark.parametrize("text", ["- data\n- train\n", "just a string\n", "42\n", ""])
def test_non_mapping_yaml_names_the_path(tmp_path: Path, text: str) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_params(path)
    assert str(path) in str(info.value)
    assert "mapping" in str(info.value)


def test_invalid_yaml_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("data: [ir, r\ntrain: {epochs: 3\n")
    with pytest.raises(ConfigError) as info:
        load_params(path)
    assert str(path) in str(info.value)


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


# --------------------------------------------------------------------------------------
# Frozen


def test_params_are_frozen() -> None:
    params = load_params(PROJECT_PARAMS)
    with pytest.raises(ValidationError):
        params.train.epochs = 1  # type: ignore[misc]
    with pytest.raises(ValidationError):
        params.patches = params.patches  # type: ignore[misc]
    with pytest.raises(ValidationError):
        params.data.bands = ("ir",)  # type: ignore[misc]
    assert params.train == load_params(PROJECT_PARAMS).train
