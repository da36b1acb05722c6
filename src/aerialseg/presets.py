"""Named parameter sets (presets/<name>.yaml) merged into params.yaml, comments kept.

A preset lists only the keys it changes; merging keeps every other key, and every comment, of
the user's params.yaml (and of settings.yaml, where its `config.NOT_RESULTS` keys go), and the
result is validated before it replaces the files.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import yaml as pyyaml
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap
from ruamel.yaml.scalarstring import SingleQuotedScalarString

from aerialseg.config import (
    PLAIN_TILE_NUMBER,
    SETTINGS_FILE,
    TILE_ID_KEYS,
    ConfigError,
    load_params,
    split_settings,
)
from aerialseg.files import atomic_path

PRESETS_DIR = Path("presets")


def available(presets_dir: Path = PRESETS_DIR) -> list[str]:
    return sorted(p.stem for p in presets_dir.glob("*.yaml"))


def apply_preset(name: str, params_path: Path = Path("params.yaml"), presets_dir: Path = PRESETS_DIR) -> None:
    """Merge presets/<name>.yaml into params.yaml and settings.yaml beside it (its `config.NOT_RESULTS`
    keys); raise ConfigError and leave both alone if the result is invalid."""
    preset_path = presets_dir / f"{name}.yaml"
    if not preset_path.exists():
        raise ConfigError(f"{preset_path}: no such preset; available: {', '.join(available(presets_dir))}")
    yaml = YAML()  # round-trip mode: keeps comments and key order
    yaml.preserve_quotes = True  # and the quotes of the keys the preset leaves alone
    # Write null as `null`, as params.yaml does, not as an empty value.
    yaml.representer.add_representer(
        type(None), lambda rep, _: rep.represent_scalar("tag:yaml.org,2002:null", "null")
    )
    settings_path = params_path.with_name(SETTINGS_FILE)
    params = yaml.load(params_path.read_text())
    settings = (yaml.load(settings_path.read_text()) if settings_path.exists() else None) or CommentedMap()
    preset_text = preset_path.read_text()
    overlay, settings_overlay = split_settings(yaml.load(preset_text))
    _merge(params, overlay, preset_path)
    _merge(settings, settings_overlay, preset_path)
    _write_tile_ids_as_meant(params, preset_text)
    with atomic_path(params_path) as tmp, atomic_path(settings_path) as tmp_settings:
        for tree, path in ((params, tmp), (settings, tmp_settings)):
            text = io.StringIO()
            yaml.dump(tree, text)
            path.write_text(text.getvalue())
        load_params(tmp, settings=tmp_settings)  # validated before either replaces its file


def _merge(target: CommentedMap, overlay: dict[str, Any], source: Path, prefix: str = "") -> None:
    # A key params.yaml leaves implicit is added; a misspelt one fails the validation afterwards.
    for key, value in overlay.items():
        if isinstance(value, dict):
            if not isinstance(target.get(key), dict):
                target[key] = CommentedMap()
            _merge(target[key], value, source, f"{prefix}{key}.")
        else:
            target[key] = _flow_style(value)


def _write_tile_ids_as_meant(params: CommentedMap, preset_text: str) -> None:
    """Tile ids as the preset's text spells them, quoted unless they are plain numbers.

    YAML readers disagree on `2_10` (PyYAML and DVC: 210) and `02_13` (PyYAML: 139, DVC: 213),
    and ruamel itself writes `yes` unquoted, which PyYAML reads as True. So ids are taken from
    the preset's text, not from what a YAML reader made of it, and every id but a plain decimal
    number (Vaihingen's 15, the same in every reader) is written in quotes: '2_10'.
    """
    data = params.get("data")
    if not isinstance(data, dict):
        return
    for key, texts in _tile_id_texts(preset_text).items():
        if texts is not None:
            data[key] = _flow_style([_tile_id(text) for text in texts])


def _tile_id_texts(text: str) -> dict[str, list[str] | None]:
    """data.<tile-id key> -> the ids as written in `text` (None for null), from its YAML nodes."""
    root = pyyaml.compose(text, Loader=pyyaml.SafeLoader)
    data = root.value if isinstance(root, pyyaml.MappingNode) else []
    data = next((v.value for k, v in data if k.value == "data" and isinstance(v, pyyaml.MappingNode)), [])
    texts: dict[str, list[str] | None] = {}
    for key_node, value_node in data:
        if key_node.value not in TILE_ID_KEYS:
            continue
        if isinstance(value_node, pyyaml.SequenceNode):
            texts[key_node.value] = [str(node.value) for node in value_node.value]
        elif value_node.tag == "tag:yaml.org,2002:null":
            texts[key_node.value] = None
        else:
            texts[key_node.value] = [str(value_node.value)]
    return texts


def _tile_id(text: str) -> int | SingleQuotedScalarString:
    return int(text) if PLAIN_TILE_NUMBER.match(text) else SingleQuotedScalarString(text)


def _flow_style(value: Any) -> Any:
    """Keep short lists on one line, as params.yaml writes them."""
    if isinstance(value, list):
        from ruamel.yaml.comments import CommentedSeq

        seq = CommentedSeq(value)
        seq.fa.set_flow_style()
        return seq
    return value
