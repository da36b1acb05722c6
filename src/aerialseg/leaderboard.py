"""`aerialseg leaderboard`: every MLflow run of the experiment in one table, best first.

The lecture's "tutorial competition" table (accuracy and training time per team), generated from
the runs themselves: key params, the validation figure that picked each run's checkpoint, the test
figures `evaluate` logged beside it, the training time, the hardware, and where each run came from
(git commit, DVC experiment).

Ranked by validation by default: `selected_val_mean_f1`, the validation mean F1 of the epoch whose
checkpoint `train` published (whole validation tiles, eroded reference, the test protocol). Ranking
by a test figure is possible (`--sort test_mean_f1`), and the output then says that this selects on
the test set.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Sequence
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import pandas as pd
import typer
import yaml

from aerialseg.config import SETTINGS_FILE
from aerialseg.files import atomic_path
from aerialseg.names import (
    DVC_EXP_TAG,
    GIT_COMMIT_TAG,
    GIT_DIRTY_TAG,
    HARDWARE_TAG,
    SELECTED_EPOCH,
    TRAIN_SECONDS,
    selected,
    test,
    val,
)
from aerialseg.published import LECTURE_TAG, LECTURE_TILES, lecture_overall_accuracy_text
from aerialseg.tracking import TrackingStoreError, check_tracking_store, tracking_uri

DEFAULT_EXPERIMENT = "aerialseg"
BENCHMARK_SOURCES = ("vaihingen", "potsdam")
"""Runs with one of these `data.source` and `data.split: official` are benchmark runs: their
headline figures are the 5-class means (clutter out), as the benchmark's papers report them."""

PARAM_COLUMNS = {
    "arch": "model.arch",
    "encoder": "model.encoder",
    "data": "data.source",
    "split": "data.split",
    "epochs": "train.epochs",
    "overlap": "patches.overlap",
    "augment": "train.augment",
    "pretrained": "train.pretrained",
    "precision": "train.precision_resolved",
}
"""Leaderboard column -> MLflow param (training logs params.yaml flattened, `train.epochs`)."""
VAL_COLUMNS = {
    "val_mean_f1": selected(val("mean_f1")),
    "val_mean_f1_5": selected(val("mean_f1_5")),
    "val_miou": selected(val("miou")),
    "val_miou_5": selected(val("miou_5")),
    "val_oa": selected(val("overall_accuracy")),
    "val_kappa": selected(val("kappa")),
    "val_epoch": SELECTED_EPOCH,
}
"""Leaderboard column -> MLflow metric: the validation figures of the epoch whose checkpoint `train`
published (logged once, at the end of training, as selected_*)."""
TEST_COLUMNS = {
    "test_oa": test("overall_accuracy"),
    "test_mean_f1": test("mean_f1"),
    "test_miou": test("miou"),
    "test_mean_f1_5": test("mean_f1_5"),
    "test_miou_5": test("miou_5"),
    "test_kappa": test("kappa"),
}
"""Leaderboard column -> MLflow metric (`evaluate` logs test_*, eroded reference)."""
LECTURE_COLUMNS = {f"oa_full_{tile}": test(f"area{tile}", "overall_accuracy_full") for tile in LECTURE_TILES}
"""Leaderboard column -> MLflow metric: test OA of Vaihingen areas 15 and 23 on the full reference,
the figure that compares with the lecture's (Vaihingen runs only)."""
METRIC_COLUMNS = {**VAL_COLUMNS, **TEST_COLUMNS, **LECTURE_COLUMNS, "train_s": TRAIN_SECONDS}
"""Every leaderboard column read from an MLflow metric."""
OLD_NAMES = {"oa": "test_oa", "mean_f1": "test_mean_f1", "miou": "test_miou", "kappa": "test_kappa"}
"""Column names of earlier versions, still accepted by --sort (they were, and are, test figures)."""
SCORES = tuple(TEST_COLUMNS)
"""A run with any of these has been evaluated (--evaluated-only keeps only those)."""
HEADLINE = {
    6: ("val_mean_f1", "test_oa", "test_mean_f1", "test_miou", "test_kappa"),
    5: ("val_mean_f1_5", "test_oa", "test_mean_f1_5", "test_miou_5", "test_kappa"),
}
"""The score columns the terminal and markdown tables show, by the number of classes in the means."""
TRAILING = ("train_s", "hardware", "commit", "dvc_exp", "status")
DROP_FIRST = (
    "status",
    "started",
    "run_id",
    "precision",
    "pretrained",
    "augment",
    "overlap",
    "split",
    "data",
    "dvc_exp",
    "commit",
    "epochs",
    "lecture",
    "test_kappa",
    "test_miou",
    "test_miou_5",
    "hardware",
    "encoder",
    "arch",
)
"""Columns the terminal table leaves out, in this order, while it is wider than the terminal
(`hardware` wraps first); extra --param columns stay (asked for), and so do #, run, the validation
figure ranked by, test OA and mean F1, the lecture's comparison figures and train_s."""
WRAPPED = {"hardware": 18}
"""Columns that may wrap on the terminal, and the width they may shrink to."""
RIGHT_ALIGNED = {"#", *VAL_COLUMNS, *TEST_COLUMNS, *LECTURE_COLUMNS, "train_s", "epochs", "overlap", "lr"}
NUMERIC = {*METRIC_COLUMNS} - {"train_s", "val_epoch"}
"""Score columns, shown with three decimals."""


