"""The team tracking server for real: `aerialseg server start` on localhost, two pipelines at once.

The module installs Debian's PostgreSQL when it is missing and it can (root, apt-get), starts
`aerialseg server start` (PostgreSQL in a temporary folder, `mlflow server` with proxied artifacts
and basic authentication) on a free port, and stops it at the end (and checks that PostgreSQL
stopped with it). Two users, created through MLflow's auth API by the admin, run the tiny pipeline
(`dvc repro`) in two copies of the project AT THE SAME TIME against the one server, through
MLFLOW_TRACKING_URI alone; then the runs, their artifacts downloaded through the server, the
registry, the leaderboard and `predict -m models:/...` are checked. A server that cannot be reached
is one clear line within seconds, and nothing falls back to a local store.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from project_copy import TINY, copy_project, project_env, run

from aerialseg.team_server import ServerError, ServerLayout, postgres_bin
from aerialseg.tracking import TrackingStoreError, check_tracking_store

pytestmark = [pytest.mark.team_server, pytest.mark.slow]

EXPERIMENT = "team"
MODEL = "aerialseg-team"
PARAMS = {
    **TINY,
    "train": {**TINY["train"], "epochs": 1, "limit_train_batches": 1},
    "tracking": {"experiment": EXPERIMENT, "registered_model": MODEL},
}
USERS = ("alice", "bob")
START_TIMEOUT = 240.0
PIPELINE_TIMEOUT = 900.0
AERIALSEG = str(Path(sys.executable).parent / "aerialseg")


def _install_postgres() -> None:
    """Install Debian's PostgreSQL with apt-get, or skip the module saying why it cannot."""
    if os.geteuid() != 0:
        pytest.skip("PostgreSQL is not installed (no initdb/pg_ctl) and installing it needs root")
    if shutil.which("apt-get") is None:
        pytest.skip("PostgreSQL is not installed (no initdb/pg_ctl) and there is no apt-get to install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "postgresql"]
    done = subprocess.run(install, env=env, capture_output=True, text=True)
    if done.returncode != 0:  # stale package lists: refresh them once
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, text=True)
        done = subprocess.run(install, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"installing postgresql failed: {(done.stderr or done.stdout)[-1500:]}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    url: str
    data: Path
    admin_password: str
    process: subprocess.Popen[str]
    log: Path

    def env(self, user: str, password: str) -> dict[str, str]:
        return {
            "MLFLOW_TRACKING_URI": self.url,
            "MLFLOW_TRACKING_USERNAME": user,
            "MLFLOW_TRACKING_PASSWORD": password,
        }

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    try:
        postgres_bin()
    except ServerError:
        _install_postgres()
        postgres_bin()  # installed now
    # Not under pytest's own folder (mode 700): as root, PostgreSQL runs as `postgres`, which
    # must reach its cluster's folder.
    folder = Path(tempfile.mkdtemp(prefix="aerialseg-team-server-"))
    folder.chmod(0o711)
    port = _free_port()
    admin_password = secrets.token_urlsafe(16)
    log = folder / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_AUTH_ADMIN_PASSWORD=admin_password, MLFLOW_DISABLE_TELEMETRY="true")
    with log.open("w") as out:
        process = subprocess.Popen(
            [AERIALSEG, "server", "start", "--data", str(folder / "data"), "--port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )
    found = Server(f"http://127.0.0.1:{port}", folder / "data", admin_password, process, log)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while "MLflow tracking server at" not in log.read_text(errors="replace"):
            if process.poll() is not None:
                pytest.fail(f"`aerialseg server start` exited with {process.returncode}:\n{found.output()}")
            if time.monotonic() > deadline:
                pytest.fail(f"the server did not start within {START_TIMEOUT:g} s:\n{found.output()}")
            time.sleep(1)
        yield found
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    # Stopping the command stops PostgreSQL too (pg_ctl stop removes postmaster.pid).
    assert process.returncode == 0, found.output()
    assert not (ServerLayout(found.data).pgdata / "postmaster.pid").exists(), found.output()
    shutil.rmtree(folder)


@pytest.fixture(scope="module")
def passwords(server: Server) -> dict[str, str]:
    """The team's users, created by the admin through MLflow's auth API."""
    from mlflow.server import get_app_client

    created = {user: secrets.token_urlsafe(12) for user in USERS}
    admin = {
        "MLFLOW_TRACKING_USERNAME": "admin",
        "MLFLOW_TRACKING_PASSWORD": server.admin_password,
        # A test before may have run check_tracking_store with a 1 s timeout in this process, which
        # sets MLflow's request timeout to it; creating a user (bcrypt) can take longer under load,
        # and MLflow's retry would then create it twice.
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "120",
    }
    with pytest.MonkeyPatch.context() as patch:
        for key, value in admin.items():
            patch.setenv(key, value)
        auth = get_app_client("basic-auth", tracking_uri=server.url)
        for user, password in created.items():
            auth.create_user(user, password)
    return created


def _admin_client(server: Server, monkeypatch: pytest.MonkeyPatch) -> Any:
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", server.admin_password)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "120")  # see `passwords`
    return MlflowClient(server.url)


def test_two_pipelines_at_once_against_one_server(
    server: Server, passwords: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    copies = {user: copy_project(tmp_path / user, PARAMS) for user in USERS}
    # Both at once: the experiment and the registered model are created by whichever comes first.
    started = {
        user: subprocess.Popen(
            ["dvc", "repro"],
            cwd=copy,
            env=project_env(copy, **server.env(user, passwords[user])),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for user, copy in copies.items()
    }
    outputs = {user: job.communicate(timeout=PIPELINE_TIMEOUT)[0] for user, job in started.items()}
    for user, job in started.items():
        assert job.returncode == 0, f"{user}'s dvc repro failed:\n{outputs[user][-4000:]}\n{server.output()}"

    # No local store anywhere: everything went to the server.
    for copy in copies.values():
        assert not (copy / "mlflow.db").exists() and not (copy / "mlruns").exists()
    run_ids = {
        user: json.loads((copy / "reports" / "metrics.json").read_text())["mlflow_run_id"]
        for user, copy in copies.items()
    }
    assert len(set(run_ids.values())) == 2

    # Two complete runs in the one experiment.
    client = _admin_client(server, monkeypatch)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment is not None and experiment.artifact_location.startswith("mlflow-artifacts:")
    runs = {r.info.run_id: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == set(run_ids.values())
    for run_id in run_ids.values():
        assert runs[run_id].info.status == "FINISHED"
        assert "test_overall_accuracy" in runs[run_id].data.metrics

    # Their artifacts, downloaded through the server, are what each pipeline wrote; the server
    # stored them in its own folder (proxied: the clients never wrote there).
    for user, run_id in run_ids.items():
        got = Path(client.download_artifacts(run_id, "evaluation/metrics.json", str(tmp_path / run_id)))
        assert json.loads(got.read_text()) == json.loads((copies[user] / "reports/metrics.json").read_text())
    stored = {p.parts[-4] for p in (server.data / "artifacts").rglob("evaluation/metrics.json")}
    assert stored == set(run_ids.values())

    # The registry: one version per run; the alias names one of them (the last evaluated).
    versions = client.search_model_versions(f"name='{MODEL}'")
    assert sorted(v.run_id for v in versions) == sorted(run_ids.values())
    assert client.get_model_version_by_alias(MODEL, "candidate").run_id in run_ids.values()

    # The leaderboard, as bob, lists both runs.
    bob = project_env(copies["bob"], **server.env("bob", passwords["bob"]))
    table = run(copies["bob"], AERIALSEG, "leaderboard", "--format", "csv", env=bob).stdout
    assert all(run_id in table for run_id in run_ids.values()), table

    # predict loads the registered model from the server, as alice.
    alice = project_env(copies["alice"], **server.env("alice", passwords["alice"]))
    tile = sorted((copies["alice"] / "data" / "tiles").glob("*_image.tif"))[0]
    out = tmp_path / "predicted"
    run(
        copies["alice"],
        AERIALSEG,
        "predict",
        str(tile),
        "-m",
        f"models:/{MODEL}@candidate",
        "-o",
        str(out),
        env=alice,
    )
    assert (out / tile.name).is_file()


def test_a_wrong_password_is_refused_in_one_line(server: Server, passwords: dict[str, str]) -> None:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
        patch.setenv("MLFLOW_TRACKING_PASSWORD", "not-" + passwords["alice"])
        with pytest.raises(TrackingStoreError, match=r"refused access \(401"):
            check_tracking_store(server.url)
        patch.delenv("MLFLOW_TRACKING_USERNAME")
        patch.delenv("MLFLOW_TRACKING_PASSWORD")
        with pytest.raises(TrackingStoreError, match="MLFLOW_TRACKING_USERNAME"):
            check_tracking_store(server.url)  # no credentials at all


def test_an_unreachable_server_is_one_clear_line_and_no_local_store(tmp_path: Path) -> None:
    project = copy_project(tmp_path / "project", PARAMS)
    down = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    env = project_env(project, MLFLOW_TRACKING_URI=down, AERIALSEG_TRACKING_TIMEOUT="5")
    # Bounded by `timeout`: MLflow's own client would retry a refused connection for minutes.
    for command in (
        ["python", "pipeline/train.py"],
        [AERIALSEG, "leaderboard"],
        [AERIALSEG, "predict", "x.tif", "-m", f"models:/{MODEL}@candidate"],
    ):
        done = run(project, *command, env=env, timeout=120, check=False)
        assert done.returncode != 0, command
        errors = [line for line in done.stderr.splitlines() if f"MLFLOW_TRACKING_URI={down}" in line]
        assert len(errors) == 1 and "cannot connect" in errors[0], (command, done.stderr[-2000:])
    assert not (project / "mlflow.db").exists() and not (project / "mlruns").exists()
