"""dvc.yaml names exactly the code each stage runs, so `dvc repro` reruns what a change affects."""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from aerialseg.config import NOT_RESULTS, Params

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = "aerialseg"


def _module_file(module: str) -> Path | None:
    base = SRC / Path(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def _project_imports(path: Path) -> set[str]:
    """Modules of the package that a file imports, at any depth of the file (lazy imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == PACKAGE:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == PACKAGE)
    return {m for m in found if _module_file(m) is not None}


def code_closure(script: Path) -> set[Path]:
    """The script and every project source file it reaches through imports."""
    seen: set[Path] = {script}
    todo = [script]
    while todo:
        for module in _project_imports(todo.pop()):
            file = _module_file(module)
            assert file is not None
            if file not in seen:
                seen.add(file)
                todo.append(file)
    # Package __init__ files hold no logic that stages depend on.
    return {p for p in seen if p.name != "__init__.py"}


STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("name", list(STAGES))
def test_stage_code_deps_are_exactly_the_code_it_imports(name: str) -> None:
    stage = STAGES[name]
    script = ROOT / stage["cmd"].split()[-1]
    listed = {ROOT / d for d in stage["deps"] if d.endswith(".py")}
    expected = code_closure(script)
    assert listed - expected == set(), f"{name}: lists code it never imports"
    assert expected - listed == set(), f"{name}: imports code that dvc.yaml does not list"


@pytest.mark.parametrize("name", list(STAGES))
def test_stage_params_exist_in_params_yaml(name: str) -> None:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for key in STAGES[name].get("params", []):
        node = params
        for part in key.split("."):
            assert isinstance(node, dict) and part in node, f"{name}: params.yaml has no {key}"
            node = node[part]


def _leaf_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys += _leaf_keys(annotation, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def _covered(key: str, names: Iterable[str]) -> bool:
    return any(key == n or key.startswith(f"{n}.") for n in names)


def test_every_param_that_can_change_a_result_is_a_stage_param() -> None:
    """A key that no stage names never reruns anything: it must be one of config.NOT_RESULTS."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    named = {p for stage in stages.values() for p in stage.get("params", [])}
    keys = _leaf_keys(Params)
    unnamed = [k for k in keys if not _covered(k, named) and not _covered(k, NOT_RESULTS)]
    assert not unnamed, f"params no stage names (add them to dvc.yaml or to config.NOT_RESULTS): {unnamed}"
    both = [k for k in keys if _covered(k, named) and _covered(k, NOT_RESULTS)]
    assert not both, f"params in config.NOT_RESULTS that a stage names: {both}"
    assert all(any(_covered(k, [n]) for k in keys) for n in NOT_RESULTS)


def test_the_params_stage_validates_the_whole_file() -> None:
    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["params"]
    assert "params.yaml" in stage["deps"] and not stage.get("outs")


def test_no_param_is_named_so_that_dvc_cannot_see_it() -> None:
    """DVC's run cache leaves every key named `size` or `nfiles`, at any depth, out of a stage's hash
    (dvc/stage/cache.py strips dvc_data's Meta.PARAM_SIZE/PARAM_NFILES from the whole lock entry):
    a changed `patches.size` would restore the old patches from the run cache."""
    from dvc_data.hashfile.meta import Meta

    stripped = {Meta.PARAM_SIZE, Meta.PARAM_NFILES}
    named = [k for k in _leaf_keys(Params) if set(k.split(".")) & stripped]
    assert not named, f"rename these params: DVC's run cache cannot see them: {named}"
