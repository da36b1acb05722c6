"""Named parameter sets (presets/<name>.yaml) merged into params.yaml, comments kept.

A preset lists only the keys it changes; merging keeps every other key, and every comment, of
the user's params.yaml, and the result is validated before it replaces the file.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap

from aerialseg.config import ConfigError, load_params
from aerialseg.files import atomic_path

PRESETS_DIR = Path("presets")


def available(presets_dir: Path = PRESETS_DIR) -> list[str]:
    return sorted(p.stem for p in presets_dir.glob("*.yaml"))


def apply_preset(name: str, params_path: Path = Path("params.yaml"), presets_dir: Path = PRESETS_DIR) -> None:
    """Merge presets/<name>.yaml into params.yaml; raise ConfigError and leave it alone if invalid."""
    preset_path = presets_dir / f"{name}.yaml"
    if not preset_path.exists():
        raise ConfigError(f"{preset_path}: no such preset; available: {', '.join(available(presets_dir))}")
    yaml = YAML()  # round-trip mode: keeps comments and key order
    # Write null as `null`, as params.yaml does, not as an empty value.
    yaml.representer.add_representer(
        type(None), lambda rep, _: rep.represent_scalar("tag:yaml.org,2002:null", "null")
    )
    params = yaml.load(params_path.read_text())
    _merge(params, yaml.load(preset_path.read_text()), preset_path)
    text = io.StringIO()
    yaml.dump(params, text)
    with atomic_path(params_path) as tmp:
        tmp.write_text(text.getvalue())
        load_params(tmp)  # validated before it replaces params.yaml


def _merge(target: CommentedMap, overlay: dict[str, Any], source: Path, prefix: str = "") -> None:
    # A key params.yaml leaves implicit is added; a misspelt one fails the validation afterwards.
    for key, value in overlay.items():
        if isinstance(value, dict):
            if not isinstance(target.get(key), dict):
                target[key] = CommentedMap()
            _merge(target[key], value, source, f"{prefix}{key}.")
        else:
            target[key] = _flow_style(value)


def _flow_style(value: Any) -> Any:
    """Keep short lists on one line, as params.yaml writes them."""
    if isinstance(value, list):
        from ruamel.yaml.comments import CommentedSeq

        seq = CommentedSeq(value)
        seq.fa.set_flow_style()
        return seq
    return value