LECTURE_VIEW_PARAMS = {"optimizer": "train.optimizer", "lr": "train.lr"}
"""Columns of the lecture view beyond PARAM_COLUMNS: column -> MLflow param."""
LECTURE_VIEW = ("#", "run", "optimizer", "lr", "overlap", "epochs", "augment")
"""The lecture view's first columns: the run (a grid point's DVC experiment) and what the lecture's
competition varies; its figures follow (`lecture_view_columns`)."""


LECTURE_VIEW_NOTE = (
    "The lecture's table (WG, ACCURACY, TRAINING TIME): run = a working group's experiment; "
    "ACCURACY = test_oa (overall accuracy on the test tiles, eroded reference) with test mean F1 "
    "beside; TRAINING TIME = train_s (wall clock of `train`, all epochs and their validation, on "
    "`hardware`): compare times only between runs on the same hardware."
)


class View(StrEnum):
    """Which columns the table shows."""

    all = "all"
    lecture = "lecture"
    """The lecture's competition table: per run what it varied, accuracy and training time, hardware."""


class Format(StrEnum):
    table = "table"
    markdown = "markdown"
    csv = "csv"


class Classes(StrEnum):
    """How many classes the headline means average over."""

    auto = "auto"
    six = "6"
    five = "5"


def experiment_name(settings: Path = Path(SETTINGS_FILE)) -> str:
    """`tracking.experiment` from settings.yaml when it says, else "aerialseg" (no validation: a
    half-edited settings file must not stop anyone from looking at past runs)."""
    try:
        raw = yaml.safe_load(settings.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return DEFAULT_EXPERIMENT
    tracking = raw.get("tracking") if isinstance(raw, dict) else None
    name = tracking.get("experiment") if isinstance(tracking, dict) else None
    return str(name) if name else DEFAULT_EXPERIMENT


def load_runs(experiment: str, uri: str | None = None) -> list[Any]:
    """Every active run of `experiment` (all pages), as MLflow `Run` objects.

    Raises LookupError when the store has no such experiment.
    """
    from mlflow import MlflowClient

    check_tracking_store(uri or tracking_uri())  # a server that is down: one line now, not retries
    client = MlflowClient(uri or tracking_uri())
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = sorted(e.name for e in client.search_experiments())
        raise LookupError(
            f"no MLflow experiment {experiment!r} in {uri or tracking_uri()}"
            + (f" (it has: {', '.join(names)})" if names else " (it has none: run the pipeline first)")
        )
    runs: list[Any] = []
    token: str | None = None
    while True:
        page = client.search_runs([found.experiment_id], max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def build_leaderboard(
    runs: Iterable[Any],
    *,
    sort: str | None = None,
    ascending: bool = False,
    extra_params: Sequence[str] = (),
    evaluated_only: bool = False,
    classes: Classes | str = Classes.auto,
) -> pd.DataFrame:
    """One row per run, sorted by the column `sort`; runs without a value there come last, in
    MLflow's order (newest first). `sort` None: by validation, `default_sort`.

    Columns: run, run_id (full), started, the PARAM_COLUMNS, each of `extra_params` under its own
    name, the METRIC_COLUMNS (val_*: the published epoch's validation figures; test_*; oa_full_15
    and oa_full_23, Vaihingen runs only; train_s), lecture, hardware, commit (short), dirty,
    dvc_exp, status. Values are as logged: params are MLflow's strings, metrics floats (NaN when
    missing).

    Runs logged before `train` published the selected epoch's figures (no selected_val_* metrics)
    have no val_* values and are not ranked by validation: their per-epoch val_* were measured on
    overlapping patches against the full reference, another protocol, so no fallback mixes them in.
    """
    rows = [_row(run, extra_params) for run in runs]
    columns = [
        "run",
        "run_id",
        "started",
        *PARAM_COLUMNS,
        *extra_params,
        *METRIC_COLUMNS,
        "lecture",
        "hardware",
        "commit",
        "dirty",
        "dvc_exp",
        "status",
    ]
    table = pd.DataFrame(rows, columns=columns)
    for column in METRIC_COLUMNS:
        table[column] = pd.to_numeric(table[column], errors="coerce").astype("float64")
    table["dirty"] = table["dirty"].astype("boolean")
    if evaluated_only:
        table = table[table[list(SCORES)].notna().any(axis=1)]
    key = _column(sort, list(table.columns)) if sort else default_sort(table, classes)
    table = table.sort_values(key, ascending=ascending, na_position="last", kind="stable", key=_as_numbers)
    return table.reset_index(drop=True)


def is_benchmark(source: Any, split: Any) -> bool:
    """A run on the official benchmark: Vaihingen or Potsdam with the official split."""
    return source in BENCHMARK_SOURCES and split == "official"


def headline_classes(table: pd.DataFrame, classes: Classes | str = Classes.auto) -> int:
    """5 or 6: the classes the headline means average over. `auto`: 5 when every run that logged
    its data is a benchmark run (`is_benchmark`), else 6, so that a mixed experiment is compared on
    the figure every run has (the 6-class means; --classes 5 shows the benchmark's)."""
    if Classes(classes) is not Classes.auto:
        return int(Classes(classes).value)
    known = table[table["data"].notna()]
    if known.empty:
        return 6
    benchmark = [is_benchmark(src, split) for src, split in zip(known["data"], known["split"], strict=True)]
    return 5 if all(benchmark) else 6


def default_sort(table: pd.DataFrame, classes: Classes | str = Classes.auto) -> str:
    """The validation figure that picks a model: val_mean_f1, or val_mean_f1_5 where the
    headline means are over 5 classes."""
    return HEADLINE[headline_classes(table, classes)][0]


def _as_numbers(values: pd.Series) -> pd.Series:
    """Params come back from MLflow as text: sort "100" after "12" when every value is a number."""
    if not (pd.api.types.is_object_dtype(values) or pd.api.types.is_string_dtype(values)):
        return values
    numbers = pd.to_numeric(values, errors="coerce")
    return numbers if numbers.notna().sum() == values.notna().sum() else values


def _row(run: Any, extra_params: Sequence[str]) -> dict[str, Any]:
    params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
    commit = tags.get(GIT_COMMIT_TAG) or tags.get("mlflow.source.git.commit") or ""
    started = run.info.start_time
    vaihingen = params.get("data.source") == "vaihingen"
    return {
        "run": run.info.run_name or tags.get("mlflow.runName", ""),
        "run_id": run.info.run_id,
        "started": datetime.fromtimestamp(started / 1000) if started else pd.NaT,
        **{column: params.get(key) for column, key in PARAM_COLUMNS.items()},
        **{key: params.get(key) for key in extra_params},
        **{column: metrics.get(key) for column, key in METRIC_COLUMNS.items()},
        # Area 15 or 23 of another dataset (synthetic scenes number their areas too) is no match.
        **{column: metrics.get(key) if vaihingen else None for column, key in LECTURE_COLUMNS.items()},
        "lecture": tags.get(LECTURE_TAG),
        "hardware": tags.get(HARDWARE_TAG),
        "commit": commit[:8] or None,
        "dirty": {"True": True, "False": False}.get(tags.get(GIT_DIRTY_TAG, "")),
        "dvc_exp": tags.get(DVC_EXP_TAG),
        "status": run.info.status,
    }


def _column(name: str, columns: Sequence[str]) -> str:
    """`name` as a column of the table: exactly, case-insensitively, by its name in earlier versions
    (oa, mean_f1, miou, kappa: test figures), or as its MLflow param or metric."""
    aliases = {key: column for column, key in {**PARAM_COLUMNS, **METRIC_COLUMNS}.items()}
    for candidate in (name, name.lower(), OLD_NAMES.get(name.lower(), ""), aliases.get(name, "")):
        if candidate in columns:
            return candidate
    raise ValueError(f"cannot sort by {name!r}: choose one of {', '.join(columns)}")


def selects_on_test(column: str) -> bool:
    """Whether ranking by `column` picks models by a test-set figure."""
    return column in TEST_COLUMNS or column in LECTURE_COLUMNS


def display_columns(
    table: pd.DataFrame, sort: str | None = None, classes: Classes | str = Classes.auto
) -> list[str]:
    """The header of the terminal and markdown tables: #, run, run_id, started, the key params and
    any extra ones, the HEADLINE scores (and the column ranked by, when it is another figure), the
    lecture's comparison figures when a run has them, then train_s, hardware, commit, dvc_exp and
    status."""
    key = _column(sort, list(table.columns)) if sort else default_sort(table, classes)
    extra = [c for c in table.columns if c not in _known_columns()]
    scores = list(HEADLINE[headline_classes(table, classes)])
    if key in METRIC_COLUMNS and key not in scores and key != "train_s":
        scores.insert(0 if key.startswith("val_") else 1, key)
    lecture = [c for c in LECTURE_COLUMNS if table[c].notna().any()]
    if lecture:
        lecture.append("lecture")
    return ["#", "run", "run_id", "started", *PARAM_COLUMNS, *extra, *scores, *lecture, *TRAILING]


def _known_columns() -> set[str]:
    return {"run", "run_id", "started", *PARAM_COLUMNS, *METRIC_COLUMNS, "lecture", "dirty", *TRAILING}


def lecture_view_columns(
    table: pd.DataFrame, sort: str | None = None, classes: Classes | str = Classes.auto
) -> list[str]:
    """The header of the lecture's competition table (`View.lecture`): LECTURE_VIEW, the validation
    figure ranked by, the accuracy (test OA and mean F1, the headline's classes), the lecture's
    Vaihingen 15/23 figures when a run has them, training time, hardware and status. The table must
    have the LECTURE_VIEW_PARAMS columns (`leaderboard_command` asks for them)."""
    key = _column(sort, list(table.columns)) if sort else default_sort(table, classes)
    n = headline_classes(table, classes)
    scores = [HEADLINE[n][0], "test_oa", "test_mean_f1" if n == 6 else "test_mean_f1_5"]
    if key in METRIC_COLUMNS and key not in scores and key != "train_s":
        scores.insert(0 if key.startswith("val_") else 1, key)
    lecture = [c for c in LECTURE_COLUMNS if table[c].notna().any()]
    return [*LECTURE_VIEW, *scores, *lecture, "train_s", "hardware", "status"]


def notes(table: pd.DataFrame, sort: str | None = None, classes: Classes | str = Classes.auto) -> list[str]:
    """One line each, said under the table: that a test figure selects on the test set, which runs
    are not ranked and why, which figure compares with the lecture, and the classes of the means."""
    key = _column(sort, list(table.columns)) if sort else default_sort(table, classes)
    out = []
    if selects_on_test(key):
        default = default_sort(table, classes)
        out.append(
            f"Ranked by {key}, a TEST figure: choosing a model by it selects on the test set, and its "
            f"test figures are then optimistic; the default ranks by validation ({default})."
        )
    unranked = int(table[key].isna().sum()) if key in table else 0
    if unranked and key in VAL_COLUMNS:
        out.append(
            f"{unranked} run(s) without {METRIC_COLUMNS[key]} (trained before validation followed the test "
            "protocol, or not finished): not ranked, listed last."
        )
    elif unranked:
        out.append(f"{unranked} run(s) without {key}: not ranked, listed last.")
    n = headline_classes(table, classes)
    out.append(
        "val_*: validation figures of the epoch whose checkpoint was published; test_*: test tiles; "
        + (
            "means over 5 classes (clutter left out, as the benchmark's papers report them)."
            if n == 5
            else "means over the 6 classes."
        )
    )
    if any(table[c].notna().any() for c in LECTURE_COLUMNS):
        columns = " and ".join(LECTURE_COLUMNS)
        out.append(
            f"{columns}: test OA of Vaihingen areas {' and '.join(LECTURE_TILES)} on the FULL reference, "
            f"the figure that compares with the lecture's ({lecture_overall_accuracy_text()}); "
            "`lecture` names the training that matches train.pretrained; reports/lecture_comparison.md "
            "has the per-class accuracies."
        )
    return out


def display_rows(
    table: pd.DataFrame,
    sort: str | None = None,
    classes: Classes | str = Classes.auto,
    columns: Sequence[str] | None = None,
) -> tuple[list[str], list[list[str]]]:
    """The header and cells of the terminal and markdown tables (`columns`, default
    `display_columns`), as text. `#` is the rank by the sort column, blank for runs without a value there."""
    header = list(columns) if columns is not None else display_columns(table, sort, classes)
    key = _column(sort, list(table.columns)) if sort else default_sort(table, classes)
    rows = []
    rank = 0
    for record in table.to_dict("records"):
        ranked = _number(record[key]) is not None if key in METRIC_COLUMNS else bool(_text(record[key]))
        rank += ranked
        cells = {
            "#": str(rank) if ranked else "",
            "run_id": str(record["run_id"])[:8],
            "started": _when(record["started"]),
            **{c: _score(record[c]) for c in NUMERIC},
            "val_epoch": _text(None if _number(record["val_epoch"]) is None else int(record["val_epoch"])),
            "train_s": _duration(record["train_s"]),
            "commit": _commit(record["commit"], record["dirty"]),
        }
        rows.append([cells[c] if c in cells else _text(record.get(c)) for c in header])
    return header, rows


def to_markdown(
    table: pd.DataFrame,
    sort: str | None = None,
    classes: Classes | str = Classes.auto,
    notes: Sequence[str] = (),
    columns: Sequence[str] | None = None,
) -> str:
    """A GitHub-flavoured markdown table (no tabulate needed) of `columns` (default
    `display_columns`); numbers right-aligned; `notes` after it, one paragraph each."""
    header, rows = display_rows(table, sort, classes, columns)

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |"

    rule = ["---:" if c in RIGHT_ALIGNED else "---" for c in header]
    text = "\n".join([line(header), "| " + " | ".join(rule) + " |", *map(line, rows)]) + "\n"
    return text + "".join(f"\n{note}\n" for note in notes)


def to_csv(table: pd.DataFrame) -> str:
    """Every column, values as logged (full run ids, seconds, unrounded scores)."""
    return str(table.to_csv(index=False))


def render_table(
    table: pd.DataFrame,
    title: str,
    sort: str | None = None,
    classes: Classes | str = Classes.auto,
    notes: Sequence[str] = (),
    columns: Sequence[str] | None = None,
) -> str:
    """The terminal table as plain text, every column (for --output with the table format), and
    the notes under it."""
    from rich.console import Console

    header, rows = display_rows(table, sort, classes, columns)
    buffer = io.StringIO()
    console = Console(width=_natural_width(header, rows, shrink=False), file=buffer, color_system=None)
    console.print(_rich_table(header, rows, title))
    return buffer.getvalue() + "".join(f"{note}\n" for note in notes)


def print_table(
    table: pd.DataFrame,
    title: str,
    sort: str | None = None,
    classes: Classes | str = Classes.auto,
    notes: Sequence[str] = (),
    columns: Sequence[str] | None = None,
) -> None:
    """The table on the terminal, the notes under it; columns of DROP_FIRST are left out, in that
    order, until it fits."""
    from rich.console import Console

    console = Console()
    header, rows = display_rows(table, sort, classes, columns)
    hidden: list[str] = []
    for column in DROP_FIRST:
        if _natural_width(header, rows) <= console.width:
            break
        if column in header:
            keep = [i for i, c in enumerate(header) if c != column]
            header, rows = [header[i] for i in keep], [[row[i] for i in keep] for row in rows]
            hidden.append(column)
    out = _rich_table(header, rows, title)
    if hidden:
        out.caption = f"not shown (too narrow): {', '.join(hidden)}; --format markdown or csv has them all"
    console.print(out)
    for note in notes:
        console.print(note, highlight=False, markup=False, soft_wrap=True)  # one line each


def _natural_width(header: Sequence[str], rows: Sequence[Sequence[str]], shrink: bool = True) -> int:
    """Characters the rich table needs (borders and padding included) without wrapping a cell, or
    with the WRAPPED columns shrunk (`shrink`)."""
    widths = [
        min(max(len(c) for c in column), WRAPPED.get(column[0], 10**6) if shrink else 10**6)
        for column in zip(header, *rows, strict=True)
    ]
    return sum(widths) + 3 * len(widths) + 1


def _rich_table(header: Sequence[str], rows: Sequence[Sequence[str]], title: str) -> Any:
    from rich.table import Table

    out = Table(title=title, header_style="bold")
    for column in header:
        out.add_column(
            column, justify="right" if column in RIGHT_ALIGNED else "left", no_wrap=column not in WRAPPED
        )
    for i, row in enumerate(rows):
        out.add_row(*row, style="bold" if i == 0 and row[0] == "1" else None)
    return out


def _number(value: Any) -> float | None:
    if value is None or isinstance(value, str):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def _score(value: Any) -> str:
    number = _number(value)
    return "" if number is None else f"{number:.3f}"


def _duration(value: Any) -> str:
    seconds = _number(value)
    if seconds is None:
        return ""
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _when(value: Any) -> str:
    return "" if value is None or pd.isna(value) else f"{value:%Y-%m-%d %H:%M}"


def _commit(commit: Any, dirty: Any) -> str:
    if not _text(commit):
        return ""
    return f"{commit}+dirty" if _text(dirty) == "True" else str(commit)


def _text(value: Any) -> str:
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)


def leaderboard_command(
    sort: Annotated[
        str | None,
        typer.Option(
            help="column to rank by; default: the validation figure that picks the checkpoint "
            "(val_mean_f1, or val_mean_f1_5 for benchmark runs); also test_oa, test_mean_f1, "
            "test_miou, train_s, run, started, epochs, ... (a test figure selects on the test set)"
        ),
    ] = None,
    ascending: Annotated[bool, typer.Option("--ascending", help="smallest first (e.g. for train_s)")] = False,
    classes: Annotated[
        Classes,
        typer.Option(
            help="classes of the headline means: 5 (clutter out) or 6; auto: 5 when every run is a "
            "benchmark run (vaihingen/potsdam, data.split official), else 6"
        ),
    ] = Classes.auto,
    fmt: Annotated[
        Format | None,
        typer.Option("--format", help="table (terminal), markdown or csv; default from --output's suffix"),
    ] = None,
    output: Annotated[
        Path | None, typer.Option(help="write to this file (atomically) instead of the terminal")
    ] = None,
    experiment: Annotated[
        str | None, typer.Option(help="MLflow experiment; default: tracking.experiment in settings.yaml")
    ] = None,
    param: Annotated[
        list[str] | None, typer.Option(help="one more MLflow param as a column, e.g. train.lr (repeatable)")
    ] = None,
    evaluated_only: Annotated[
        bool, typer.Option("--evaluated-only", help="leave out runs without test scores")
    ] = False,
    top: Annotated[int | None, typer.Option(min=1, help="only the first N rows")] = None,
    settings: Annotated[Path, typer.Option(help="where tracking.experiment is read from")] = Path(
        SETTINGS_FILE
    ),
    uri: Annotated[
        str | None,
        typer.Option("--tracking-uri", help="MLflow store; default MLFLOW_TRACKING_URI or ./mlflow.db"),
    ] = None,
    view: Annotated[
        View,
        typer.Option(
            help="all: every key column; lecture: the lecture's competition table (what each run "
            "varied: optimizer, lr, overlap, epochs, augment; accuracy: test OA and mean F1; training "
            "time; hardware)"
        ),
    ] = View.all,
    grid: Annotated[
        str | None,
        typer.Option(help="only the runs of this grid (`aerialseg grid`: experiments named <grid>-<point>)"),
    ] = None,
) -> None:
    """Rank every MLflow run of the experiment by the validation figure that picked its checkpoint,
    with the test figures beside it: key params, validation and test scores, training time,
    hardware, git commit and DVC experiment (runs without the figure ranked by come last)."""
    name = experiment or experiment_name(settings)
    extra = list(dict.fromkeys(param or ()))
    if view is View.lecture:
        extra += [key for key in LECTURE_VIEW_PARAMS.values() if key not in extra]
    try:
        runs = load_runs(name, uri)
        if grid:
            runs = [r for r in runs if str(r.data.tags.get(DVC_EXP_TAG, "")).startswith(f"{grid}-")]
            if not runs:
                raise LookupError(
                    f"no run of grid {grid!r} in experiment {name!r} (runs whose DVC experiment, tag "
                    f"{DVC_EXP_TAG}, is named {grid}-<point>)"
                )
        table = build_leaderboard(
            runs,
            sort=sort,
            ascending=ascending,
            extra_params=extra,
            evaluated_only=evaluated_only,
            classes=classes,
        )
        # Decided on every run, before --top: the shown rows do not change the headline.
        key = _column(sort, list(table.columns)) if sort else default_sort(table, classes)
        chosen_classes = Classes(str(headline_classes(table, classes)))
    except (LookupError, ValueError, TrackingStoreError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    if top is not None:
        table = table.head(top)
    said = notes(table, key, chosen_classes)
    chosen = fmt or _format_for(output)
    kind = "TEST set" if selects_on_test(key) else "validation" if key in VAL_COLUMNS else ""
    title = f"{name}: {len(table)} runs, by {key}" + (f" ({kind})" if kind else "")
    title += " ascending" if ascending else ""
    columns = None
    if view is View.lecture:
        if chosen is not Format.csv:  # CSV keeps every column under its MLflow name
            table = table.rename(columns={v: k for k, v in LECTURE_VIEW_PARAMS.items()})
            columns = lecture_view_columns(table, key, chosen_classes)
            mine = [c for c in extra if c not in LECTURE_VIEW_PARAMS.values()]
            columns[len(LECTURE_VIEW) : len(LECTURE_VIEW)] = mine
        where = f"{name}, grid {grid}" if grid else name
        title = f"{where}: the lecture's competition, " + title.split(": ", 1)[1]
        said.append(LECTURE_VIEW_NOTE)
    if chosen is Format.csv:
        text = to_csv(table)
        for note in said:  # CSV stays parseable: the notes go to stderr
            typer.echo(note, err=True)
    elif chosen is Format.markdown:
        text = to_markdown(table, key, chosen_classes, said, columns)
    elif output is None:
        print_table(table, title, key, chosen_classes, said, columns)
        return
    else:
        text = render_table(table, title, key, chosen_classes, said, columns)
    if output is None:
        typer.echo(text, nl=False)
        return
    with atomic_path(output) as tmp:
        tmp.write_text(text)
    typer.echo(f"{output}: {len(table)} runs", err=True)
    if selects_on_test(key) and chosen is not Format.csv:
        typer.echo(said[0], err=True)


def _format_for(output: Path | None) -> Format:
    suffix = output.suffix.lower() if output else ""
    if suffix in (".md", ".markdown"):
        return Format.markdown
    if suffix == ".csv":
        return Format.csv
    return Format.table
