"""The model registry a team can trust (issue 13, points 6 and 8): one registered model per dataset
or preset, `candidate` after evaluation, `champion` on the validation figure only, a pickle-free
model that loads from its own logged requirements, and what MLflow users expect on a training run
(system metrics, the tiles and patches as dataset inputs with their DVC digests)."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, packages_distributions, requires
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from mlflow import MlflowClient
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from aerialseg.checkpoint import load_checkpoint
from aerialseg.config import Params, load_params
from aerialseg.evaluation import evaluate
from aerialseg.export import ExportError, export_onnx
from aerialseg.model import build_model, model_args
from aerialseg.model_card import ModelCard
from aerialseg.model_source import load_model
from aerialseg.names import (
    CANDIDATE_ALIAS,
    CHAMPION_ALIAS,
    CHAMPION_METRIC,
    VERSION_CHAMPION_TAG,
    VERSION_VALIDATION_TAG,
    RegisteredModelNameError,
    registered_model_name,
)
from aerialseg.tracking import log_model, promote_champion
from aerialseg.training import train

BANDS = ("ir", "r", "g", "dsm")

# --------------------------------------------------------------------------- the name


def test_the_registered_name_follows_the_dataset_and_the_preset() -> None:
    params = load_params()  # the project's params.yaml and settings.yaml
    assert registered_model_name(params.tracking.registered_model, params) == "aerialseg-synthetic"
    vaihingen = params.model_copy(update={"data": params.data.model_copy(update={"source": "vaihingen"})})
    assert registered_model_name(params.tracking.registered_model, vaihingen) == "aerialseg-vaihingen"
    assert (
        registered_model_name("aerialseg-{data.source}-lecture", vaihingen) == "aerialseg-vaihingen-lecture"
    )
    # Every preset names its own registered model: a champion is never chosen across them.
    presets = {
        name: yaml.safe_load(Path(f"presets/{name}.yaml").read_text())["tracking"]["registered_model"]
        for name in ("lecture", "benchmark-vaihingen", "benchmark-potsdam", "ci", "synthetic")
    }
    assert len(set(presets.values())) == len(presets) - 1  # the benchmarks differ by data.source
    assert registered_model_name("my-model", params) == "my-model"  # a plain name is kept
    assert registered_model_name(None, params) is None


@pytest.mark.parametrize(
    ("template", "said"),
    [
        ("aerialseg-{data.sorce}", "no param data.sorce"),
        ("aerialseg-{dta.source}", "no params section 'dta'"),
        ("aerialseg-{data}", "{data} is a whole section"),
        ("aerialseg-{data.source", "expected '}'"),
        ("{data.raw_dir}", "without '/' or ':'"),
    ],
)
def test_a_bad_template_is_one_line_naming_it(template: str, said: str) -> None:
    with pytest.raises(RegisteredModelNameError) as err:
        registered_model_name(template, load_params())
    message = str(err.value)
    assert message.startswith(f"tracking.registered_model: {template!r}") and said in message
    assert "\n" not in message


# --------------------------------------------------------------------------- the champion


VALIDATED = {"data.source": "synthetic", "data.val_tiles": "[6]", "validation.overlap": "0.5"}


@pytest.fixture
def registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., str]:
    """`add(val=0.7, test=0.9, **params)`: a run with that selected_val_mean_f1 and test_mean_f1,
    registered as the next version of `m`; returns the version."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = MlflowClient()
    experiment = client.create_experiment("registry", artifact_location=(tmp_path / "a").as_uri())
    client.create_registered_model("m")

    def add(val: float | None, test: float, **params: str) -> str:
        run = client.create_run(experiment).info.run_id
        for key, value in {**VALIDATED, **params}.items():
            client.log_param(run, key, value)
        if val is not None:
            client.log_metric(run, CHAMPION_METRIC, val)
        client.log_metric(run, "test_mean_f1", test)
        return str(client.create_model_version("m", f"runs:/{run}/model", run_id=run).version)

    return add


