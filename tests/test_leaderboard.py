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

from aerialseg.leaderboard import (
    build_leaderboard,
    default_sort,
    experiment_name,
    headline_classes,
    leaderboard_command,
    load_runs,
)

EXPERIMENT = "competition"
# name: (params, metrics, train_seconds, tags). By validation (the figure that picked each run's
# checkpoint) team-a is best, then team-c (trained, not evaluated yet), then team-b; by test mean
# F1 team-b is best. team-old was logged before training published selected_val_* figures.
RUNS: dict[str, tuple[dict[str, str], dict[str, float], float, dict[str, str]]] = {
    "team-a": (
        {"model.arch": "fcn_skip", "model.encoder": "resnet50", "train.epochs": "20", "train.lr": "0.001"},
        {
            "selected_val_mean_f1": 0.70,
            "selected_val_overall_accuracy": 0.84,
            "selected_epoch": 17,
            "test_overall_accuracy": 0.81,
            "test_mean_f1": 0.62,
            "test_miou": 0.50,
            "test_kappa": 0.74,
        },
        1500.0,
        {"git_commit": "a" * 40, "git_dirty": "True", "dvc_exp_name": "team-a"},
    ),
    "team-b": (
        {"model.arch": "fpn", "model.encoder": "resnet18", "train.epochs": "12", "train.lr": "0.0005"},
        {
            "selected_val_mean_f1": 0.66,
            "selected_epoch": 9,
            "test_overall_accuracy": 0.79,
            "test_mean_f1": 0.71,
            "test_miou": 0.58,
            "test_kappa": 0.72,
        },
        376.0,
        {"git_commit": "b" * 40, "git_dirty": "False"},
    ),
    "team-c": (
        {"model.arch": "unet", "model.encoder": "resnet34", "train.epochs": "100", "train.lr": "0.001"},
        {"selected_val_mean_f1": 0.68, "selected_epoch": 99},
        42.0,
        {"git_commit": "c" * 40, "git_dirty": "False"},
    ),
    "team-old": (
        {"model.arch": "fpn", "model.encoder": "mobilenet_v2", "train.epochs": "15", "train.lr": "0.001"},
        {"val_mean_f1": 0.99, "test_overall_accuracy": 0.83, "test_mean_f1": 0.60, "test_miou": 0.49},
        900.0,
        {"git_commit": "d" * 40, "git_dirty": "False"},
    ),
}
COMMON = {
    "data.source": "synthetic",
    "data.split": "custom",
    "patches.overlap": "0.5",
    "train.augment": "True",
    "train.pretrained": "none",
    "train.precision_resolved": "32",
}
BENCHMARK = "benchmark"
BENCHMARK_PARAMS = {**COMMON, "data.source": "vaihingen", "data.split": "official"}
# By the 5-class validation mean F1 bench-1 is best; by the 6-class one, bench-2.
BENCHMARK_RUNS: dict[str, tuple[dict[str, str], dict[str, float], float, dict[str, str]]] = {
    "bench-1": (
        BENCHMARK_PARAMS,
        {
            "selected_val_mean_f1": 0.80,
            "selected_val_mean_f1_5": 0.85,
            "test_overall_accuracy": 0.90,
            "test_mean_f1": 0.78,
            "test_mean_f1_5": 0.88,
            "test_miou_5": 0.79,
        },
        100.0,
        {},
    ),
    "bench-2": (
        {**BENCHMARK_PARAMS, "data.source": "potsdam"},
        {
            "selected_val_mean_f1": 0.82,
            "selected_val_mean_f1_5": 0.84,
            "test_overall_accuracy": 0.91,
            "test_mean_f1": 0.80,
            "test_mean_f1_5": 0.87,
            "test_miou_5": 0.78,
        },
        100.0,
        {},
    ),
}
LECTURE = "lecture-vaihingen"
LECTURE_RUNS: dict[str, tuple[dict[str, str], dict[str, float], float, dict[str, str]]] = {
    "lecture-scratch": (
        {**COMMON, "data.source": "vaihingen", "model.arch": "fcn_skip"},
        {
            "selected_val_mean_f1": 0.61,
            "test_overall_accuracy": 0.85,
            "test_mean_f1": 0.60,
            "test_area15_overall_accuracy_full": 0.8123,
            "test_area23_overall_accuracy_full": 0.7911,
        },
        1000.0,
        {"lecture_comparison": "from_scratch"},
    ),
    # Synthetic scenes number their areas too: its area 15 is not the lecture's.
    "synthetic-15": (
        {**COMMON, "model.arch": "fpn"},
        {"selected_val_mean_f1": 0.90, "test_area15_overall_accuracy_full": 0.95},
        100.0,
        {},
    ),
}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A SQLite MLflow store with the RUNS in experiment EXPERIMENT, BENCHMARK_RUNS in BENCHMARK,
    LECTURE_RUNS in LECTURE (and one run elsewhere)."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    other = client.create_experiment("other", artifact_location=(root / "other").as_uri())
    client.create_run(other, run_name="elsewhere")
    for title, runs in ((EXPERIMENT, RUNS), (BENCHMARK, BENCHMARK_RUNS), (LECTURE, LECTURE_RUNS)):
        experiment = client.create_experiment(title, artifact_location=(root / title).as_uri())
        for name, (params, metrics, seconds, tags) in runs.items():
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
    (tmp_path / "settings.yaml").write_text(f"tracking:\n  experiment: {EXPERIMENT}\n")
    yield


