"""params.yaml (+ settings.yaml beside it) -> frozen, validated configuration objects.

Every section forbids unknown keys, so a typo fails at load with the key's full path
instead of being silently ignored. What can change a result is in params.yaml (DVC's params
file); how this checkout runs (loader workers, resume, MLflow names) is in settings.yaml
(`NOT_RESULTS`); both load into one `Params`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Self

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

SPECTRAL_BANDS = ("ir", "r", "g", "b")
"""Bands that hold reflectance: photometric augmentation touches these and nothing else."""
HEIGHT_BANDS = ("dsm", "ndsm")
Band = Literal["ir", "r", "g", "b", "dsm", "ndsm"]
Source = Literal["synthetic", "vaihingen", "potsdam"]
SOURCE_BANDS: dict[str, tuple[str, ...]] = {
    "synthetic": ("ir", "r", "g", "dsm", "ndsm"),
    "vaihingen": ("ir", "r", "g", "dsm", "ndsm"),
    "potsdam": ("r", "g", "b", "ir", "dsm", "ndsm"),
}
"""The bands each dataset has (nDSM derived from the DSM where the archive lacks it)."""

Precision = Literal["auto", "32", "bf16-mixed", "16-mixed"]


NOT_RESULTS = ("train.num_workers", "train.resume", "tracking")
"""Keys (or whole sections) that cannot change a result. They live in settings.yaml, not in
params.yaml: no stage names them in dvc.yaml (tests/test_dvc_yaml.py checks that every other key is
named), and the `params` check stage depends on the whole of params.yaml (to catch a misspelt
section), so one of them in params.yaml would make `dvc status` report a change that reruns nothing."""

SETTINGS_FILE = "settings.yaml"
"""The file of the `NOT_RESULTS` keys, beside params.yaml; optional (defaults without it). Not a
DVC params file: editing it reruns no stage and leaves `dvc status` clean."""


RENAMED = {"patches.size": "patches.size_px", "synthetic.size": "synthetic.size_px"}
"""Keys of older params.yaml files and their names now, for the error that says so."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PathsConfig(_Section):
    raw: Path = Path("data/raw")
    tiles: Path = Path("data/tiles")
    patches: Path = Path("data/patches")
    models: Path = Path("models")
    reports: Path = Path("reports")


class SyntheticConfig(_Section):
    """Procedural Vaihingen-like scenes, written in the official Vaihingen layout."""

    tiles: Annotated[int, Field(ge=3)] = 8
    size_px: Annotated[int, Field(ge=64)] = 512
    """Side of each square area, px."""
    seed: Annotated[int, Field(ge=0)] = 0


TILE_ID_KEYS = ("train_tiles", "val_tiles", "test_tiles", "exclude_tiles")
"""The keys of `data` that list tile ids (Vaihingen areas such as 15, Potsdam tiles such as '2_10')."""


