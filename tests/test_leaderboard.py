"""`aerialseg leaderboard` on a real MLflow store holding runs logged the way the pipeline logs them."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import typer
from typer.testing import CliRunner

from aerialseg.leaderboard import build_leaderboard, experiment_name, leaderboard_command, load_runs

EXPERIMENT = "competition"
# name: (params, test metrics, train_seconds, tags); "team-b" is better, "team-c" is not evaluated yet.
RUNS: dict[str, tuple[dict[str, str], dict[str, float], float, dict[str, str]]] = {
    "team-a": (
        {"model.arch": "fcn_skip", "model.encoder": "resnet50", "train.epochs": "20", "train.lr": "0.001"},
        {"test_overall_accuracy": 0.81, "test_mean_f1": 0.62, "test_miou": 0.50, "test_kappa": 0.74},
        1500.0,
        {"git_commit": "a" * 40, "git_dirty": "True", "dvc_exp_name": "team-a"},
    ),
    "team-b": (
        {"model.arch": "fpn", "model.encoder": "resnet18", "train.epochs": "12", "train.lr": "0.0005"},
        {"test_overall_accuracy": 0.79, "test_mean_f1": 0.71, "test_miou": 0.58, "test_kappa": 0.72},
        376.0,
        {"git_commit": "b" * 40, "git_dirty": "False"},
    ),
    "team-c": (
        {"model.arch": "unet", "model.encoder": "resnet34", "train.epochs": "100", "train.lr": "0.001"},
        {},
        42.0,
        {"git_commit": "c" * 40, "git_dirty": "False"},
    ),
}
COMMON = {
    "data.source": "synthetic",
    "patches.overlap": "0.5",
    "train.augment": "True",
    "train.pretrained": "none",
    "train.precision_resolved": "32",
}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A SQLite MLflow store with the three RUNS in experiment EXPERIMENT (and one run elsewhere)."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment(EXPERIMENT, artifact_location=(root / "artifacts").as_uri())
    other = client.create_experiment("other", artifact_location=(root / "other").as_uri())
    client.create_run(other, run_name="elsewhere")
    for name, (params, metrics, seconds, tags) in RUNS.items():
        run_id = client.create_run(experiment, run_name=name).info.run_id
        client.log_batch(
            run_id,
            metrics=[Metric(k, v, 0, 0) for k, v in {**metrics, "train_seconds": seconds}.items()],
            params=[Param(k, v) for k, v in {**COMMON, **params}.items()],
            tags=[RunTag(k, v) for k, v in {**tags, "hardware": "CPU: test (2 cores)"}.items()],
        )
        client.set_terminated(run_id)
    return uri


@pytest.fixture(autouse=True)
def _in_tmp(store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(f"tracking:\n  experiment: {EXPERIMENT}\n")
    yield


def _cli(*args: str) -> Any:
    app = typer.Typer()
    app.command("leaderboard")(leaderboard_command)
    app.command("other")(lambda: None)  # two commands, so that `leaderboard` is a subcommand
    return CliRunner().invoke(app, ["leaderboard", *args])


def test_leaderboard_ranks_the_runs_by_mean_f1() -> None:
    table = build_leaderboard(load_runs(EXPERIMENT))
    assert list(table["run"]) == ["team-b", "team-a", "team-c"]  # not evaluated: last
    best = table.iloc[0]
    assert (best["arch"], best["encoder"], best["epochs"], best["data"]) == (
        "fpn",
        "resnet18",
        "12",
        "synthetic",
    )
    assert (best["oa"], best["mean_f1"], best["miou"], best["kappa"]) == (0.79, 0.71, 0.58, 0.72)
    assert best["train_s"] == 376.0 and best["hardware"] == "CPU: test (2 cores)"
    assert best["commit"] == "b" * 8 and not best["dirty"] and best["status"] == "FINISHED"
    assert table.iloc[1]["dvc_exp"] == "team-a" and bool(table.iloc[1]["dirty"])
    assert pd.isna(table.iloc[2]["mean_f1"]) and table.iloc[2]["train_s"] == 42.0
    assert len(table["run_id"].iloc[0]) == 32


def test_leaderboard_sorts_by_any_column() -> None:
    runs = load_runs(EXPERIMENT)
    assert list(build_leaderboard(runs, sort="oa")["run"]) == ["team-a", "team-b", "team-c"]
    assert build_leaderboard(runs, sort="test_overall_accuracy")["run"].iloc[0] == "team-a"
    assert list(build_leaderboard(runs, sort="train_s", ascending=True)["run"]) == [
        "team-c",
        "team-b",
        "team-a",
    ]
    assert list(build_leaderboard(runs, sort="model.encoder", ascending=True)["run"]) == [
        "team-b",
        "team-c",
        "team-a",
    ]
    # Params are text in MLflow; numbers sort as numbers ("100" after "20").
    assert list(build_leaderboard(runs, sort="epochs")["run"]) == ["team-c", "team-a", "team-b"]
    assert list(build_leaderboard(runs, evaluated_only=True)["run"]) == ["team-b", "team-a"]
    with pytest.raises(ValueError, match="cannot sort by 'speed'"):
        build_leaderboard(runs, sort="speed")


def test_markdown_output_lists_both_evaluated_runs(tmp_path: Path) -> None:
    out = tmp_path / "reports" / "leaderboard.md"
    result = _cli("--output", str(out), "--param", "train.lr")
    assert result.exit_code == 0, result.output
    lines = out.read_text().splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[:3] == ["#", "run", "run_id"] and "train.lr" in header
    assert {"oa", "mean_f1", "miou", "kappa", "train_s", "hardware", "commit", "dvc_exp"} <= set(header)
    assert set(lines[1].replace("|", "").split()) <= {"---", "---:"}
    rows = [
        dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=True)) for line in lines[2:]
    ]
    assert [(r["#"], r["run"]) for r in rows] == [("1", "team-b"), ("2", "team-a"), ("", "team-c")]
    assert rows[0]["mean_f1"] == "0.710" and rows[0]["train_s"] == "6 min 16 s"
    assert rows[0]["train.lr"] == "0.0005" and rows[1]["commit"] == "aaaaaaaa+dirty"
    assert not list(out.parent.glob(".*tmp*"))  # written atomically, nothing left behind


def test_csv_output_parses_with_full_run_ids(tmp_path: Path) -> None:
    result = _cli("--format", "csv", "--sort", "oa", "--evaluated-only")
    assert result.exit_code == 0, result.output
    table = pd.read_csv(io.StringIO(result.stdout))
    assert list(table["run"]) == ["team-a", "team-b"]
    assert list(table["oa"]) == [0.81, 0.79]
    ids = {r.info.run_name: r.info.run_id for r in load_runs(EXPERIMENT)}
    assert list(table["run_id"]) == [ids["team-a"], ids["team-b"]]

    out = tmp_path / "board.csv"
    assert _cli("--output", str(out), "--top", "1").exit_code == 0
    assert list(pd.read_csv(out)["run"]) == ["team-b"]


def test_terminal_table_shows_the_runs() -> None:
    result = _cli()
    assert result.exit_code == 0, result.output
    assert "team-b" in result.stdout and "team-a" in result.stdout and "0.710" in result.stdout
    assert result.stdout.index("team-b") < result.stdout.index("team-a")


def test_unknown_experiment_or_column_is_a_clear_error() -> None:
    result = _cli("--experiment", "nope")
    assert result.exit_code == 2 and "no MLflow experiment 'nope'" in result.output
    assert "competition" in result.output
    result = _cli("--sort", "speed")
    assert result.exit_code == 2 and "cannot sort by 'speed'" in result.output


def test_experiment_name_comes_from_params(tmp_path: Path) -> None:
    assert experiment_name(tmp_path / "params.yaml") == EXPERIMENT
    assert experiment_name(tmp_path / "missing.yaml") == "aerialseg"
    (tmp_path / "broken.yaml").write_text("tracking: [\n")
    assert experiment_name(tmp_path / "broken.yaml") == "aerialseg"
