"""params.yaml -> validated, frozen configuration; every mistake names its key and value."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from aerialseg.choices import check_choices
from aerialseg.config import (
    NOT_RESULTS,
    SETTINGS_FILE,
    ConfigError,
    DataConfig,
    Params,
    TrainConfig,
    load_params,
    split_settings,
)
from aerialseg.datasets.errors import DatasetLayoutError
from aerialseg.datasets.isprs import assign_splits
from aerialseg.datasets.isprs_layout import POTSDAM
from aerialseg.datasets.tiles_table import read_tiles_table
from aerialseg.inference import BLENDS, TTA
from aerialseg.losses import LOSSES
from aerialseg.model import ARCHITECTURES
from aerialseg.optim import OPTIMIZERS, SCHEDULERS
from aerialseg.registry import Registry

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


def choice_error(tmp_path: Path, raw: dict[str, Any], key: str, value: Any) -> str:
    """The `params` stage's check of the choices (aerialseg.choices) on `raw` with `key` = `value`."""
    params = load_with(tmp_path, raw, key, value)
    with pytest.raises(ConfigError) as info:
        check_choices(params, source=str(tmp_path / "params.yaml"))
    return str(info.value)


def chosen(tmp_path: Path, raw: dict[str, Any], key: str, value: Any) -> Params:
    params = load_with(tmp_path, raw, key, value)
    check_choices(params)
    return params


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
    assert params.patches.size_px == project_raw["patches"]["size_px"]
    assert params.patches.overlap == project_raw["patches"]["overlap"]
    assert params.train.epochs == project_raw["train"]["epochs"]
    assert params.train.optimizer == project_raw["train"]["optimizer"]
    assert params.paths.tiles == Path(project_raw["paths"]["tiles"])
    assert params.raw_dir == Path(project_raw["data"]["raw_dir"])


def test_project_params_has_every_section(project_raw: dict[str, Any]) -> None:
    # dvc.yaml tracks params by section; a section left to its defaults would be invisible to DVC.
    # Every section but the one that is all settings (config.NOT_RESULTS, in settings.yaml).
    assert set(project_raw) == set(Params.model_fields) - set(NOT_RESULTS)


def test_project_settings_hold_every_setting_and_nothing_else() -> None:
    raw = yaml.safe_load(PROJECT_PARAMS.with_name(SETTINGS_FILE).read_text())
    assert split_settings(raw) == ({}, raw)
    keys = {f"{section}.{key}" for section, values in raw.items() for key in values}
    assert {k for k in NOT_RESULTS if "." in k} <= keys
    assert {k.partition(".")[0] for k in keys} == {n.partition(".")[0] for n in NOT_RESULTS}
    assert load_params(PROJECT_PARAMS).tracking.experiment == raw["tracking"]["experiment"]


@pytest.mark.parametrize(
    ("key", "named"),
    [
        ("train.num_workers", "train.num_workers"),
        ("train.resume", "train.resume"),
        ("tracking.alias", "tracking"),
    ],
)
def test_a_setting_in_params_yaml_is_one_line_naming_settings_yaml(
    tmp_path: Path, project_raw: dict[str, Any], key: str, named: str
) -> None:
    message = config_error(tmp_path, project_raw, key, 1)
    assert message == (
        f"{tmp_path / 'params.yaml'}: {named}: does not change results, so it belongs in "
        f"{tmp_path / SETTINGS_FILE} (move it there)"
    )


def test_a_param_in_settings_yaml_is_one_line_naming_params_yaml(
    tmp_path: Path, project_raw: dict[str, Any]
) -> None:
    (tmp_path / SETTINGS_FILE).write_text("train:\n  num_workers: 0\n  epochs: 3\ntrakcing: {}\n")
    message = config_error(tmp_path, project_raw, "train.seed", 1)
    assert message.splitlines() == [
        f"{tmp_path / SETTINGS_FILE}: {key}: not a setting (settings hold only "
        f"train.num_workers, train.resume, tracking); params go in {tmp_path / 'params.yaml'}"
        for key in ("train.epochs", "trakcing")
    ]