def _cli(*args: str) -> Any:
    app = typer.Typer()
    app.command("leaderboard")(leaderboard_command)
    app.command("other")(lambda: None)  # two commands, so that `leaderboard` is a subcommand
    return CliRunner().invoke(app, ["leaderboard", *args])


def _markdown_rows(text: str) -> tuple[list[str], list[dict[str, str]], list[str]]:
    """Header, rows (as dicts) and the note lines after the table."""
    lines = text.splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert set(lines[1].replace("|", "").split()) <= {"---", "---:"}
    table = [line for line in lines[2:] if line.startswith("|")]
    rows = [dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=True)) for line in table]
    return header, rows, [line for line in lines[2 + len(table) :] if line]


def test_leaderboard_ranks_the_runs_by_validation() -> None:
    table = build_leaderboard(load_runs(EXPERIMENT))
    # By the validation figure that picked each checkpoint, whether evaluated or not; the run
    # without selected_val_* figures last, unranked (its val_* came from another protocol).
    assert list(table["run"]) == ["team-a", "team-c", "team-b", "team-old"]
    best = table.iloc[0]
    assert (best["arch"], best["encoder"], best["epochs"], best["data"], best["split"]) == (
        "fcn_skip",
        "resnet50",
        "20",
        "synthetic",
        "custom",
    )
    assert (best["val_mean_f1"], best["val_oa"], best["val_epoch"]) == (0.70, 0.84, 17)
    assert (best["test_oa"], best["test_mean_f1"], best["test_miou"], best["test_kappa"]) == (
        0.81,
        0.62,
        0.50,
        0.74,
    )
    assert best["train_s"] == 1500.0 and best["hardware"] == "CPU: test (2 cores)"
    assert best["commit"] == "a" * 8 and bool(best["dirty"]) and best["status"] == "FINISHED"
    assert best["dvc_exp"] == "team-a" and not table.iloc[2]["dirty"]
    assert pd.isna(table.iloc[1]["test_mean_f1"]) and table.iloc[1]["train_s"] == 42.0
    assert pd.isna(table.iloc[3]["val_mean_f1"]) and table.iloc[3]["test_oa"] == 0.83
    assert len(table["run_id"].iloc[0]) == 32
    assert default_sort(table) == "val_mean_f1" and headline_classes(table) == 6


