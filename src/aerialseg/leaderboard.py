"""`aerialseg leaderboard`: every MLflow run of the experiment in one table, best first.

The lecture's "tutorial competition" table (accuracy and training time per team), generated from
the runs themselves: key params, the test figures `evaluate` logged, the training time, the
hardware, and where each run came from (git commit, DVC experiment).
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

from aerialseg.files import atomic_path
from aerialseg.tracking import HARDWARE_TAG, tracking_uri

DEFAULT_EXPERIMENT = "aerialseg"
DEFAULT_SORT = "mean_f1"

PARAM_COLUMNS = {
    "arch": "model.arch",
    "encoder": "model.encoder",
    "data": "data.source",
    "epochs": "train.epochs",
    "overlap": "patches.overlap",
    "augment": "train.augment",
    "pretrained": "train.pretrained",
    "precision": "train.precision_resolved",
}
"""Leaderboard column -> MLflow param (training logs params.yaml flattened, `train.epochs`)."""
METRIC_COLUMNS = {
    "oa": "test_overall_accuracy",
    "mean_f1": "test_mean_f1",
    "miou": "test_miou",
    "kappa": "test_kappa",
    "train_s": "train_seconds",
}
"""Leaderboard column -> MLflow metric (`evaluate` logs test_*, `train` logs train_seconds)."""
SCORES = ("oa", "mean_f1", "miou", "kappa")
TEXT_COLUMNS = (
    "#",
    "run",
    "run_id",
    "started",
    *PARAM_COLUMNS,
    *METRIC_COLUMNS,
    "hardware",
    "commit",
    "dvc_exp",
    "status",
)
"""The columns of the terminal and markdown tables; CSV has every column of `build_leaderboard`."""
DROP_FIRST = (
    "status",
    "started",
    "run_id",
    "precision",
    "pretrained",
    "augment",
    "overlap",
    "data",
    "dvc_exp",
    "commit",
    "epochs",
    "kappa",
    "miou",
    "hardware",
    "encoder",
    "arch",
)
"""Columns the terminal table leaves out, in this order, while it is wider than the terminal
(`hardware` wraps first); extra --param columns stay (asked for), and so do #, run, oa, mean_f1
and train_s."""
WRAPPED = {"hardware": 18}
"""Columns that may wrap on the terminal, and the width they may shrink to."""
RIGHT_ALIGNED = {"#", *SCORES, "train_s", "epochs", "overlap"}


class Format(StrEnum):
    table = "table"
    markdown = "markdown"
    csv = "csv"


def experiment_name(params: Path = Path("params.yaml")) -> str:
    """`tracking.experiment` from params.yaml when it says, else "aerialseg" (no validation: a
    half-edited params file must not stop anyone from looking at past runs)."""
    try:
        raw = yaml.safe_load(params.read_text())
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
    sort: str = DEFAULT_SORT,
    ascending: bool = False,
    extra_params: Sequence[str] = (),
    evaluated_only: bool = False,
) -> pd.DataFrame:
    """One row per run, sorted by the column `sort` (runs without a value, such as runs not
    evaluated yet, last). Columns: run, run_id (full), started, the PARAM_COLUMNS, each of
    `extra_params` under its own name, the METRIC_COLUMNS, hardware, commit (short), dirty,
    dvc_exp, status. Values are as logged: params are MLflow's strings, metrics floats (NaN when
    missing)."""
    rows = [_row(run, extra_params) for run in runs]
    columns = [
        "run",
        "run_id",
        "started",
        *PARAM_COLUMNS,
        *extra_params,
        *METRIC_COLUMNS,
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
    key = _column(sort, list(table.columns))
    table = table.sort_values(key, ascending=ascending, na_position="last", kind="stable", key=_as_numbers)
    return table.reset_index(drop=True)


def _as_numbers(values: pd.Series) -> pd.Series:
    """Params come back from MLflow as text: sort "100" after "12" when every value is a number."""
    if not (pd.api.types.is_object_dtype(values) or pd.api.types.is_string_dtype(values)):
        return values
    numbers = pd.to_numeric(values, errors="coerce")
    return numbers if numbers.notna().sum() == values.notna().sum() else values


def _row(run: Any, extra_params: Sequence[str]) -> dict[str, Any]:
    params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
    commit = tags.get("git_commit") or tags.get("mlflow.source.git.commit") or ""
    started = run.info.start_time
    return {
        "run": run.info.run_name or tags.get("mlflow.runName", ""),
        "run_id": run.info.run_id,
        "started": datetime.fromtimestamp(started / 1000) if started else pd.NaT,
        **{column: params.get(key) for column, key in PARAM_COLUMNS.items()},
        **{key: params.get(key) for key in extra_params},
        **{column: metrics.get(key) for column, key in METRIC_COLUMNS.items()},
        "hardware": tags.get(HARDWARE_TAG),
        "commit": commit[:8] or None,
        "dirty": {"True": True, "False": False}.get(tags.get("git_dirty", "")),
        "dvc_exp": tags.get("dvc_exp_name"),
        "status": run.info.status,
    }


def _column(name: str, columns: Sequence[str]) -> str:
    """`name` as a column of the table: exactly, case-insensitively, or as its MLflow param or metric."""
    aliases = {key: column for column, key in {**PARAM_COLUMNS, **METRIC_COLUMNS}.items()}
    for candidate in (name, name.lower(), aliases.get(name, "")):
        if candidate in columns:
            return candidate
    raise ValueError(f"cannot sort by {name!r}: choose one of {', '.join(columns)}")


def display_rows(table: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """The header and cells of the terminal and markdown tables: TEXT_COLUMNS, with any extra
    params after the key ones, as text. `#` is the rank, blank for runs without test scores."""
    extra = [c for c in table.columns if c not in {*TEXT_COLUMNS, "dirty"}]
    split = TEXT_COLUMNS.index(list(PARAM_COLUMNS)[-1]) + 1
    header = [*TEXT_COLUMNS[:split], *extra, *TEXT_COLUMNS[split:]]
    rows = []
    rank = 0
    for record in table.to_dict("records"):
        scored = any(_number(record[c]) is not None for c in SCORES)
        rank += scored
        cells = {
            "#": str(rank) if scored else "",
            "run_id": str(record["run_id"])[:8],
            "started": _when(record["started"]),
            **{c: _score(record[c]) for c in SCORES},
            "train_s": _duration(record["train_s"]),
            "commit": _commit(record["commit"], record["dirty"]),
        }
        rows.append([cells[c] if c in cells else _text(record.get(c)) for c in header])
    return header, rows


def to_markdown(table: pd.DataFrame) -> str:
    """A GitHub-flavoured markdown table (no tabulate needed); numbers right-aligned."""
    header, rows = display_rows(table)

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |"

    rule = ["---:" if c in RIGHT_ALIGNED else "---" for c in header]
    return "\n".join([line(header), "| " + " | ".join(rule) + " |", *map(line, rows)]) + "\n"


def to_csv(table: pd.DataFrame) -> str:
    """Every column, values as logged (full run ids, seconds, unrounded scores)."""
    return str(table.to_csv(index=False))


def render_table(table: pd.DataFrame, title: str) -> str:
    """The terminal table as plain text, every column (for --output with the table format)."""
    from rich.console import Console

    header, rows = display_rows(table)
    buffer = io.StringIO()
    console = Console(width=_natural_width(header, rows, shrink=False), file=buffer, color_system=None)
    console.print(_rich_table(header, rows, title))
    return buffer.getvalue()


def print_table(table: pd.DataFrame, title: str) -> None:
    """The table on the terminal; columns of DROP_FIRST are left out, in that order, until it fits."""
    from rich.console import Console

    console = Console()
    header, rows = display_rows(table)
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
        str,
        typer.Option(help="column to rank by: oa, mean_f1, miou, kappa, train_s, run, started, epochs, ..."),
    ] = DEFAULT_SORT,
    ascending: Annotated[bool, typer.Option("--ascending", help="smallest first (e.g. for train_s)")] = False,
    fmt: Annotated[
        Format | None,
        typer.Option("--format", help="table (terminal), markdown or csv; default from --output's suffix"),
    ] = None,
    output: Annotated[
        Path | None, typer.Option(help="write to this file (atomically) instead of the terminal")
    ] = None,
    experiment: Annotated[
        str | None, typer.Option(help="MLflow experiment; default: tracking.experiment in params.yaml")
    ] = None,
    param: Annotated[
        list[str] | None, typer.Option(help="one more MLflow param as a column, e.g. train.lr (repeatable)")
    ] = None,
    evaluated_only: Annotated[
        bool, typer.Option("--evaluated-only", help="leave out runs without test scores")
    ] = False,
    top: Annotated[int | None, typer.Option(min=1, help="only the first N rows")] = None,
    params: Annotated[Path, typer.Option(help="where tracking.experiment is read from")] = Path(
        "params.yaml"
    ),
    uri: Annotated[
        str | None,
        typer.Option("--tracking-uri", help="MLflow store; default MLFLOW_TRACKING_URI or ./mlflow.db"),
    ] = None,
) -> None:
    """Rank every MLflow run of the experiment: key params, test OA / mean F1 / mIoU / kappa,
    training time, hardware, git commit and DVC experiment (runs not evaluated yet come last)."""
    name = experiment or experiment_name(params)
    try:
        runs = load_runs(name, uri)
        table = build_leaderboard(
            runs, sort=sort, ascending=ascending, extra_params=param or (), evaluated_only=evaluated_only
        )
    except (LookupError, ValueError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    if top is not None:
        table = table.head(top)
    chosen = fmt or _format_for(output)
    title = f"{name}: {len(table)} runs, by {sort}{' ascending' if ascending else ''}"
    if chosen is Format.csv:
        text = to_csv(table)
    elif chosen is Format.markdown:
        text = to_markdown(table)
    elif output is None:
        print_table(table, title)
        return
    else:
        text = render_table(table, title)
    if output is None:
        typer.echo(text, nl=False)
        return
    with atomic_path(output) as tmp:
        tmp.write_text(text)
    typer.echo(f"{output}: {len(table)} runs", err=True)


def _format_for(output: Path | None) -> Format:
    suffix = output.suffix.lower() if output else ""
    if suffix in (".md", ".markdown"):
        return Format.markdown
    if suffix == ".csv":
        return Format.csv
    return Format.table