def test_a_bad_setting_names_settings_yaml(tmp_path: Path, project_raw: dict[str, Any]) -> None:
    (tmp_path / SETTINGS_FILE).write_text("train:\n  num_workers: -1\ntracking:\n  experimnt: x\n")
    message = config_error(tmp_path, project_raw, "train.epochs", 0)
    assert message.splitlines()[0] == f"{tmp_path / 'params.yaml'}: invalid parameters"
    assert f"{tmp_path / SETTINGS_FILE}: invalid parameters" in message.splitlines()
    assert "  train.num_workers: Input should be greater than or equal to 0 (got -1)" in message
    assert "  tracking.experimnt: unknown key (check its spelling)" in message


def test_settings_load_with_params_and_default_without_the_file(
    tmp_path: Path, project_raw: dict[str, Any]
) -> None:
    assert load_with(tmp_path, project_raw, "train.seed", 1).train.num_workers == TrainConfig().num_workers
    (tmp_path / SETTINGS_FILE).write_text("train:\n  num_workers: 5\ntracking:\n  experiment: mine\n")
    params = load_with(tmp_path, project_raw, "train.seed", 1)
    assert (params.train.num_workers, params.tracking.experiment, params.train.seed) == (5, "mine", 1)


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
    message = config_error(tmp_path, project_raw, "patches.size_px", value)
    assert "patches.size_px" in message
    assert str(value) in message
    assert "32" in message


@pytest.mark.parametrize("value", [32, 64, 512])
def test_patch_size_multiple_of_32(tmp_path: Path, project_raw: dict[str, Any], value: int) -> None:
    assert load_with(tmp_path, project_raw, "patches.size_px", value).patches.size_px == value


def test_unknown_optimizer_lists_allowed_values(tmp_path: Path, project_raw: dict[str, Any]) -> None:
    message = choice_error(tmp_path, project_raw, "train.optimizer", "foo")
    assert message == (
        f"{tmp_path / 'params.yaml'}: train.optimizer: 'foo' is not an optimizer; "
        "choose one of: adadelta, adagrad, adam, adamax, adamw, rmsprop, sgd"
    )


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_listed_optimizer_loads(tmp_path: Path, project_raw: dict[str, Any], name: str) -> None:
    assert chosen(tmp_path, project_raw, "train.optimizer", name).train.optimizer == name


@pytest.mark.parametrize(
    ("key", "value", "line"),
    [
        (
            "model.arch",
            "fpnn",
            "model.arch: 'fpnn' is not an architecture; choose one of: deeplabv3, deeplabv3plus, dpt, "
            "fcn_skip, fpn, linknet, manet, pan, pspnet, segformer, unet, unetplusplus, upernet",
        ),
        ("train.loss", "hinge", "train.loss: 'hinge' is not a loss; choose one of: ce, ce+dice, dice, focal"),
        (
            "evaluate.tta",
            "rot",
            "evaluate.tta: 'rot' is not a test-time augmentation; choose one of: d4, flip, none",
        ),
        (
            "evaluate.blend",
            "hann",
            "evaluate.blend: 'hann' is not a window blending; choose one of: cosine, gaussian, uniform",
        ),
        (
            "train.scheduler",
            "step",
            "train.scheduler: 'step' is not a scheduler; choose one of: cosine, none, onecycle, plateau",
        ),
    ],
)
def test_a_choice_not_in_its_registry_lists_the_options(
    tmp_path: Path, project_raw: dict[str, Any], key: str, value: str, line: str
) -> None:
    message = choice_error(tmp_path, project_raw, key, value)
    assert message == f"{tmp_path / 'params.yaml'}: {line}"