def test_leaderboard_sorts_by_any_column() -> None:
    runs = load_runs(EXPERIMENT)
    by_test = ["team-b", "team-a", "team-old", "team-c"]
    assert list(build_leaderboard(runs, sort="test_mean_f1")["run"]) == by_test
    # The names of earlier versions (test figures) and the MLflow names still work.
    assert list(build_leaderboard(runs, sort="mean_f1")["run"]) == by_test
    assert list(build_leaderboard(runs, sort="oa")["run"]) == ["team-old", "team-a", "team-b", "team-c"]
    assert build_leaderboard(runs, sort="test_overall_accuracy")["run"].iloc[0] == "team-old"
    assert build_leaderboard(runs, sort="selected_val_mean_f1")["run"].iloc[0] == "team-a"
    assert list(build_leaderboard(runs, sort="train_s", ascending=True)["run"]) == [
        "team-c",
        "team-b",
        "team-old",
        "team-a",
    ]
    assert list(build_leaderboard(runs, sort="model.encoder", ascending=True)["run"]) == [
        "team-old",
        "team-b",
        "team-c",
        "team-a",
    ]
    # Params are text in MLflow; numbers sort as numbers ("100" after "20").
    assert list(build_leaderboard(runs, sort="epochs")["run"]) == ["team-c", "team-a", "team-old", "team-b"]
    assert list(build_leaderboard(runs, evaluated_only=True)["run"]) == ["team-a", "team-b", "team-old"]
    with pytest.raises(ValueError, match="cannot sort by 'speed'"):
        build_leaderboard(runs, sort="speed")


def test_markdown_output_ranks_by_validation_with_test_figures_beside(tmp_path: Path) -> None:
    out = tmp_path / "reports" / "leaderboard.md"
    result = _cli("--output", str(out), "--param", "train.lr")
    assert result.exit_code == 0, result.output
    header, rows, notes = _markdown_rows(out.read_text())
    assert header[:3] == ["#", "run", "run_id"] and "train.lr" in header
    assert header.index("val_mean_f1") < header.index("test_oa") < header.index("test_mean_f1")
    assert {"test_miou", "test_kappa", "train_s", "hardware", "commit", "dvc_exp"} <= set(header)
    assert "oa_full_15" not in header  # no run compares with the lecture
    assert [(r["#"], r["run"]) for r in rows] == [
        ("1", "team-a"),
        ("2", "team-c"),
        ("3", "team-b"),
        ("", "team-old"),
    ]
    assert rows[0]["val_mean_f1"] == "0.700" and rows[0]["test_mean_f1"] == "0.620"
    assert rows[1]["test_mean_f1"] == "" and rows[2]["train_s"] == "6 min 16 s"
    assert rows[2]["train.lr"] == "0.0005" and rows[0]["commit"] == "aaaaaaaa+dirty"
    assert not any("TEST figure" in note for note in notes)
    assert any(note.startswith("1 run(s) without selected_val_mean_f1") for note in notes)
    assert not list(out.parent.glob(".*tmp*"))  # written atomically, nothing left behind


def test_ranking_by_a_test_figure_says_it_selects_on_the_test_set(tmp_path: Path) -> None:
    warning = "Ranked by test_mean_f1, a TEST figure: choosing a model by it selects on the test set"
    for args in ((), ("--format", "markdown"), ("--format", "csv")):
        result = _cli("--sort", "test_mean_f1", *args)
        assert result.exit_code == 0, result.output
        lines = [line for line in result.output.splitlines() if warning in line]
        assert len(lines) == 1, result.output  # one line, once
        assert "default ranks by validation (val_mean_f1)" in lines[0]
    # CSV keeps it off stdout, which stays parseable.
    assert warning not in result.stdout and warning in result.stderr
    assert list(pd.read_csv(io.StringIO(result.stdout))["run"])[:2] == ["team-b", "team-a"]
    # The old name of the test figure warns the same way; validation and other columns do not.
    assert warning.replace("test_mean_f1", "test_oa") in _cli("--sort", "oa").output
    for sort in ((), ("--sort", "val_oa"), ("--sort", "train_s")):
        assert "selects on the test set" not in _cli(*sort).output
    out = tmp_path / "board.md"
    result = _cli("--sort", "test_mean_f1", "--output", str(out))
    assert warning in out.read_text() and warning in result.stderr


