"""The tracking store after a crash (issue 12): a run's status says how it ended, a killed run is
marked KILLED by the next `train`, the alias moves only to an evaluated model, and `train_seconds`
adds up over the parts of a resumed run."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import lightning as L
import pytest
from mlflow import MlflowClient
from mlflow.entities import LoggedModelStatus
from mlflow.exceptions import MlflowException
from test_training_engine import Crash, CrashAtEpoch, _params

from aerialseg.config import Params
from aerialseg.evaluation import evaluate
from aerialseg.processes import start_time
from aerialseg.tracking import (
    OWNER_HOST_TAG,
    OWNER_PID_TAG,
    OWNER_START_TAG,
    set_alias_to_run,
)
from aerialseg.training import train

EXPERIMENT = "engine"  # test_training_engine._params's


@pytest.fixture
def store(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> MlflowClient:
    """A private MLflow store in tmp_path (the working directory); no MLflow model logging."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_STAGE", raising=False)
    monkeypatch.setattr("aerialseg.training.log_model", lambda *args, **kwargs: None)
    return MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")


def _started_run(models: Path) -> str:
    """The run that `train` opened (written when training starts, crash or not)."""
    return str(json.loads((models / "checkpoints" / "mlflow_run.json").read_text())["run_id"])


class RaiseInEpoch(L.Callback):
    def __init__(self, error: BaseException) -> None:
        self.error = error

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        raise self.error


def test_a_run_whose_training_raises_ends_failed(
    store: MlflowClient, patches_dir: Path, small_params: Callable[..., Params], tmp_path: Path
) -> None:
    models = tmp_path / "models"
    with pytest.raises(Crash):
        train(_params(small_params, patches_dir, models), callbacks=[RaiseInEpoch(Crash("mid-epoch"))])
    run = store.get_run(_started_run(models))
    assert run.info.status == "FAILED"
    assert run.data.tags[OWNER_PID_TAG] and run.data.tags[OWNER_HOST_TAG] == socket.gethostname()


def test_an_interrupted_run_ends_killed(
    store: MlflowClient, patches_dir: Path, small_params: Callable[..., Params], tmp_path: Path
) -> None:
    models = tmp_path / "models"
    sigint = signal.getsignal(signal.SIGINT)
    try:
        # Lightning turns Ctrl-C into sys.exit(1), after ignoring further SIGINTs.
        with pytest.raises(SystemExit):
            train(_params(small_params, patches_dir, models), callbacks=[RaiseInEpoch(KeyboardInterrupt())])
    finally:
        signal.signal(signal.SIGINT, sigint)
    assert store.get_run(_started_run(models)).info.status == "KILLED"


def _planted(client: MlflowClient, experiment_id: str, **tags: str) -> str:
    return str(client.create_run(experiment_id, tags=tags).info.run_id)


def test_the_next_train_marks_killed_the_running_runs_whose_process_is_gone(
    store: MlflowClient, patches_dir: Path, small_params: Callable[..., Params], tmp_path: Path
) -> None:
    experiment_id = store.create_experiment(EXPERIMENT)
    gone = subprocess.Popen(["true"])
    gone.wait()
    alive = subprocess.Popen(["sleep", "60"])
    try:
        host = socket.gethostname()
        start = start_time(alive.pid)
        dead = _planted(store, experiment_id, **{OWNER_HOST_TAG: host, OWNER_PID_TAG: str(gone.pid)})
        living = _planted(
            store,
            experiment_id,
            **{OWNER_HOST_TAG: host, OWNER_PID_TAG: str(alive.pid)},
            **({OWNER_START_TAG: start} if start else {}),
        )
        reused = _planted(
            store,
            experiment_id,
            **{OWNER_HOST_TAG: host, OWNER_PID_TAG: str(alive.pid), OWNER_START_TAG: "1"},
        )
        elsewhere = _planted(
            store, experiment_id, **{OWNER_HOST_TAG: "another-host", OWNER_PID_TAG: str(gone.pid)}
        )
        untagged = _planted(store, experiment_id)
        # A model whose upload the kill interrupted.
        pending = store.create_logged_model(experiment_id, name="model", source_run_id=dead).model_id
        pending_alive = store.create_logged_model(experiment_id, name="model", source_run_id=living).model_id

        train(_params(small_params, patches_dir, tmp_path / "models"))

        status = {run_id: store.get_run(run_id).info.status for run_id in (dead, living, elsewhere, untagged)}
        assert status == {dead: "KILLED", living: "RUNNING", elsewhere: "RUNNING", untagged: "RUNNING"}
        if start:  # the pid is alive, but it is another process than the one that started the run
            assert store.get_run(reused).info.status == "KILLED"
        assert store.get_logged_model(pending).status == LoggedModelStatus.FAILED
        assert store.get_logged_model(pending_alive).status == LoggedModelStatus.PENDING
    finally:
        alive.kill()
        alive.wait()