@pytest.mark.parametrize(
    ("key", "registry"),
    [
        ("model.arch", ARCHITECTURES),
        ("train.loss", LOSSES),
        ("train.scheduler", SCHEDULERS),
        ("evaluate.tta", TTA),
        ("evaluate.blend", BLENDS),
    ],
)
def test_every_registered_choice_loads(
    tmp_path: Path, project_raw: dict[str, Any], key: str, registry: Registry[Any]
) -> None:
    raw = copy.deepcopy(project_raw)
    raw["patches"]["size_px"] = 128  # pan's smallest input
    raw["train"]["class_weights"] = "none"
    for name in registry:
        # dpt needs a ViT encoder; every other architecture takes the default ResNet
        raw["model"]["encoder"] = "tu-vit_tiny_patch16_224" if name == "dpt" else "resnet50"
        section, leaf = key.split(".")
        assert getattr(getattr(chosen(tmp_path, raw, key, name), section), leaf) == name


def test_loading_params_imports_neither_torch_nor_smp(tmp_path: Path, project_raw: dict[str, Any]) -> None:
    # Every stage loads params.yaml: the registries' keys must come without their builders' imports.
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(project_raw))
    code = (
        "import sys; from aerialseg.config import load_params; load_params(sys.argv[1]); "
        "print(sorted({'torch', 'segmentation_models_pytorch', 'timm'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _checked(tmp_path: Path, raw: dict[str, Any]) -> str:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as info:
        check_choices(load_params(path), source=str(path))
    return str(info.value)


def test_unknown_encoder_names_close_matches(tmp_path: Path, project_raw: dict[str, Any]) -> None:
    raw = copy.deepcopy(project_raw)
    raw["model"]["encoder"] = "resnet5"
    message = _checked(tmp_path, raw)
    assert message.startswith(f"{tmp_path / 'params.yaml'}: model.encoder: 'resnet5' is not an smp encoder;")
    assert "did you mean one of: resnet50," in message and "\n" not in message
    raw["model"]["encoder"] = "tu-vit_tiny_patch1"
    assert "'tu-vit_tiny_patch1' is not a timm model; did you mean one of: tu-vit_tiny_patch16" in _checked(
        tmp_path, raw
    )


def test_dpt_needs_a_vit_encoder(tmp_path: Path, project_raw: dict[str, Any]) -> None:
    raw = copy.deepcopy(project_raw)
    raw["model"] = {"arch": "dpt", "encoder": "resnet50"}
    message = _checked(tmp_path, raw)
    assert message.endswith(
        "model.encoder: 'resnet50' does not fit dpt, which needs a timm ViT with 16 px patches, "
        "e.g. tu-vit_tiny_patch16_224, tu-deit_small_patch16_224"
    )
    raw["model"]["encoder"] = "tu-vit_tiny_patch16_224"
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    check_choices(load_params(path))


def test_patch_size_must_suit_the_architecture(tmp_path: Path, project_raw: dict[str, Any]) -> None:
    raw = copy.deepcopy(project_raw)
    raw["model"]["arch"] = "pan"
    message = choice_error(tmp_path, raw, "patches.size_px", 96)
    assert message == (
        f"{tmp_path / 'params.yaml'}: patches.size_px: input size 96 x 96 is smaller than 128 px on a "
        "side; pan: its encoder has output stride 16 and its feature pyramid attention pools that 8x further"
    )
    assert chosen(tmp_path, raw, "patches.size_px", 128).patches.size_px == 128


def test_class_weights_need_a_loss_with_cross_entropy(tmp_path: Path, project_raw: dict[str, Any]) -> None:
    raw = copy.deepcopy(project_raw)
    raw["train"]["class_weights"] = "inverse_frequency"
    message = choice_error(tmp_path, raw, "train.loss", "focal")
    assert "loss 'focal' has none (use ce or ce+dice, or class_weights none)" in message


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


# --------------------------------------------------------------------------------------
# Tile ids as written: YAML 1.1 reads an unquoted 2_10 as 210 and 02_13 as 139 (octal)

ROOT = PROJECT_PARAMS.parent


def params_with_line(tmp_path: Path, old: str, new: str) -> Path:
    """The project's params.yaml, as text, with one line changed: what a user types by hand."""
    text = PROJECT_PARAMS.read_text()
    lines = [line for line in text.splitlines() if line.lstrip().startswith(old)]
    assert len(lines) == 1, old
    path = tmp_path / "params.yaml"
    path.write_text(text.replace(lines[0], new))
    return path


def line_of(path: Path, start: str) -> int:
    return next(
        n for n, line in enumerate(path.read_text().splitlines(), 1) if line.lstrip().startswith(start)
    )


@pytest.mark.parametrize(
    ("written", "made", "as_written", "quoted"),
    [
        ("[2_10]", "210", "2_10", "['2_10']"),
        ("[02_13]", "139 (213 in DVC's reader)", "02_13", "['02_13']"),
        ("[6, 2_10]", "210", "2_10", "[6, '2_10']"),
    ],
)
def test_unquoted_tile_id_stops_with_one_clear_error(
    tmp_path: Path, written: str, made: str, as_written: str, quoted: str
) -> None:
    path = params_with_line(tmp_path, "val_tiles:", f"  val_tiles: {written}")
    with pytest.raises(ConfigError) as info:
        load_params(path)
    message = str(info.value)
    assert message == (
        f"{path}:{line_of(path, 'val_tiles:')}: data.val_tiles: YAML reads the unquoted tile id "
        f"{as_written} as {made}; quote tile ids that are not plain numbers: val_tiles: {quoted}"
    )


@pytest.mark.parametrize("key", ["train_tiles", "test_tiles", "exclude_tiles"])
def test_every_tile_id_key_is_checked(tmp_path: Path, key: str) -> None:
    # 1e3 is text to PyYAML but 1000.0 to DVC's YAML 1.2 reader; yes is True to PyYAML only.
    value, made = {
        "train_tiles": ("[1_0]", "1_0 as 10"),
        "test_tiles": ("[7, 8, 1e3]", "1e3 as 1000.0 in DVC's reader"),
        "exclude_tiles": ("[yes]", "yes as True"),
    }[key]
    path = params_with_line(tmp_path, f"{key}:", f"  {key}: {value}")
    with pytest.raises(ConfigError, match=rf"data\.{key}: YAML reads the unquoted tile id {made};"):
        load_params(path)


@pytest.mark.parametrize(
    ("written", "meant"),
    [("[6]", ("6",)), ("['2_10']", ("2_10",)), ('["02_13", 6]', ("02_13", "6")), ("[area6]", ("area6",))],
)
def test_quoted_ids_and_plain_numbers_load_as_written(
    tmp_path: Path, written: str, meant: tuple[str, ...]
) -> None:
    path = params_with_line(tmp_path, "val_tiles:", f"  val_tiles: {written}")
    assert load_params(path).data.val_tiles == meant


def test_unquoted_tile_id_stops_the_tiles_stage_with_one_line(tmp_path: Path) -> None:
    # The real stage script in a working directory whose params.yaml was edited by hand.
    path = params_with_line(tmp_path, "val_tiles:", "  val_tiles: [2_10]")
    result = subprocess.run(
        [sys.executable, str(ROOT / "pipeline" / "tiles.py")], cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode != 0
    expected = (
        f"params.yaml:{line_of(path, 'val_tiles:')}: data.val_tiles: YAML reads the unquoted tile id 2_10 "
        "as 210; quote tile ids that are not plain numbers: val_tiles: ['2_10']"
    )
    # One line naming the stage and the key, and how to see the traceback; no traceback.
    assert result.stderr.rstrip().splitlines() == [
        f"tiles: {expected}",
        "(AERIALSEG_TRACEBACK=1 shows the traceback)",
    ]
    assert not (tmp_path / "data").exists()
    # The traceback, on request.
    env = {**os.environ, "AERIALSEG_TRACEBACK": "1"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "pipeline" / "tiles.py")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode != 0
    assert "Traceback (most recent call last)" in result.stderr
    assert result.stderr.rstrip().splitlines()[-1] == f"aerialseg.config.ConfigError: {expected}"


# --------------------------------------------------------------------------------------
# Excluded tiles: left out of training and validation, never a test tile


def test_exclude_tiles_defaults_to_none(project_raw: dict[str, Any]) -> None:
    assert project_raw["data"]["exclude_tiles"] == []
    assert load_params(PROJECT_PARAMS).data.exclude_tiles == ()


@pytest.mark.parametrize("key", ["data.val_tiles", "data.test_tiles"])
def test_excluding_a_val_or_test_tile_is_an_error(
    tmp_path: Path, project_raw: dict[str, Any], key: str
) -> None:
    raw = copy.deepcopy(project_raw)
    raw["data"]["exclude_tiles"] = [1, 7 if key == "data.test_tiles" else 6]
    message = config_error(tmp_path, raw, "data.split", "custom")
    assert "data.exclude_tiles" in message and key in message
    assert "test tiles cannot be excluded" in message


def test_tiles_stage_leaves_excluded_tiles_out(
    tmp_path: Path, project_raw: dict[str, Any], synthetic_raw: Path
) -> None:
    # The real stage script, with a params.yaml in its working directory.
    raw = copy.deepcopy(project_raw)
    raw["paths"]["tiles"] = "tiles"
    raw["data"].update(raw_dir=str(synthetic_raw), val_tiles=[3], test_tiles=[4], exclude_tiles=[2])
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    result = subprocess.run(
        [sys.executable, str(ROOT / "pipeline" / "tiles.py")], cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    table = read_tiles_table(tmp_path / "tiles")
    assert dict(zip(table["tile_id"], table["split"], strict=True)) == {"1": "train", "3": "val", "4": "test"}
    assert not list((tmp_path / "tiles").glob("area2_*"))


def test_excluded_tile_must_exist(data_config: DataConfig) -> None:
    data = data_config.model_copy(update={"exclude_tiles": ("9",)})
    with pytest.raises(DatasetLayoutError, match=r"data\.exclude_tiles \[9\]: no such Vaihingen tiles"):
        assign_splits(["1", "2", "3", "4"], data)


def test_excluding_an_official_test_tile_is_an_error() -> None:
    data = DataConfig(
        source="potsdam",
        raw_dir=Path("x"),
        bands=("r",),
        split="official",
        val_tiles=("2_10",),
        exclude_tiles=("02_13",),
    )
    with pytest.raises(
        DatasetLayoutError, match=r"data\.exclude_tiles: 2_13 is an official Potsdam test tile"
    ):
        assign_splits([*POTSDAM.official_train, *POTSDAM.official_test], data)


@pytest.mark.parametrize(
    ("section", "new"), [("patches", "patches.size_px"), ("synthetic", "synthetic.size_px")]
)
def test_an_old_size_key_says_what_it_is_called_now(tmp_path: Path, section: str, new: str) -> None:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw[section]["size"] = 64
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=rf"{section}\.size: renamed to {new} \(DVC's run cache"):
        load_params(path)


def _check_params_stage(folder: Path) -> list[str]:
    """stderr lines of the `params` stage's script run in `folder` (its params.yaml), which must fail."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root / "src")}
    env.pop("AERIALSEG_TRACEBACK", None)
    done = subprocess.run(
        [sys.executable, str(root / "pipeline" / "check_params.py")],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    return done.stderr.strip().splitlines()


def test_params_that_are_not_yaml_are_one_line_with_the_position(tmp_path: Path) -> None:
    text = PROJECT_PARAMS.read_text().replace("  epochs: 12\n", "  epochs: 12\n lr: [0.1\n", 1)
    (tmp_path / "params.yaml").write_text(text)
    line = _check_params_stage(tmp_path)[0]
    assert line.startswith("check_params: params.yaml:"), line
    assert ": not valid YAML: " in line and "^" not in line


def test_a_key_written_twice_is_refused_with_both_lines(tmp_path: Path) -> None:
    text = PROJECT_PARAMS.read_text().replace("  epochs: 12\n", "  epochs: 12\n  lr: 0.1\n", 1)
    (tmp_path / "params.yaml").write_text(text)
    numbered = list(enumerate(text.splitlines(), start=1))
    first, second = sorted(n for n, line in numbered if line.startswith("  lr: "))
    assert _check_params_stage(tmp_path)[0] == (
        f"check_params: params.yaml:{second}: train.lr: written twice (also on line {first}); "
        "YAML keeps only the last value: remove one"
    )