def test_benchmark_runs_headline_the_5_class_means() -> None:
    table = build_leaderboard(load_runs(BENCHMARK))
    assert headline_classes(table) == 5 and default_sort(table) == "val_mean_f1_5"
    assert list(table["run"]) == ["bench-1", "bench-2"]
    header, rows, notes = _markdown_rows(_cli("--experiment", BENCHMARK, "--format", "markdown").stdout)
    assert header.index("val_mean_f1_5") < header.index("test_oa") < header.index("test_mean_f1_5")
    assert "test_miou_5" in header and not {"val_mean_f1", "test_mean_f1", "test_miou"} & set(header)
    assert [(r["#"], r["run"], r["val_mean_f1_5"], r["test_mean_f1_5"]) for r in rows] == [
        ("1", "bench-1", "0.850", "0.880"),
        ("2", "bench-2", "0.840", "0.870"),
    ]
    assert any("means over 5 classes (clutter left out" in note for note in notes)
    # --classes 6 asks for the 6-class means: the other run is better there.
    header, rows, _ = _markdown_rows(
        _cli("--experiment", BENCHMARK, "--format", "markdown", "--classes", "6").stdout
    )
    assert "val_mean_f1" in header and "val_mean_f1_5" not in header
    assert [r["run"] for r in rows] == ["bench-2", "bench-1"]
    # Mixed with runs that are not on the benchmark: the figure every run has, over 6 classes.
    mixed = build_leaderboard([*load_runs(BENCHMARK), *load_runs(EXPERIMENT)])
    assert headline_classes(mixed) == 6
    assert list(mixed["run"])[:3] == ["bench-2", "bench-1", "team-a"]


def test_lecture_runs_show_the_full_reference_oa_that_compares_with_the_lecture() -> None:
    table = build_leaderboard(load_runs(LECTURE))
    by_run = table.set_index("run")
    assert by_run.loc["lecture-scratch", "oa_full_15"] == 0.8123
    assert by_run.loc["lecture-scratch", "oa_full_23"] == 0.7911
    assert by_run.loc["lecture-scratch", "lecture"] == "from_scratch"
    assert pd.isna(by_run.loc["synthetic-15", "oa_full_15"])  # not Vaihingen: not the lecture's tile
    header, rows, notes = _markdown_rows(_cli("--experiment", LECTURE, "--format", "markdown").stdout)
    assert {"oa_full_15", "oa_full_23", "lecture"} <= set(header)
    lecture = next(r for r in rows if r["run"] == "lecture-scratch")
    assert (lecture["oa_full_15"], lecture["oa_full_23"], lecture["lecture"]) == (
        "0.812",
        "0.791",
        "from_scratch",
    )
    (note,) = [n for n in notes if n.startswith("oa_full_15 and oa_full_23")]
    assert "FULL reference" in note and "compares with the lecture" in note
    assert "80.68% / 78.78%" in note and "82.15% / 82.04%" in note


def test_csv_output_parses_with_full_run_ids(tmp_path: Path) -> None:
    result = _cli("--format", "csv", "--sort", "oa", "--evaluated-only")
    assert result.exit_code == 0, result.output
    table = pd.read_csv(io.StringIO(result.stdout))
    assert list(table["run"]) == ["team-old", "team-a", "team-b"]
    assert list(table["test_oa"]) == [0.83, 0.81, 0.79]
    ids = {r.info.run_name: r.info.run_id for r in load_runs(EXPERIMENT)}
    assert list(table["run_id"]) == [ids["team-old"], ids["team-a"], ids["team-b"]]
    assert {"val_mean_f1", "val_mean_f1_5", "test_mean_f1_5", "oa_full_15", "lecture"} <= set(table.columns)

    out = tmp_path / "board.csv"
    assert _cli("--output", str(out), "--top", "1").exit_code == 0
    assert list(pd.read_csv(out)["run"]) == ["team-a"]


def test_terminal_table_shows_the_runs() -> None:
    result = _cli()
    assert result.exit_code == 0, result.output
    assert "team-b" in result.stdout and "team-a" in result.stdout and "0.710" in result.stdout
    assert result.stdout.index("team-a") < result.stdout.index("team-b")
    assert "by val_mean_f1 (validation)" in result.stdout


def test_unknown_experiment_or_column_is_a_clear_error() -> None:
    result = _cli("--experiment", "nope")
    assert result.exit_code == 2 and "no MLflow experiment 'nope'" in result.output
    assert "competition" in result.output
    result = _cli("--sort", "speed")
    assert result.exit_code == 2 and "cannot sort by 'speed'" in result.output


def test_experiment_name_comes_from_settings(tmp_path: Path) -> None:
    assert experiment_name(tmp_path / "settings.yaml") == EXPERIMENT
    assert experiment_name(tmp_path / "missing.yaml") == "aerialseg"
    (tmp_path / "broken.yaml").write_text("tracking: [\n")
    assert experiment_name(tmp_path / "broken.yaml") == "aerialseg"