def _champion() -> tuple[str, str]:
    version = MlflowClient().get_model_version_by_alias("m", CHAMPION_ALIAS)
    return str(version.version), version.tags[VERSION_CHAMPION_TAG]


def test_the_champion_moves_on_the_validation_figure_never_on_test(registry: Callable[..., str]) -> None:
    first = registry(val=0.70, test=0.60)
    assert promote_champion(_run_of(first), "m", first)
    assert _champion() == (first, f"champion: the first version validated ({CHAMPION_METRIC} 0.7000)")

    # Far better on test, worse on validation: not the champion, and the version says why.
    worse = registry(val=0.69, test=0.99)
    assert not promote_champion(_run_of(worse), "m", worse)
    assert _champion()[0] == first
    tags = MlflowClient().get_model_version("m", worse).tags
    assert tags[VERSION_CHAMPION_TAG] == (
        f"not the champion: {CHAMPION_METRIC} 0.6900 <= 0.7000 of version {first}, the champion"
    )
    assert json.loads(tags[VERSION_VALIDATION_TAG])[CHAMPION_METRIC] == pytest.approx(0.69)

    # A tie does not move it either; a better validation figure does, whatever the test says.
    tie = registry(val=0.70, test=0.99)
    assert not promote_champion(_run_of(tie), "m", tie)
    better = registry(val=0.71, test=0.10)
    assert promote_champion(_run_of(better), "m", better)
    assert _champion() == (
        better,
        f"champion: {CHAMPION_METRIC} 0.7100 > 0.7000 of version {first}, the champion until now",
    )
    # Evaluated again (an evaluate-only rerun): it stays, and says so.
    assert not promote_champion(_run_of(better), "m", better)
    assert _champion()[0] == better


def test_figures_of_other_validation_tiles_or_protocols_never_compare(registry: Callable[..., str]) -> None:
    first = registry(val=0.50, test=0.5)
    promote_champion(_run_of(first), "m", first)
    for params in ({"data.val_tiles": "[5]"}, {"validation.overlap": "0.75"}, {"data.source": "vaihingen"}):
        other = registry(val=0.99, test=0.99, **params)
        assert not promote_champion(_run_of(other), "m", other)
        reason = MlflowClient().get_model_version("m", other).tags[VERSION_CHAMPION_TAG]
        key = next(iter(params))
        assert reason.startswith(f"not the champion: version {first}, the champion, was validated otherwise")
        assert f"{key} {params[key]} (theirs {VALIDATED[key]})" in reason
    # A run without a validation figure (a model trained elsewhere) never becomes the champion.
    unvalidated = registry(val=None, test=1.0)
    assert not promote_champion(_run_of(unvalidated), "m", unvalidated)
    assert _champion()[0] == first


def _run_of(version: str) -> str:
    return str(MlflowClient().get_model_version("m", version).run_id)


# --------------------------------------------------------------------------- the logged model


