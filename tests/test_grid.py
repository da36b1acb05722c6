"""`aerialseg grid`: a grid file expanded into checked points, and a 2-point grid run by DVC's local
queue with 2 workers at once, both runs landing in the project's one SQLite store.

Two experiments at once write one SQLite file (MLflow's store): MLflow waits for SQLite's lock
(`PRAGMA busy_timeout = 20000` on every session), and `aerialseg grid` creates the store and its
experiment before the workers start, so they never race through the schema's creation. The slow
test checks that no run failed or logged "database is locked".
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from project_copy import ROOT, TINY, copy_project, mlflow_client, run
from typer.testing import CliRunner

from aerialseg.grid import GridError, expand
from aerialseg.leaderboard import leaderboard_command

GRID = """\
name: tiny
combine: product
axes:
  optimizer:
    - {train.optimizer: sgd, train.lr: 0.01}
    - {train.optimizer: adam, train.lr: 0.001}
"""
PARAMS = {**TINY, "train": {**TINY["train"], "epochs": 1, "limit_train_batches": 1}}


def _grid(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "grid.yaml"
    path.write_text(text)
    return path


def test_the_lecture_grid_has_its_list_one_change_at_a_time() -> None:
    grid = expand(ROOT / "grids" / "lecture.yaml", ROOT / "params.yaml")
    names = [p.name for p in grid.points]
    assert names[0] == "lecture-base" and len(names) == len(set(names)) == 15
    sgd = [p for p in grid.points if "train.optimizer=sgd" in p.overrides]
    assert sorted(o for p in sgd for o in p.overrides if o.startswith("train.lr=")) == sorted(
        f"train.lr={lr}" for lr in ("10", "1", "0.1", "0.001", "0.0001")
    )
    optimizers = {
        o.split("=")[1] for p in grid.points for o in p.overrides if o.startswith("train.optimizer=")
    }
    assert optimizers == {"sgd", "rmsprop", "adagrad", "adadelta", "adam", "adamax"}
    assert (
        "lecture-augment_false" in names and "lecture-overlap_0.3" in names and "lecture-epochs_40" in names
    )
    # Each point changes one thing of the base: the base's own values are not run twice.
    assert any(d.startswith("lecture-optimizer_adam-lr_0.001 ") for d in grid.dropped)
    base = set(grid.points[0].overrides)
    assert all(len(set(p.overrides) - base) <= 2 for p in grid.points)


def test_extra_overrides_apply_to_every_point_and_duplicates_are_dropped(tmp_path: Path) -> None:
    text = "name: g\naxes:\n  train.epochs: [1, 2]\n  train.augment: [true, false]\n"
    extra = ["train.epochs=3", "settings.yaml:tracking.experiment=competition"]
    grid = expand(_grid(tmp_path, text), ROOT / "params.yaml", extra)
    # base, epochs 1 and 2 (both 3 after --set: the same as the base), augment true and false
    assert [p.name for p in grid.points] == ["g-base", "g-augment_false"]
    assert all(p.overrides[-2:] == tuple(extra) for p in grid.points)
    assert len(grid.dropped) == 3
    assert grid.experiments == ("competition",)  # created in the store before the runs start


def test_a_bad_point_stops_the_grid_naming_file_point_and_options(tmp_path: Path) -> None:
    path = _grid(tmp_path, "name: g\naxes:\n  train.optimizer: [sgd, sgdd]\n")
    with pytest.raises(GridError) as err:
        expand(path, ROOT / "params.yaml")
    message = str(err.value)
    assert str(path) in message and "(g-optimizer_sgdd)" in message and "train.optimizer" in message
    assert "adamax" in message  # the registry's options
    with pytest.raises(GridError, match=r"train.num_workers: does not change results"):
        expand(_grid(tmp_path, "axes:\n  train.num_workers: [0, 2]\n"), ROOT / "params.yaml")
    with pytest.raises(GridError, match=r"trian.epochs"):
        expand(_grid(tmp_path, "axes:\n  trian.epochs: [1]\n"), ROOT / "params.yaml")
    with pytest.raises(GridError, match=r"unknown key\(s\) axis"):
        expand(_grid(tmp_path, "axis:\n  train.epochs: [1]\n"), ROOT / "params.yaml")


def test_the_lecture_view_prints_the_competitions_table_for_one_grid(tmp_path: Path) -> None:
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("teams", artifact_location=(tmp_path / "mlruns").as_uri())
    runs = {  # name: optimizer, lr, validation mean F1, test OA, seconds
        "g-base": ("adam", "0.001", 0.70, 0.91, 38.0),
        "g-optimizer_sgd-lr_10": ("sgd", "10.0", 0.17, 0.37, 25.0),
        "other-run": ("adam", "0.001", 0.99, 0.99, 1.0),
    }
    for name, (optimizer, lr, val_f1, test_oa, seconds) in runs.items():
        run_id = client.create_run(experiment, run_name=name).info.run_id
        params = {
            "train.optimizer": optimizer,
            "train.lr": lr,
            "patches.overlap": "0.6",
            "train.epochs": "20",
        }
        metrics = {
            "selected_val_mean_f1": val_f1,
            "test_overall_accuracy": test_oa,
            "test_mean_f1": 0.5,
            "train_seconds": seconds,
        }
        client.log_batch(
            run_id,
            metrics=[Metric(k, v, 0, 0) for k, v in metrics.items()],
            params=[
                Param(k, v)
                for k, v in {**params, "train.augment": "True", "data.source": "synthetic"}.items()
            ],
            tags=[RunTag("dvc_exp_name", name), RunTag("hardware", "CPU: test (2 cores)")],
        )
        client.set_terminated(run_id)
    app = typer.Typer()
    app.command("leaderboard")(leaderboard_command)
    app.command("other")(lambda: None)
    args = ["leaderboard", "--tracking-uri", uri, "--experiment", "teams", "--view", "lecture", "--grid", "g"]
    result = CliRunner().invoke(app, [*args, "--format", "markdown"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == [
        "#", "run", "optimizer", "lr", "overlap", "epochs", "augment",
        "val_mean_f1", "test_oa", "test_mean_f1", "train_s", "hardware", "status",
    ]  # fmt: skip
    assert lines[2].startswith("| 1 | g-base | adam | 0.001 | 0.6 | 20 | True | 0.700 | 0.910 |")
    assert lines[3].startswith("| 2 | g-optimizer_sgd-lr_10 | sgd | 10.0 |") and "25 s" in lines[3]
    assert "other-run" not in result.stdout  # not of the grid
    result = CliRunner().invoke(app, [*args[:-1], "nope"])
    assert result.exit_code == 2 and "no run of grid 'nope'" in result.output


@pytest.mark.slow
def test_a_grid_runs_two_at_a_time_into_the_projects_store(tmp_path: Path) -> None:
    project = copy_project(tmp_path / "project", PARAMS)
    (project / "grid.yaml").write_text(GRID)
    done = run(project, "aerialseg", "grid", "grid.yaml", "-j", "2", timeout=1200)
    output = done.stdout + done.stderr
    assert "database is locked" not in output

    client = mlflow_client(project)
    experiment = client.get_experiment_by_name("aerialseg")
    assert experiment is not None and experiment.artifact_location == (project / "mlruns").as_uri()
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.data.tags.get("dvc_exp_name") for r in runs) == [
        "tiny-optimizer_adam-lr_0.001",
        "tiny-optimizer_sgd-lr_0.01",
    ]
    for each in runs:
        assert each.info.status == "FINISHED", each.info
        assert "test_overall_accuracy" in each.data.metrics
    assert {r.data.params["train.optimizer"] for r in runs} == {"sgd", "adam"}
    # The two ran at the same time: each started before the other ended.
    first, second = sorted(runs, key=lambda r: r.info.start_time)
    assert second.info.start_time < first.info.end_time

    # Both are DVC experiments of the project, each with its MLflow run's id in its metrics.
    shown = json.loads(run(project, "dvc", "exp", "show", "--json").stdout)
    experiments = {e["name"]: e for rev in shown for e in (rev.get("experiments") or [])}
    for each in runs:
        name = each.data.tags["dvc_exp_name"]
        assert name in experiments, sorted(experiments)
        assert each.info.run_id in json.dumps(experiments[name])

    board = run(
        project, "aerialseg", "leaderboard", "--view", "lecture", "--grid", "tiny", "--format", "markdown"
    )
    header = board.stdout.splitlines()[0]
    for column in ("run", "optimizer", "lr", "test_oa", "test_mean_f1", "train_s", "hardware"):
        assert f" {column} " in header
    assert "| tiny-optimizer_sgd-lr_0.01 | sgd | 0.01 |" in board.stdout
    assert "TRAINING TIME = train_s" in board.stdout