class DataConfig(_Section):
    source: Source = "synthetic"
    raw_dir: Path = Path("data/raw/synthetic")
    """Where the official zips or extracted folders are (the `scenes` stage writes data/raw/synthetic)."""
    bands: tuple[Band, ...] = ("ir", "r", "g", "dsm")
    split: Literal["custom", "official"] = "custom"
    """official: the benchmark's train/test areas (val_tiles held out of train); custom: the lists below."""
    train_tiles: tuple[str, ...] | None = None
    """custom split only; null = every tile not in val_tiles or test_tiles."""
    val_tiles: tuple[str, ...] = ()
    test_tiles: tuple[str, ...] = ()
    exclude_tiles: tuple[str, ...] = ()
    """Tiles left out of training and validation (e.g. Potsdam 7_10, known label errors); never test tiles."""
    colour_tolerance: Annotated[int, Field(ge=0, le=64)] = 0
    """Label colours within this distance (max over R, G, B) of a legend colour are snapped to it."""

    @field_validator(*TILE_ID_KEYS, mode="before")
    @classmethod
    def _tile_ids_as_text(cls, value: object) -> object:
        # Vaihingen areas are numbers (15), Potsdam tiles are "2_10": one type for both.
        if isinstance(value, list | tuple):
            return tuple(str(v) for v in value)
        return value

    @model_validator(mode="after")
    def _check(self) -> Self:
        if not self.bands:
            raise ValueError("data.bands: choose at least one of " + ", ".join(SOURCE_BANDS[self.source]))
        if len(set(self.bands)) != len(self.bands):
            raise ValueError(f"data.bands: {list(self.bands)} lists a band twice")
        unknown = [b for b in self.bands if b not in SOURCE_BANDS[self.source]]
        if unknown:
            raise ValueError(
                f"data.bands: {unknown} not available in {self.source}; "
                f"choose from {list(SOURCE_BANDS[self.source])}"
            )
        overlap = set(self.val_tiles) & set(self.test_tiles)
        if overlap:
            raise ValueError(f"data: tiles {sorted(overlap)} are in both val_tiles and test_tiles")
        if not self.val_tiles:
            raise ValueError("data.val_tiles must name at least one tile (whole tiles, held out of training)")
        if self.split == "custom" and not self.test_tiles:
            raise ValueError("data.test_tiles must name at least one tile when data.split is custom")
        if self.split == "official" and (self.test_tiles or self.train_tiles is not None):
            raise ValueError(
                "data.split official uses the benchmark's own train/test areas: "
                "leave data.train_tiles null and data.test_tiles empty"
            )
        if self.train_tiles is not None:
            clash = set(self.train_tiles) & (set(self.val_tiles) | set(self.test_tiles))
            if clash:
                raise ValueError(f"data.train_tiles: {sorted(clash)} also in val_tiles or test_tiles")
        for key in ("train_tiles", "val_tiles", "test_tiles"):
            clash = set(self.exclude_tiles) & set(getattr(self, key) or ())
            if clash:
                # Excluding a test tile would change what the reported figure means; a val or
                # train tile both used and excluded is a contradiction. Either way: say so.
                raise ValueError(
                    f"data.exclude_tiles: {sorted(clash)} also in data.{key}; excluded tiles are left "
                    "out of training and validation, and test tiles cannot be excluded"
                )
        return self


class PatchesConfig(_Section):
    size_px: Annotated[int, Field(gt=0)] = 256
    """Side of each square patch (and of the inference window), px."""
    overlap: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.5

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.size_px % 32:
            raise ValueError(
                f"patches.size_px: {self.size_px} is not a multiple of 32 (the encoder downsamples 32x)"
            )
        return self


# Choices (model.arch, train.optimizer, .scheduler, .loss, evaluate.tta, .blend) are plain strings
# here, checked against the registries beside the code that builds them by aerialseg.choices (the
# `params` stage, and train and evaluate before they start): importing the registries here would make
# every stage a DVC dependant of the model and training code.


class ModelConfig(_Section):
    arch: str = "fpn"
    """A key of model.ARCHITECTURES: smp's architectures (fpn by default, unet, deeplabv3plus, ...)
    or fcn_skip, the lecture's ResNet FCN with skip fusion."""
    encoder: str = "resnet50"
    """An smp encoder, or a timm model as tu-<name>, that fits the architecture
    (model.encoder_problem, checked by the `params` stage)."""


