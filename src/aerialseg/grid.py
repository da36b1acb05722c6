"""`aerialseg grid`: a grid of experiments from one definition file, run by DVC's local queue or as
a Slurm job array; every point is a DVC experiment and an MLflow run of the project's one store.

A definition file (grids/lecture.yaml is the lecture's competition) names the grid, the params every
point shares (`base`) and the axes it varies. An axis is a list of alternatives, each a mapping of
params.yaml keys to values (one alternative may change several keys: an optimizer and its rate), or,
in short, `key: [value, ...]`. `combine: one-at-a-time` (the default) is the base point plus each
alternative of each axis applied alone to it, as the lecture's working groups each changed one thing;
`combine: product` is every combination. Points that come out the same (the base's own optimizer in
the optimizer axis) are run once. Every point is checked as the `params` stage checks params.yaml
(config.load_params, choices.check_choices) before anything is queued or submitted.

Overrides are written in DVC's `-S` grammar (Hydra's override syntax, `train.lr=0.1`) and applied
by DVC's own function for it (dvc.utils.hydra.apply_overrides) wherever DVC's `-S` is not the
one applying them, so a point means the same locally and on Slurm.

Locally: `dvc exp run --queue -n <name> -S ...` per point, then `dvc exp run --run-all -j N` (DVC's
queue workers, as `dvc queue start -j N`, followed until every experiment has finished). On Slurm:
one array task per point (slurm/grid.sbatch), each in its own git worktree of the project's
committed HEAD, sharing the project's DVC cache and MLflow store (`run_task`).
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from aerialseg.config import NOT_RESULTS, SETTINGS_FILE, ConfigError, load_params
from aerialseg.files import atomic_path

COMBINE = ("one-at-a-time", "product")
"""How the axes make points: each alternative alone on the base, or every combination."""
GRID_KEYS = {"name", "description", "combine", "base", "axes"}
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\Z")
"""A grid's name: the first part of its experiments' names, which are git ref names (DVC's exp refs)."""
TEMPLATE = Path("slurm/grid.sbatch")
STATE_DIR = Path(".dvc/tmp/grid")
"""Manifests of submitted grids, the lock and, by default, the array tasks' worktrees (DVC's tmp
folder: ignored by git and by DVC, on the project's file system, which the compute nodes see)."""
WORKTREES_ENV = "AERIALSEG_GRID_WORKTREES"
"""Folder for the array tasks' worktrees instead of <project>/.dvc/tmp/grid/worktrees."""
KEEP_ENV = "AERIALSEG_GRID_KEEP"
"""1: keep each task's worktree (to debug a point); it is removed otherwise, failed or not."""
THREADS_ENV = "OMP_NUM_THREADS"
"""Threads per experiment of a local grid: unless set, the cores this process may use / --jobs."""
LOCK_TIMEOUT = 600.0
"""Seconds a task waits for the grid lock (held for a few seconds at a time) before it gives up."""


class GridError(ValueError):
    """A grid file, a point or a step of running one is wrong; the message names what and where."""


@dataclass(frozen=True)
class Point:
    """One experiment of a grid: its DVC experiment name and its `-S` overrides, in order."""

    name: str
    overrides: tuple[str, ...]

    def set_args(self) -> list[str]:
        """`-S key=value` for each override, as `dvc exp run` takes them."""
        return [arg for override in self.overrides for arg in ("-S", override)]


@dataclass(frozen=True)
class Grid:
    name: str
    points: tuple[Point, ...]
    dropped: tuple[str, ...] = ()
    """Points left out because an earlier point has the same params (their would-be names)."""
    experiments: tuple[str, ...] = ()
    """The MLflow experiments (tracking.experiment) the points log to."""


# ---------------------------------------------------------------- reading a definition


def override(key: str, value: Any) -> str:
    """`key=value` in DVC's `-S` grammar: YAML's spelling of scalars (true, null, 0.001) and lists;
    a string other than a plain word is quoted."""
    return f"{key}={_value(value)}"


def _value(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ",".join(_value(v) for v in value) + "]"
    text = str(value)
    return text if re.fullmatch(r"[A-Za-z0-9_./+-]+", text) else "'" + text.replace("'", "\\'") + "'"


def _label(changes: Mapping[str, Any]) -> str:
    """`optimizer_sgd-lr_10`: each key's last part and its value, in file-name characters."""
    parts = [f"{key.rsplit('.', 1)[-1]}_{_value(value)}" for key, value in changes.items()]
    return re.sub(r"[^A-Za-z0-9_.-]+", "", "-".join(parts)).strip(".-") or "point"


def _alternatives(axis: str, spec: Any, source: Path) -> list[tuple[str, dict[str, Any]]]:
    """An axis as (label, changes) pairs: from `[{key: value, ...}, ...]` (an optional `name` key
    labels an alternative) or from `key: [value, ...]` (the axis is named by its key)."""
    if not isinstance(spec, list) or not spec:
        raise GridError(f"{source}: axes.{axis}: expected a non-empty list, got {spec!r}")
    out = []
    for i, item in enumerate(spec):
        if isinstance(item, Mapping):
            changes = {str(k): v for k, v in item.items() if k != "name"}
            if not changes:
                raise GridError(f"{source}: axes.{axis}[{i}]: changes no param")
            label = str(item.get("name") or _label(changes))
        elif "." in axis:
            changes = {axis: item}
            label = _label(changes)
        else:
            raise GridError(
                f"{source}: axes.{axis}[{i}]: {item!r} is a bare value, but {axis!r} is no params key "
                "(write `section.key: [values]`, or a list of {{section.key: value}} mappings)"
            )
        out.append((label, changes))
    return out


def read_definition(path: Path) -> dict[str, Any]:
    """The grid file as a mapping, checked for its keys; GridError naming the file otherwise."""
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise GridError(f"{path}: no such grid file (see grids/)") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise GridError(f"{path}: cannot be read as YAML ({err})") from None
    if not isinstance(raw, dict):
        raise GridError(f"{path}: expected a mapping with name, base, axes; got {type(raw).__name__}")
    unknown = set(raw) - GRID_KEYS
    if unknown:
        raise GridError(
            f"{path}: unknown key(s) {', '.join(sorted(unknown))}; expected {', '.join(sorted(GRID_KEYS))}"
        )
    name = str(raw.get("name") or path.stem)
    if not NAME_PATTERN.match(name):
        raise GridError(
            f"{path}: name {name!r}: expected letters, digits, '_', '.', '-' (it begins every point's name)"
        )
    if raw.get("combine", COMBINE[0]) not in COMBINE:
        raise GridError(f"{path}: combine: {raw['combine']!r} is not one of {', '.join(COMBINE)}")
    if not isinstance(raw.get("base") or {}, Mapping) or not isinstance(raw.get("axes") or {}, Mapping):
        raise GridError(f"{path}: base and axes must be mappings")
    return {**raw, "name": name}


def expand(path: Path, params_path: Path = Path("params.yaml"), extra: Sequence[str] = ()) -> Grid:
    """The points of grid file `path` on top of `params_path` (and settings.yaml beside it), with the
    `extra` overrides (`key=value`, the -S grammar) applied to every point last.

    Each point is checked as the `params` stage would check params.yaml; GridError names the grid
    file, the point and the problem. A point whose params equal an earlier point's is dropped.
    """
    raw = read_definition(path)
    name = raw["name"]
    base = {str(k): v for k, v in (raw.get("base") or {}).items()}
    axes = [
        (str(axis), _alternatives(str(axis), spec, path)) for axis, spec in (raw.get("axes") or {}).items()
    ]
    candidates: list[tuple[str, dict[str, Any]]] = []
    if raw.get("combine", COMBINE[0]) == "product":
        for combo in itertools.product(*(alternatives for _, alternatives in axes)):
            changes = dict(base)
            for _, alt in combo:
                changes.update(alt)
            candidates.append(("-".join(label for label, _ in combo) or "base", changes))
    else:
        candidates.append(("base", dict(base)))
        for _, alternatives in axes:
            candidates += [(label, {**base, **alt}) for label, alt in alternatives]
    points: list[Point] = []
    dropped: list[str] = []
    seen: dict[str, str] = {}
    names: set[str] = set()
    experiments: dict[str, None] = {}
    for key in (k for _, changes in candidates for k in changes):
        if any(key == s or key.startswith(f"{s}.") for s in NOT_RESULTS):
            raise GridError(
                f"{path}: {key}: does not change results (a setting, {SETTINGS_FILE}); a grid varies params"
            )
    for label, changes in candidates:
        overrides = tuple(override(k, v) for k, v in changes.items()) + tuple(extra)
        point_name = f"{name}-{label}"
        resolved, experiment = _check_point(point_name, overrides, params_path, path)
        if resolved in seen:
            dropped.append(f"{point_name} (= {seen[resolved]})")
            continue
        if point_name in names:
            raise GridError(f"{path}: two points are named {point_name!r}: give one a `name:`")
        seen[resolved] = point_name
        names.add(point_name)
        experiments[experiment] = None
        points.append(Point(point_name, overrides))
    if not points:
        raise GridError(f"{path}: the grid has no point")
    return Grid(name, tuple(points), tuple(dropped), tuple(experiments))


def _check_point(name: str, overrides: Sequence[str], params_path: Path, source: Path) -> tuple[str, str]:
    """The point's params.yaml and settings.yaml (DVC's -S applied to copies) validated as the
    params stage does; returns them as canonical JSON, to find points that are the same, and the
    point's MLflow experiment."""
    from aerialseg.choices import check_choices

    with tempfile.TemporaryDirectory(prefix="aerialseg-grid-") as folder:
        copy = Path(folder) / "params.yaml"
        shutil.copyfile(params_path, copy)
        settings = params_path.with_name(SETTINGS_FILE)
        if settings.exists():
            shutil.copyfile(settings, copy.with_name(SETTINGS_FILE))
        try:
            apply_overrides(Path(folder), overrides)
            params = load_params(copy)
            check_choices(params, source=f"{source} ({name})")
        except ConfigError as err:
            raise GridError(str(err).replace(str(copy), f"{source} ({name})")) from None
        except Exception as err:  # DVC's override parser: a malformed `key=value`
            raise GridError(f"{source} ({name}): cannot apply {' '.join(overrides)}: {err}") from None
        return json.dumps(params.model_dump(mode="json"), sort_keys=True), params.tracking.experiment


def apply_overrides(root: Path, overrides: Sequence[str]) -> None:
    """Apply `-S` overrides to the files under `root` as `dvc exp run -S` does: `key=value` to
    params.yaml, `settings.yaml:key=value` to that file (DVC's parser and writer)."""
    from dvc.utils.cli_parse import to_path_overrides
    from dvc.utils.hydra import apply_overrides as apply_to_file

    for file, changes in to_path_overrides(list(overrides)).items():
        apply_to_file(str(root / file), changes)


# ---------------------------------------------------------------- running locally


def run_local(grid: Grid, jobs: int, force: bool = False, dry_run: bool = False) -> int:
    """Queue every point with `dvc exp run --queue`, then run the queue with `jobs` workers and wait
    (`dvc exp run --run-all -j jobs`); the exit code of the queue's run (non-zero when a point failed)."""
    commands = [
        ["dvc", "exp", "run", "--queue", "-n", p.name, *(["-f"] if force else []), *p.set_args()]
        for p in grid.points
    ]
    commands.append(["dvc", "exp", "run", "--run-all", "-j", str(jobs)])
    if dry_run:
        for command in commands:
            typer.echo(shlex.join(command))
        return 0
    _prepare_store(grid)
    for command in commands[:-1]:
        _call(command, Path.cwd())
    env = dict(os.environ)
    # N trainings at once, each with one OpenMP thread per core, oversubscribe the cores: torch's
    # spinning threads then slow each other down many times over. The workers inherit this.
    env.setdefault(THREADS_ENV, str(max(1, len(os.sched_getaffinity(0)) // jobs)))
    typer.echo(
        f"{grid.name}: {len(grid.points)} experiment(s) queued; running them, {jobs} at a time "
        f"({THREADS_ENV}={env[THREADS_ENV]})"
    )
    return subprocess.run(commands[-1], env=env).returncode


def _prepare_store(grid: Grid) -> None:
    """Create the store and its experiment before the runs start: several processes creating one
    SQLite store at once race through its schema migrations (a store that exists is safe: MLflow
    waits up to 20 s for SQLite's lock, `PRAGMA busy_timeout`)."""
    from aerialseg.tracking import check_tracking_store, ensure_experiment

    check_tracking_store()
    for experiment in grid.experiments:
        ensure_experiment(experiment)


def _call(command: Sequence[str], cwd: Path, env: Mapping[str, str] | None = None) -> None:
    done = subprocess.run(list(command), cwd=cwd, env=None if env is None else dict(env))
    if done.returncode != 0:
        raise GridError(
            f"`{shlex.join(command)}` failed with exit code {done.returncode} in {cwd} (its output is above)"
        )


# ---------------------------------------------------------------- Slurm: submitting an array


@dataclass(frozen=True)
class Manifest:
    """What the array tasks of one submitted grid read: the project, the commit every worktree
    checks out, the tracking store and the points (task i runs points[i])."""

    grid: str
    project: str
    commit: str
    tracking_uri: str
    points: tuple[Point, ...]

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> Manifest:
        try:
            raw = json.loads(path.read_text())
            points = tuple(Point(p["name"], tuple(p["overrides"])) for p in raw.pop("points"))
            return cls(**raw, points=points)
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise GridError(
                f"{path}: not a grid manifest written by `aerialseg grid --slurm` ({err})"
            ) from None


def submit_slurm(
    grid: Grid,
    *,
    sbatch: Sequence[str] = (),
    parallel: int | None = None,
    wait: bool = False,
    template: Path = TEMPLATE,
    force: bool = False,
    dry_run: bool = False,
) -> int:
    """Submit `grid` as one Slurm job array of `template`, one task per point (at most `parallel` at
    once); with `wait`, return when every task has ended (sbatch --wait: non-zero if one failed)."""
    from aerialseg.tracking import tracking_uri

    project = Path.cwd().resolve()
    commit = _git(project, "rev-parse", "HEAD")
    dirty = _git(project, "status", "--porcelain", "--untracked-files=no").splitlines()
    problem = (
        f"{project}: {len(dirty)} tracked file(s) differ from the commit "
        f"({', '.join(line[3:] for line in dirty[:3])}{', ...' if len(dirty) > 3 else ''}); every array "
        "task checks out HEAD in its own worktree: commit (or stash) them first"
    )
    if dirty and not dry_run:
        raise GridError(problem)
    # DVC's refs/exps/<commit[:2]>/<commit[2:]>/<name>: refused now, not after the training.
    refs = _git(project, "for-each-ref", "--format=%(refname)", f"refs/exps/{commit[:2]}/{commit[2:]}/")
    taken = sorted({ref.rsplit("/", 1)[-1] for ref in refs.splitlines()} & {p.name for p in grid.points})
    if taken and not force:
        raise GridError(
            f"experiment(s) {', '.join(taken)} exist at {commit[:8]} already: --force replaces them "
            "(or rename the grid)"
        )
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    manifest_path = project / STATE_DIR / f"{grid.name}-{stamp}.json"
    array = f"0-{len(grid.points) - 1}" + (f"%{parallel}" if parallel else "")
    command = [
        "sbatch",
        f"--array={array}",
        *(["--wait"] if wait else []),
        *sbatch,
        str(template),
        str(manifest_path),
    ]
    if dry_run:
        typer.echo(shlex.join(command))
        if dirty:
            typer.echo(f"note: {problem}")
        return 0
    if not template.is_file():
        raise GridError(f"{template}: no such Slurm template (submit from the project root)")
    _prepare_store(grid)
    Manifest(grid.name, str(project), commit, tracking_uri(), grid.points).save(manifest_path)
    typer.echo(
        f"{grid.name}: {len(grid.points)} point(s) at {commit[:8]} -> {manifest_path.relative_to(project)}"
    )
    done = subprocess.run(command)
    return done.returncode


def _git(cwd: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise GridError(f"{cwd}: `git {' '.join(args)}` failed: {done.stderr.strip() or done.returncode}")
    return done.stdout.rstrip("\n")  # not strip(): porcelain lines start with a space


# ---------------------------------------------------------------- Slurm: one array task


@contextlib.contextmanager
def grid_lock(project: Path, timeout: float = LOCK_TIMEOUT) -> Iterator[None]:
    """An exclusive lock shared by a project's array tasks, for the steps that write the shared
    git refs: `git worktree add/remove` and `dvc exp save` (which sets refs/exps/exec/EXEC_*,
    one set per repository, shared by its worktrees). Raises GridError after `timeout` seconds."""
    path = project / STATE_DIR / "lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise GridError(
                        f"{path}: still locked after {timeout:.0f} s (another task of the grid hangs?)"
                    ) from None
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def worktrees_dir(project: Path) -> Path:
    return Path(os.environ.get(WORKTREES_ENV) or project / STATE_DIR / "worktrees")


def run_task(manifest_path: Path, index: int) -> int:
    """Array task `index` of a submitted grid: point `index` in a worktree of its own.

    1. `git worktree add --detach` of the manifest's commit (its own params.yaml, dvc.lock and DVC
       lock: no two tasks share one), `.dvc/config.local` copied from the project and the project's
       DVC cache set in it (`dvc cache dir --local`), so stages already run come from the cache;
    2. the point's overrides applied to its params.yaml and settings.yaml (as DVC's -S), `dvc repro` with the
       project's tracking store (MLFLOW_TRACKING_URI) and DVC_EXP_NAME = the point's name, which
       names the MLflow run as `dvc exp run` does;
    3. `dvc exp save -n <name>`: the experiment is a ref of the shared repository, so `dvc exp show`
       in the project lists it at once; its outputs are in the shared cache;
    4. the worktree removed (`git worktree remove --force`), failed or not, unless
       AERIALSEG_GRID_KEEP=1. A failed task keeps its Slurm log, its MLflow run and, in
       slurm/logs/, its params.yaml and dvc.lock (`grid-<job>_<task>.params.yaml`, `.dvc.lock`).
    """
    manifest = Manifest.load(manifest_path)
    if not 0 <= index < len(manifest.points):
        raise GridError(f"{manifest_path}: task {index} of a grid of {len(manifest.points)} point(s)")
    point = manifest.points[index]
    project = Path(manifest.project)
    job = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID") or str(os.getpid())
    tag = f"{job}_{index}"
    worktree = worktrees_dir(project) / f"{point.name}-{tag}"
    print(
        f"grid {manifest.grid}, task {index}: {point.name} ({' '.join(point.overrides)}) in {worktree}",
        flush=True,
    )
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": os.environ.get("MLFLOW_TRACKING_URI") or manifest.tracking_uri,
        "DVC_EXP_NAME": point.name,
        # The worktree's code, the commit's, runs its stages (not an install of a checkout that
        # may have moved on since the grid was submitted).
        "PYTHONPATH": os.pathsep.join([str(worktree / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]),
    }
    env.pop("DVC_ROOT", None)
    with grid_lock(project):
        if worktree.exists():  # a requeued task: start again from the commit
            shutil.rmtree(worktree)
            _call(["git", "worktree", "prune"], project)
        worktree.parent.mkdir(parents=True, exist_ok=True)
        _call(["git", "worktree", "add", "--detach", "--quiet", str(worktree), manifest.commit], project)
    ok = False
    try:
        _share_dvc(project, worktree)
        apply_overrides(worktree, point.overrides)
        _call(["dvc", "repro"], worktree, env)
        # The experiment commit holds what `dvc exp run` would commit: params.yaml, dvc.lock and the
        # outputs kept in git (metrics, small reports), also where the project does not track them yet.
        untracked = _git(worktree, "ls-files", "--others", "--exclude-standard").splitlines()
        include = [arg for path in untracked for arg in ("-I", path)]
        with grid_lock(project):
            _call(["dvc", "exp", "save", "-f", "-n", point.name, *include], worktree, env)
        ok = True
        print(f"grid task {index}: saved DVC experiment {point.name}", flush=True)
    finally:
        if not ok:
            _keep_for_debugging(project, worktree, tag)
        if os.environ.get(KEEP_ENV) == "1":
            print(f"grid task {index}: kept {worktree} ({KEEP_ENV}=1)", flush=True)
        else:
            with grid_lock(project):
                _call(["git", "worktree", "remove", "--force", str(worktree)], project)
    return 0


def _share_dvc(project: Path, worktree: Path) -> None:
    """The worktree uses the project's DVC configuration and cache."""
    local = project / ".dvc" / "config.local"
    if local.is_file():
        shutil.copyfile(local, worktree / ".dvc" / "config.local")
    cache = subprocess.run(["dvc", "cache", "dir"], cwd=project, capture_output=True, text=True, check=False)
    if cache.returncode != 0 or not cache.stdout.strip():
        raise GridError(f"{project}: `dvc cache dir` failed: {cache.stderr.strip()}")
    _call(["dvc", "cache", "dir", "--local", cache.stdout.strip()], worktree)


def _keep_for_debugging(project: Path, worktree: Path, tag: str) -> None:
    logs = project / "slurm" / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    kept = []
    for name in ("params.yaml", "dvc.lock"):
        if (worktree / name).is_file():
            shutil.copyfile(worktree / name, logs / f"grid-{tag}.{name}")
            kept.append(str(logs / f"grid-{tag}.{name}"))
    print(
        f"grid task failed: kept {', '.join(kept) or 'nothing of the worktree'}", file=sys.stderr, flush=True
    )


# ---------------------------------------------------------------- the commands


def grid_command(
    definition: Annotated[Path, typer.Argument(help="a grid file, e.g. grids/lecture.yaml")],
    jobs: Annotated[
        int,
        typer.Option(
            "--jobs",
            "-j",
            min=1,
            help="local: experiments at a time (DVC's queue workers); with the project's SQLite store "
            "keep 1-2, use a team server for more",
        ),
    ] = 1,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set", "-S", help="key=value applied to every point last, e.g. train.limit_train_batches=2"
        ),
    ] = None,
    slurm: Annotated[
        bool, typer.Option("--slurm", help="submit one Slurm job array (slurm/grid.sbatch) instead")
    ] = False,
    sbatch: Annotated[
        str,
        typer.Option("--sbatch", help="more sbatch options, one string, e.g. --sbatch='-p gpu --gres=gpu:1'"),
    ] = "",
    parallel: Annotated[
        int | None, typer.Option(min=1, help="Slurm: at most N array tasks at once (--array=...%N)")
    ] = None,
    wait: Annotated[
        bool, typer.Option("--wait", help="Slurm: return when every task has ended (sbatch --wait)")
    ] = False,
    force: Annotated[
        bool, typer.Option("--force", "-f", help="replace experiments of the same name")
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="print the points and commands, run nothing")
    ] = False,
    params: Annotated[Path, typer.Option(help="the params file the points start from")] = Path("params.yaml"),
) -> None:
    """Run a grid of experiments: every point a DVC experiment and an MLflow run of the project's
    store, locally through DVC's queue or on Slurm as one job array (each task in its own git worktree).
    `dvc exp show` lists them; `aerialseg leaderboard --view lecture --grid <name>` ranks them."""
    try:
        grid = expand(definition, params, set_ or ())
        common = [o for o in grid.points[0].overrides if all(o in p.overrides for p in grid.points)]
        typer.echo(
            f"{definition}: {len(grid.points)} point(s); each sets {' '.join(common) or 'nothing'}, and"
        )
        for point in grid.points:
            own = [o for o in point.overrides if o not in common]
            typer.echo(f"  {point.name}: {' '.join(own) or '(nothing more)'}")
        if grid.dropped:
            typer.echo(f"  the same as an earlier point, left out: {', '.join(grid.dropped)}")
        if slurm:
            code = submit_slurm(
                grid, sbatch=shlex.split(sbatch), parallel=parallel, wait=wait, force=force, dry_run=dry_run
            )
        else:
            code = run_local(grid, jobs, force=force, dry_run=dry_run)
    except (GridError, ConfigError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    raise typer.Exit(code)


def grid_task_command(
    manifest: Annotated[Path, typer.Argument(help="the grid manifest `aerialseg grid --slurm` wrote")],
    index: Annotated[int, typer.Argument(help="the point to run (SLURM_ARRAY_TASK_ID)")],
) -> None:
    """One array task of a grid (slurm/grid.sbatch runs it): the point in its own git worktree."""
    try:
        run_task(manifest, index)
    except GridError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None