@pytest.mark.parametrize("arch", ["fpn", "fcn_skip"])
def test_the_logged_model_is_a_pt2_graph_with_dynamic_batch_height_and_width(
    arch: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")  # a hardened loader
    args = model_args(arch, "resnet18", len(BANDS), 6)
    torch.manual_seed(0)
    network = build_model(args).eval()
    card = ModelCard.for_training(args, bands=BANDS, mean=[0.0] * 4, std=[1.0] * 4, window=64)
    experiment = mlflow.create_experiment(arch, artifact_location=(tmp_path / "a").as_uri())
    with mlflow.start_run(experiment_id=experiment) as run:
        pass

    log_model(run.info.run_id, network, card, registered_model=f"m-{arch}", alias="a")

    info = mlflow.models.get_model_info(f"models:/m-{arch}@a")
    local = Path(mlflow.artifacts.download_artifacts(f"models:/m-{arch}@a", dst_path=str(tmp_path / "dl")))
    assert [p.name for p in (local / "data").iterdir()] == ["model.pt2"]  # no model.pth: no pickle
    inputs = info.signature.inputs.inputs[0]
    assert inputs.shape == (-1, len(BANDS), -1, -1)
    loaded, loaded_card = load_model(f"models:/m-{arch}@a")
    assert loaded_card == ModelCard.from_dict(card.to_dict(training=False), "x")
    # Sizes other than the window and the export's example, square or not, batch 1 to 3.
    for shape in [(1, 4, 64, 64), (3, 4, 96, 160), (2, 4, 256, 128)]:
        x = torch.randn(shape)
        with torch.no_grad():
            assert torch.equal(loaded(x), network(x)), shape
    # `aerialseg export -m models:/...`: the dynamo exporter takes the graph; TorchScript says why not.
    with pytest.raises(ExportError, match="--exporter dynamo"):
        export_onnx(loaded, loaded_card, tmp_path / "ts.onnx", exporter="torchscript")
    if arch == "fcn_skip":  # the faster of the two (~20 s here)
        assert export_onnx(loaded, loaded_card, tmp_path / "m.onnx").parity.ok


def _closure(requirements: list[str]) -> set[str]:
    """The distributions that installing `requirements` brings: them and their dependencies (no
    extras), by canonical name."""
    todo = [Requirement(line) for line in requirements if line.strip() and not line.startswith("#")]
    seen: set[str] = set()
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in seen or (req.marker is not None and not req.marker.evaluate({"extra": ""})):
            continue
        seen.add(name)
        # Not installed here: nothing it needs can have been imported.
        with contextlib.suppress(PackageNotFoundError):
            todo += [Requirement(r) for r in requires(req.name) or []]
    return seen


LOAD_AND_RUN = """
import json, sys
import mlflow.artifacts, mlflow.pytorch, torch
top = lambda: {name.split(".")[0] for name in sys.modules}
local = mlflow.artifacts.download_artifacts(sys.argv[1])  # the store's client: sqlalchemy, alembic...
before = top()  # MLflow's and torch's own imports, optional ones included (whatever is installed)
model = mlflow.pytorch.load_model(local)
with torch.no_grad():
    shape = list(model(torch.zeros(1, int(sys.argv[2]), 96, 160)).shape)
print(json.dumps({"shape": shape, "all": sorted(top()), "model": sorted(top() - before)}))
"""
"""Loads and runs a logged model; `model` lists the top-level modules that loading and running
it imported beyond `import mlflow.pytorch, torch` and the download from the store: what the model
itself needs."""


# --------------------------------------------------------------------------- train and evaluate


def test_a_trained_run_has_system_metrics_dataset_inputs_and_a_registered_pt2_model(
    patches_dir: Path,
    small_params: Callable[..., Params],
    synthetic_tiles: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`train` then `evaluate` as DVC runs them (DVC_STAGE, a dvc.lock in the working directory)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_STAGE", "train")
    # MLflow samples every 10 s by default; this training takes a few seconds.
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    digests = {"tiles": "a" * 32 + ".dir", "patches": "b" * 32 + ".dir"}
    stages = {
        stage: {"cmd": "x", "outs": [{"path": f"data/{stage}", "hash": "md5", "md5": md5}]}
        for stage, md5 in digests.items()
    }
    lock = {"schema": "2.0", "stages": stages}
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    params = small_params(
        tmp_path,
        {
            "paths.patches": patches_dir,
            "paths.tiles": synthetic_tiles,
            "paths.reports": tmp_path / "reports",
            "tracking.registered_model": "aerialseg-{data.source}",
            "train.epochs": 2,
        },
    )
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")

    train(params)

    run_id = json.loads((tmp_path / "models" / "mlflow_run.json").read_text())["run_id"]
    run = client.get_run(run_id)
    # System metrics, from the one training process.
    system = {key for key in run.data.metrics if key.startswith("system/")}
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= system
    assert len(client.get_metric_history(run_id, "system/cpu_utilization_percentage")) >= 1
    # The tiles and patches as dataset inputs, with dvc.lock's digests.
    assert run.inputs is not None
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert {name: d.dataset.digest for name, d in inputs.items()} == {
        f"data/{stage}": md5 for stage, md5 in digests.items()
    }
    assert json.loads(inputs["data/patches"].dataset.source) == {"uri": (tmp_path / "data/patches").as_uri()}
    assert {t.value for t in inputs["data/patches"].tags} == {"patches"}
    # Registered under the dataset's name; no alias before `evaluate`.
    [version] = client.search_model_versions(f"run_id='{run_id}'")
    assert version.name == "aerialseg-synthetic"
    assert client.get_registered_model("aerialseg-synthetic").aliases == {}

    monkeypatch.setenv("DVC_STAGE", "evaluate")
    evaluate(params)

    aliases = client.get_registered_model("aerialseg-synthetic").aliases
    assert aliases == {CANDIDATE_ALIAS: version.version, CHAMPION_ALIAS: version.version}
    tags = client.get_model_version("aerialseg-synthetic", version.version).tags
    assert json.loads(tags[VERSION_VALIDATION_TAG])[CHAMPION_METRIC] == pytest.approx(
        run.data.metrics[CHAMPION_METRIC]
    )

    # The registered model loads in a fresh process that refuses pickles, and everything that
    # loading and running it imports is installed by its own logged requirements: neither
    # aerialseg nor segmentation-models-pytorch (whose classes a pickle would name).
    uri = "models:/aerialseg-synthetic@candidate"
    requirements = Path(mlflow.pyfunc.get_model_dependencies(uri)).read_text().splitlines()
    assert {canonicalize_name(Requirement(r).name) for r in requirements} == {"mlflow", "torch", "numpy"}
    done = subprocess.run(
        [sys.executable, "-I", "-c", LOAD_AND_RUN, uri, str(len(BANDS))],
        capture_output=True,
        text=True,
        timeout=300,
        env={
            "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
            "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false",
            "PATH": "/usr/bin:/bin",
            "HOME": str(tmp_path),
        },
    )
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert loaded["shape"] == [1, 6, 96, 160]
    assert not {"aerialseg", "segmentation_models_pytorch", "timm"} & set(loaded["all"])
    covered = _closure(requirements)
    owners = packages_distributions()
    uncovered = {
        module: owners.get(module, ["no distribution"])
        for module in loaded["model"]
        if module not in sys.stdlib_module_names
        and not any(canonicalize_name(d) in covered for d in owners.get(module, []))
    }
    assert not uncovered, f"the model imported, but its requirements do not install: {uncovered}"
    # And it predicts what the checkpoint predicts.
    network, _ = load_checkpoint(tmp_path / "models" / "model.ckpt")
    from_registry, _ = load_model(uri)
    x = torch.randn(2, len(BANDS), 128, 96)
    with torch.no_grad():
        assert torch.allclose(from_registry(x), network(x), atol=1e-5)


def test_an_old_pickled_model_is_one_line_when_pickles_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model logged before (pickle): loads as before by default; a hardened environment says why."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    args = model_args("fcn_skip", "resnet18", len(BANDS), 6)
    card = ModelCard.for_training(args, bands=BANDS, mean=[0.0] * 4, std=[1.0] * 4, window=64)
    experiment = mlflow.create_experiment("old", artifact_location=(tmp_path / "a").as_uri())
    with mlflow.start_run(experiment_id=experiment):
        info = mlflow.pytorch.log_model(
            build_model(args).eval(),
            name="model",
            serialization_format="pickle",
            metadata=card.to_dict(training=False),
            pip_requirements=["torch"],
        )
    model, _ = load_model(info.model_uri)
    assert isinstance(model, torch.nn.Module)
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    with pytest.raises(ValueError, match="a pickled model") as err:
        load_model(info.model_uri)
    assert "MLFLOW_ALLOW_PICKLE_DESERIALIZATION is false" in str(err.value)
    assert "\n" not in str(err.value)