class TrainConfig(_Section):
    epochs: Annotated[int, Field(ge=1)] = 10
    batch_size: Annotated[int, Field(ge=1)] = 8
    lr: Annotated[float, Field(gt=0)] = 1e-3
    weight_decay: Annotated[float, Field(ge=0)] = 1e-4
    optimizer: str = "adamw"
    """A key of optim.OPTIMIZERS (the error for another value lists them)."""
    augment: bool = True
    pretrained: str = "none"
    """`none`, `imagenet`, or the path of a local weights file for the encoder."""
    seed: int = 0
    precision: Precision = "auto"
    accelerator: Literal["auto", "cpu", "gpu"] = "auto"
    devices: int | Literal["auto"] = 1
    num_workers: Annotated[int, Field(ge=0)] = 2
    limit_train_batches: Annotated[int, Field(ge=1)] | None = None
    """Cap on batches per epoch (tests and smoke runs); null uses every patch."""
    strategy: Literal["auto", "ddp"] = "auto"
    """ddp: one process per device (gloo on CPU, NCCL on GPUs); only rank 0 writes files and MLflow."""
    num_nodes: Annotated[int, Field(ge=1)] = 1
    deterministic: bool = False
    """Deterministic kernels: two CPU runs with the same seed give bit-identical weights."""
    compile: bool = False
    """torch.compile the network (the checkpoints hold the plain network's weights)."""
    resume: bool = False
    """Continue from <models>/checkpoints/last.ckpt, and its MLflow run, when that file exists."""
    loss: str = "ce"
    """A key of losses.LOSSES (the error for another value lists them)."""
    class_weights: Literal["none", "inverse_frequency"] | tuple[Annotated[float, Field(ge=0)], ...] = "none"
    """Weights of the cross-entropy part: none, inverse_frequency (of the train masks), or one per class."""
    scheduler: str = "none"
    """A key of optim.SCHEDULERS (the error for another value lists them)."""
    early_stopping_patience: Annotated[int, Field(ge=1)] | None = None
    """Stop after this many epochs without a better val_mean_f1; null never stops early."""

    @field_validator("devices")
    @classmethod
    def _devices(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:  # Lightning's -1 (all) is "auto" here
            raise ValueError("expected a number of devices >= 1, or auto")
        return value

    @model_validator(mode="after")
    def _check(self) -> Self:
        from aerialseg.classes import NUM_CLASSES

        if isinstance(self.class_weights, tuple):
            if len(self.class_weights) != NUM_CLASSES:
                raise ValueError(
                    f"train.class_weights: {len(self.class_weights)} values given, "
                    f"expected one per class ({NUM_CLASSES})"
                )
            if not any(self.class_weights):
                raise ValueError("train.class_weights: at least one weight must be positive")
        return self


class EvaluateConfig(_Section):
    """The sliding window of `evaluate` (and of whole-tile validation: overlap, tta, blend)."""

    overlap: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.5
    batch_size: Annotated[int, Field(ge=1)] = 4
    tta: str = "none"
    """Test-time augmentation, a key of inference.TTA: none, flip (h + v flips), d4 (8 views)."""
    blend: str = "cosine"
    """Window blending, a key of inference.BLENDS: uniform, cosine, gaussian. Cosine by default: on
    the default pipeline's test tiles uniform averaging changes class 6.4x more often across window
    edges than elsewhere (visible seams), cosine 0.93x, for the same mean F1 (benchmarks/bench_engine.py)."""
    precision: str = "auto"
    """auto (bfloat16 where the hardware runs it natively), 32 or bf16 (devices.py)."""

    # The values are checked against their registries (inference.TTA, BLENDS; devices.py) by the
    # `params` stage and where they are used (aerialseg.choices): importing the registries here
    # would make every stage depend on the inference code.

    @field_validator("tta", mode="before")
    @classmethod
    def _tta_was_a_switch(cls, value: object) -> object:
        if isinstance(value, bool):  # the old switch: false/true were none/flip
            raise ValueError(f"is a choice now, not a switch: use {'flip' if value else 'none'!r} (or 'd4')")
        return value

    @field_validator("precision", mode="before")
    @classmethod
    def _precision_as_text(cls, value: object) -> object:
        return str(value) if isinstance(value, int) else value  # YAML reads 32 as a number


class TrackingConfig(_Section):
    experiment: str = "aerialseg"
    # Each trained model becomes a new version of this registered model, a template whose
    # {section.key} are params (names.registered_model_name): one per dataset by default. `alias`
    # moves to it once `evaluate` has scored it, so `models:/<name>@<alias>` is the newest
    # evaluated model, never one whose run failed. None: do not register.
    registered_model: str | None = "aerialseg-{data.source}"
    alias: str = "candidate"


class Params(_Section):
    paths: PathsConfig = PathsConfig()
    data: DataConfig
    synthetic: SyntheticConfig = SyntheticConfig()
    patches: PatchesConfig = PatchesConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    tracking: TrackingConfig = TrackingConfig()

    @property
    def raw_dir(self) -> Path:
        """Where the `tiles` stage reads the official archives or folders from."""
        return self.data.raw_dir


class ConfigError(ValueError):
    """params.yaml is missing, malformed or has a key or value that is not allowed."""


def load_params(path: str | Path = "params.yaml", settings: str | Path | None = None) -> Params:
    """Read and validate params.yaml and its settings.yaml (`settings`, default: beside `path`).

    Raises ConfigError with one line per problem, each naming the file and the key: a bad value,
    an unknown key, a `NOT_RESULTS` key in params.yaml or another key in settings.yaml.
    """
    path = Path(path)
    settings_path = Path(settings) if settings is not None else path.with_name(SETTINGS_FILE)
    raw, root = _read_mapping(path)
    _check_tile_ids_as_written(path, root)
    values, misplaced = split_settings(raw)
    problems = [
        f"{path}: {key}: does not change results, so it belongs in {settings_path} (move it there)"
        for key in _leaves(misplaced)
    ]
    extra: dict = {}
    if settings_path.exists():
        stray, extra = split_settings(_read_mapping(settings_path, empty_ok=True)[0])
        problems += [
            f"{settings_path}: {key}: not a setting (settings hold only {', '.join(NOT_RESULTS)}); "
            f"params go in {path}"
            for key in _leaves(stray)
        ]
    if problems:
        raise ConfigError("\n".join(problems))
    try:
        return Params.model_validate(_merged(values, extra))
    except ValidationError as err:
        by_file: dict[Path, list[str]] = {}
        for key, line in _describe(err):
            by_file.setdefault(settings_path if _is_setting(key) else path, []).append(line)
        raise ConfigError(
            "\n".join(f"{file}: invalid parameters\n" + "\n".join(lines) for file, lines in by_file.items())
        ) from None


def split_settings(tree: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A params tree split into (params.yaml's part, settings.yaml's part: the `NOT_RESULTS` keys)."""
    results: dict[str, Any] = {}
    settings: dict[str, Any] = {}
    for section, value in tree.items():
        if _is_setting(str(section)):
            settings[section] = value
        elif isinstance(value, Mapping):
            inner = {k: v for k, v in value.items() if _is_setting(f"{section}.{k}")}
            rest = {k: v for k, v in value.items() if k not in inner}
            if rest or not inner:
                results[section] = rest
            if inner:
                settings[section] = inner
        else:
            results[section] = value
    return results, settings


def _is_setting(key: str) -> bool:
    return any(key == name or key.startswith(f"{name}.") for name in NOT_RESULTS)


def _leaves(tree: Mapping[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key, value in tree.items():
        if isinstance(value, Mapping) and value and not _is_setting(f"{prefix}{key}"):
            keys += _leaves(value, f"{prefix}{key}.")
        else:
            keys.append(f"{prefix}{key}")
    return keys


def _merged(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for section, value in extra.items():
        if isinstance(value, Mapping) and isinstance(merged.get(section), Mapping):
            merged[section] = {**merged[section], **value}
        else:
            merged[section] = value
    return merged


def _read_mapping(path: Path, empty_ok: bool = False) -> tuple[dict[str, Any], yaml.Node | None]:
    """The YAML mapping in `path` and its node tree; ConfigError (one line) when it cannot be one."""
    try:
        text = path.read_text()
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        _check_unique_keys(path, root)
        raw = yaml.safe_load(text)
    except FileNotFoundError as err:
        raise ConfigError(f"{path}: file does not exist") from err
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot be read ({err})") from err
    except yaml.MarkedYAMLError as err:
        where = _position(err.problem_mark)
        raise ConfigError(f"{path}{where}: not valid YAML: {_yaml_problem(err)}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from None
    if raw is None and empty_ok:
        return {}, root  # an empty settings file: every setting at its default
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    return raw, root


def _position(mark: Any) -> str:
    return f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""


def _yaml_problem(err: yaml.MarkedYAMLError) -> str:
    """PyYAML's problem in one line (its message adds the line and a caret drawing below it)."""
    problem = err.problem or "cannot be parsed"
    if err.context and err.context_mark is not None:
        return f"{problem} ({err.context} from line {err.context_mark.line + 1})"
    return f"{problem} ({err.context})" if err.context else problem


def _check_unique_keys(path: Path, node: yaml.Node | None, prefix: str = "") -> None:
    """Refuse a key written twice in one mapping: every YAML reader keeps only the last value, so
    the first would look set and be ignored (as a misspelt key would be, without this)."""
    if isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _check_unique_keys(path, item, prefix)
    if not isinstance(node, yaml.MappingNode):
        return
    seen: dict[str, int] = {}
    for key, value in node.value:
        if isinstance(key, yaml.ScalarNode) and key.value != "<<":
            line = key.start_mark.line + 1
            if key.value in seen:
                raise ConfigError(
                    f"{path}:{line}: {prefix}{key.value}: written twice (also on line {seen[key.value]}); "
                    "YAML keeps only the last value: remove one"
                )
            seen[key.value] = line
            _check_unique_keys(path, value, f"{prefix}{key.value}.")


PLAIN_TILE_NUMBER = re.compile(r"(0|[1-9][0-9]*)\Z")
"""A tile id that every YAML reader (PyYAML's 1.1, ruamel's and DVC's 1.2) reads as itself: 15."""


def _check_tile_ids_as_written(path: Path, root: yaml.Node | None) -> None:
    """Stop when YAML made a tile id into something other than what was written.

    YAML 1.1 reads an unquoted `2_10` as the integer 210 and `02_13` as 139 (octal); DVC's
    YAML 1.2 reader makes 213 of the latter. Only plain decimal numbers (Vaihingen's 15) read
    the same everywhere; an unquoted id that either reader makes into something else (a number,
    True, None) stops the load, or the split and `dvc params diff` would each see a different
    tile from the one meant.
    """
    data = _mapping_item(root, "data")
    if not isinstance(data, yaml.MappingNode):
        return
    problems = []
    for key_node, value_node in data.value:
        if key_node.value not in TILE_ID_KEYS:
            continue
        if isinstance(value_node, yaml.SequenceNode):
            items = value_node.value
        elif isinstance(value_node, yaml.ScalarNode) and value_node.tag != "tag:yaml.org,2002:null":
            items = [value_node]
        else:
            continue
        bad = {node: readings for node in items if (readings := _misread(node))}
        if not bad:
            continue
        made = ", ".join(_made_of(node.value, *readings) for node, readings in bad.items())
        ids = "ids" if len(bad) > 1 else "id"
        fix = "[" + ", ".join(_as_written(node, quote=node in bad) for node in items) + "]"
        line = next(iter(bad)).start_mark.line + 1
        problems.append(
            f"{path}:{line}: data.{key_node.value}: YAML reads the unquoted tile {ids} {made}; "
            f"quote tile ids that are not plain numbers: {key_node.value}: {fix}"
        )
    if problems:
        raise ConfigError("\n".join(problems))


def _mapping_item(node: yaml.Node | None, key: str) -> yaml.Node | None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.value == key:
                return value_node
    return None


def _misread(node: yaml.Node) -> tuple[object, object] | None:
    """For an unquoted id that PyYAML (the stages) or DVC's reader does not read as written: both readings."""
    if not isinstance(node, yaml.ScalarNode) or node.style is not None or PLAIN_TILE_NUMBER.match(node.value):
        return None
    from ruamel.yaml import YAML
    from ruamel.yaml.error import YAMLError

    flow = f"[{node.value}]"  # read in the flow context it came from, not as a document
    try:
        readings = (yaml.safe_load(flow)[0], YAML(typ="safe").load(flow)[0])  # DVC's reader: YAML(typ="safe")
    except (yaml.YAMLError, YAMLError, IndexError, KeyError, TypeError):
        return None
    return None if all(isinstance(r, str) for r in readings) else readings


def _made_of(text: str, pyyaml: object, dvc: object) -> str:
    if isinstance(pyyaml, str):
        return f"{text} as {dvc!r} in DVC's reader"
    if isinstance(dvc, str) or (type(dvc), dvc) == (type(pyyaml), pyyaml):
        return f"{text} as {pyyaml!r}"
    return f"{text} as {pyyaml!r} ({dvc!r} in DVC's reader)"


def _as_written(node: yaml.Node, quote: bool) -> str:
    if not isinstance(node, yaml.ScalarNode):
        return "..."
    if quote:
        return "'" + node.value.replace("'", "''") + "'"
    return f"{node.style}{node.value}{node.style}" if node.style in ("'", '"') else str(node.value)


def _describe(err: ValidationError) -> list[tuple[str, str]]:
    """(dotted key, "  key: what is wrong") per error."""
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden" and key in RENAMED:
            msg = f"renamed to {RENAMED[key]} (DVC's run cache cannot see a param named `size`)"
        elif e["type"] == "extra_forbidden":
            msg = "unknown key (check its spelling)"
        elif "input" in e and e["type"] != "missing":
            msg = f"{msg} (got {e['input']!r})"
        lines.append((key, f"  {key}: {msg}"))
    return lines