def test_a_resumed_run_adds_up_the_training_time_of_its_parts(
    store: MlflowClient, patches_dir: Path, small_params: Callable[..., Params], tmp_path: Path
) -> None:
    models = tmp_path / "models"
    with pytest.raises(Crash):
        train(_params(small_params, patches_dir, models, epochs=2), callbacks=[CrashAtEpoch(1)])
    run_id = _started_run(models)
    crashed = store.get_run(run_id)
    assert crashed.info.status == "FAILED"
    first = crashed.data.metrics["train_seconds"]  # epoch 0's end logged it, and the crash
    assert first > 0

    started = time.perf_counter()
    resumed = train(_params(small_params, patches_dir, models, epochs=2, resume=True))
    wall = time.perf_counter() - started

    run = store.get_run(run_id)
    assert run.info.status == "FINISHED"
    total = run.data.metrics["train_seconds"]
    assert resumed["train_seconds"] == pytest.approx(total)
    assert first < total <= first + wall


def test_the_alias_moves_to_the_version_of_the_evaluated_run(store: MlflowClient) -> None:
    experiment_id = store.create_experiment(EXPERIMENT)
    store.create_registered_model("aerialseg-test")
    runs = [store.create_run(experiment_id).info.run_id for _ in range(2)]
    versions = [store.create_model_version("aerialseg-test", f"runs:/{r}/model", run_id=r) for r in runs]
    assert set_alias_to_run(runs[1], "aerialseg-test", "candidate") == str(versions[1].version)
    assert set_alias_to_run(runs[0], "aerialseg-test", "candidate") == str(versions[0].version)
    assert store.get_model_version_by_alias("aerialseg-test", "candidate").run_id == runs[0]
    # A run without a registered version leaves the alias where it is.
    assert (
        set_alias_to_run(store.create_run(experiment_id).info.run_id, "aerialseg-test", "candidate") is None
    )
    assert store.get_model_version_by_alias("aerialseg-test", "candidate").run_id == runs[0]


def test_a_run_finishes_with_its_model_and_the_alias_waits_for_evaluate(
    patches_dir: Path,
    small_params: Callable[..., Params],
    synthetic_tiles: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The real `log_model` (20-30 s): the run is FINISHED only with the model logged."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_STAGE", raising=False)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    params = small_params(
        tmp_path,
        {
            "paths.patches": patches_dir,
            "paths.tiles": synthetic_tiles,
            "paths.reports": tmp_path / "reports",
            "tracking.experiment": EXPERIMENT,
            "tracking.registered_model": "aerialseg-test",
            "tracking.alias": "candidate",
        },
    )

    train(params)

    run_id = _started_run(tmp_path / "models")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    # MLflow 3 stores the model as a logged model of the run, not among the run's artifacts.
    [logged] = [m for m in client.search_logged_models([run.info.experiment_id]) if m.source_run_id == run_id]
    assert logged.status == LoggedModelStatus.READY
    assert (Path(urlparse(logged.artifact_location).path) / "MLmodel").is_file()
    [version] = client.search_model_versions(f"run_id='{run_id}'")
    with pytest.raises(MlflowException):
        client.get_model_version_by_alias("aerialseg-test", "candidate")

    evaluate(params)

    assert client.get_model_version_by_alias("aerialseg-test", "candidate").version == version.version
    assert client.get_run(run_id).data.metrics["test_overall_accuracy"] >= 0
