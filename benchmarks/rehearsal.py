"""`make rehearsal`: the benchmark presets' stages on official-size archives, measured per stage.

For Vaihingen (the 33 areas at their tile sizes) and for Potsdam at each of `--potsdam-counts`
(6000 x 6000 px tiles: the validation tile 2_10, the test tile 3_13 with its 5999 px DSM and nDSM,
then training tiles), in a scratch folder outside the repository (`--workdir`):

1. `generate`: the official archives, written block by block (rehearsal_archives.py);
2. a copy of the project (pipeline/, src/, params.yaml, dvc.yaml, presets/) with the preset applied
   by `aerialseg preset` and only what a rehearsal must change set in params.yaml (data.raw_dir,
   no ImageNet download, data.exclude_tiles where 7_10 is not written; `--patch-size` etc.);
3. the stages as the pipeline runs them (`python pipeline/<stage>.py`, one process each): `tiles`,
   `patches`, and for the `--train-on` run a few training steps (`train`: one epoch of
   `--train-steps` batches, then the validation of the whole validation tile) and `evaluate` on the
   one test tile the official split leaves there (Potsdam 3_13, 6000 x 6000 px).

Each stage is one child process; its wall time, peak memory and bytes written go to
reports/rehearsal.json and a markdown table (reports/rehearsal.md) with the machine (`lscpu`) and
the load average (other processes on the machine slow every figure down). Peak memory is given
twice: the largest resident set of one process of the stage's tree (exact: the kernel's
ru_maxrss from wait4), and the sum over the tree (sampled every 0.2 s with psutil: loader workers
included, pages they share counted twice). Bytes written: what the stage added to the run's folder.

`--scale 0.05` runs the same code path on tiles 1/20th of the side (tests/test_rehearsal.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import yaml

# The tests' writer of params.yaml and settings.yaml (config.NOT_RESULTS keys go to the latter).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from project_copy import set_params

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
COPIED = ("pipeline", "src", "params.yaml", "settings.yaml", "dvc.yaml", "presets")
IGNORED = ("__pycache__", "*.egg-info")
RESULTS = ROOT / "reports" / "rehearsal.json"
PRESETS = {"vaihingen": "benchmark-vaihingen", "potsdam": "benchmark-potsdam"}
SAMPLE_S = 0.2


# --------------------------------------------------------------------------------------
# Measuring one stage


@dataclass
class Stage:
    name: str
    wall_s: float
    peak_rss_mib: float
    """Largest resident set of one process of the stage's tree (ru_maxrss of wait4)."""
    peak_tree_rss_mib: float
    """Largest sum of the tree's resident sets seen (sampled)."""
    written_mib: float
    returncode: int
    log: str
    tail: str = ""


def folder_bytes(folder: Path) -> int:
    total = 0
    for base, _, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(FileNotFoundError):  # a temporary file renamed meanwhile
                total += os.lstat(os.path.join(base, name)).st_size
    return total


def _tree_rss(pid: int) -> int:
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for process in processes:
        with contextlib.suppress(psutil.Error):  # ended meanwhile
            total += process.memory_info().rss
    return total


def measure(name: str, cmd: list[str], cwd: Path, env: dict[str, str], run_dir: Path) -> Stage:
    """Run `cmd` as one child process; its wall time, peak memory and what it added to run_dir."""
    log = run_dir / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    before = folder_bytes(run_dir)
    peak = [0]
    done = threading.Event()
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)

        def sample() -> None:
            while not done.wait(SAMPLE_S):
                peak[0] = max(peak[0], _tree_rss(proc.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        # wait4, not Popen.wait: its rusage is this child's, with the descendants it waited for.
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
        done.set()
        sampler.join()
    text = log.read_text(errors="replace")
    return Stage(
        name=name,
        wall_s=round(wall, 1),
        peak_rss_mib=round(usage.ru_maxrss / 1024, 1),  # KiB on Linux
        peak_tree_rss_mib=round(peak[0] / 2**20, 1),
        written_mib=round((folder_bytes(run_dir) - before) / 2**20, 1),
        returncode=proc.returncode,
        log=str(log),
        tail="" if proc.returncode == 0 else text[-3000:],
    )


# --------------------------------------------------------------------------------------
# The project copy a run's stages work in


def copy_project(dest: Path, git_ref: str | None) -> Path:
    """pipeline/, src/, params.yaml, dvc.yaml and presets/ of this repository: its working tree, or
    the commit `git_ref` (what is committed, whatever others are editing)."""
    dest.mkdir(parents=True)
    if git_ref is not None:
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", "--format=tar", git_ref, *COPIED],
            check=True,
            capture_output=True,
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
        return dest
    for name in COPIED:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns(*IGNORED))
        else:
            shutil.copy2(src, dest / name)
    return dest


def stage_env(project: Path) -> dict[str, str]:
    """The copy's own code first (PYTHONPATH), this Python first on PATH, no MLFLOW_/DVC_ settings of
    the caller (the copy's MLflow store is its own mlflow.db), tracebacks on."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env["PYTHONPATH"] = str(project / "src")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    env["AERIALSEG_TRACEBACK"] = "1"
    return env


# --------------------------------------------------------------------------------------
# One run: one dataset at one size, its stages in order


@dataclass
class Run:
    name: str
    dataset: str
    generate_args: list[str]
    tiles: int
    pixels: int
    largest_tile_px: int
    train: bool
    stages: list[Stage] = field(default_factory=list)
    split: dict[str, list[str]] = field(default_factory=dict)
    padded: dict[str, list[int]] = field(default_factory=dict)
    tile_mib: float = 0.0
    """The largest tile as the pipeline holds it: data.bands x its pixels in float32."""

    @property
    def ok(self) -> bool:
        return all(stage.returncode == 0 for stage in self.stages)


def params_for(run: Run, raw: Path, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    import rehearsal_archives as archives

    data: dict[str, Any] = {"raw_dir": str(raw)}
    if run.dataset == "potsdam" and "7_10" not in archives.potsdam_tile_ids(run.tiles):
        # The preset excludes 7_10, and an excluded tile must exist; this run does not write it.
        data["exclude_tiles"] = []
    updates: dict[str, dict[str, Any]] = {
        "data": data,
        # No download here: the rehearsal measures the pipeline, not ImageNet weights.
        "train": {
            "pretrained": "none",
            "epochs": 1,
            "limit_train_batches": args.train_steps,
            "batch_size": args.batch_size,
            "num_workers": args.num_workers,
        },
    }
    if args.patch_size is not None:
        updates["patches"] = {"size_px": args.patch_size}
    if args.encoder is not None:
        updates["model"] = {"encoder": args.encoder}
    evaluate = {k: v for k, v in (("overlap", args.eval_overlap), ("tta", args.eval_tta)) if v is not None}
    if evaluate:
        updates["evaluate"] = evaluate
    return updates


def execute(run: Run, workdir: Path, args: argparse.Namespace) -> None:
    run_dir = workdir / run.name
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    raw = run_dir / "raw"
    project = copy_project(run_dir / "project", args.git_ref)
    env = stage_env(project)
    python = sys.executable
    steps: list[tuple[str, list[str]]] = [
        (
            "generate",
            [python, str(HERE / "rehearsal_archives.py"), run.dataset, str(raw), *run.generate_args],
        ),
    ]
    preset = [python, "-c", "from aerialseg.cli import app; app()", "preset", PRESETS[run.dataset]]
    applied = subprocess.run(preset, cwd=project, env=env, capture_output=True, text=True)
    if applied.returncode != 0:
        raise SystemExit(f"rehearsal: {' '.join(preset[3:])} failed in {project}: {applied.stderr.strip()}")
    set_params(project, params_for(run, raw, args))
    bands = yaml.safe_load((project / "params.yaml").read_text())["data"]["bands"]
    run.tile_mib = round(run.largest_tile_px * len(bands) * 4 / 2**20, 1)
    steps += [(stage, [python, f"pipeline/{stage}.py"]) for stage in ("tiles", "patches")]
    if run.train:
        steps += [(stage, [python, f"pipeline/{stage}.py"]) for stage in ("train", "evaluate")]
    for name, cmd in steps:
        print(f"[{time.strftime('%H:%M:%S')}] {run.name}: {name} ...", flush=True)
        stage = measure(name, cmd, project, env, run_dir)
        run.stages.append(stage)
        print(
            f"    {stage.wall_s} s, peak {stage.peak_rss_mib} MiB (tree {stage.peak_tree_rss_mib} MiB), "
            f"wrote {stage.written_mib} MiB, exit {stage.returncode}",
            flush=True,
        )
        if stage.returncode != 0:
            print(stage.tail, file=sys.stderr)
            break
        if name == "tiles":
            _read_table(run, project / "data" / "tiles" / "tiles.csv")
    if run.ok and not args.keep:
        shutil.rmtree(run_dir)


def _read_table(run: Run, path: Path) -> None:
    import pandas as pd

    table = pd.read_csv(path, dtype={"tile_id": str})
    run.split = {s: table.loc[table["split"] == s, "tile_id"].tolist() for s in ("train", "val", "test")}
    pads = table[["dsm_padded_cols", "dsm_padded_rows", "ndsm_padded_cols", "ndsm_padded_rows"]]
    run.padded = {
        tile: [int(v) for v in row]
        for tile, row in zip(table["tile_id"], pads.to_numpy(), strict=True)
        if row.any()
    }


def plan(args: argparse.Namespace) -> list[Run]:
    import rehearsal_archives as archives

    common = ["--scale", str(args.scale), "--compresslevel", str(args.compresslevel)]
    runs = []
    if "vaihingen" in args.datasets:
        areas = tuple(args.vaihingen_areas.split(",")) if args.vaihingen_areas else None
        shapes = archives.vaihingen_shapes(args.scale, areas)
        extra = ["--areas", args.vaihingen_areas] if args.vaihingen_areas else []
        runs.append(
            Run(
                "vaihingen",
                "vaihingen",
                [*common, *extra],
                len(shapes),
                sum(h * w for h, w in shapes.values()),
                max(h * w for h, w in shapes.values()),
                args.train_on == "vaihingen",
            )
        )
    if "potsdam" in args.datasets:
        counts = sorted(args.potsdam_counts)
        h, w = archives.scaled((archives.POTSDAM_SIZE_PX, archives.POTSDAM_SIZE_PX), args.scale)
        for count in counts:
            archives.potsdam_tile_ids(count)  # a count out of range fails before anything runs
            runs.append(
                Run(
                    f"potsdam-{count}",
                    "potsdam",
                    [*common, "--count", str(count)],
                    count,
                    count * h * w,
                    h * w,
                    args.train_on == "potsdam" and count == counts[-1],
                )
            )
    return runs


# --------------------------------------------------------------------------------------
# The report


def machine() -> dict[str, Any]:
    model = ""
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(
            (line.split(":", 1)[1].strip() for line in lscpu.splitlines() if "Model name" in line), ""
        )
    except (OSError, subprocess.CalledProcessError):
        pass
    return {
        "cpu_model": model,
        "cpu_cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "load_average_start": [round(x, 1) for x in os.getloadavg()],
    }


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    s = report["settings"]
    lines = [
        f"Machine: {m['cpu_model']}, {m['cpu_cores']} cores, {m['memory_gib']} GiB; load average "
        f"{m['load_average_start'][0]} at the start, {m['load_average_end'][0]} at the end "
        f"(other processes shared the cores: times are upper bounds). Scale {s['scale']}; "
        f"train: {s['train_steps']} steps of {s['batch_size']}, evaluate.overlap "
        f"{s['eval_overlap'] if s['eval_overlap'] is not None else 'as preset'}, evaluate.tta "
        f"{s['eval_tta'] or 'as preset'}; {report['started']}, {report['minutes']} min in all. "
        "x tile: the peak over the run's largest tile in float32 (data.bands x its pixels x 4 bytes).",
        "",
        "| run | tiles | Mpx | stage | wall s | peak RSS MiB, 1 process (x tile) | peak RSS MiB, tree "
        "| written MiB |",
        "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for run in report["runs"]:
        tile = max(run["tile_mib"], 1e-3)
        for stage in run["stages"]:
            failed = "" if stage["returncode"] == 0 else f" (failed: exit {stage['returncode']})"
            lines.append(
                f"| {run['name']} | {run['tiles']} | {run['pixels'] / 1e6:.1f} | {stage['name']}{failed} | "
                f"{stage['wall_s']} | {stage['peak_rss_mib']:.0f} ({stage['peak_rss_mib'] / tile:.1f}) | "
                f"{stage['peak_tree_rss_mib']:.0f} | "
                f"{stage['written_mib']:.0f} |"
            )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--workdir", type=Path, default=None, help="scratch folder (default: a new one in $TMPDIR)"
    )
    parser.add_argument("--results", type=Path, default=RESULTS, help="the JSON report (.md beside it)")
    parser.add_argument("--scale", type=float, default=1.0, help="tile sides x this (1: the real sizes)")
    parser.add_argument("--datasets", default="vaihingen,potsdam", type=lambda s: s.split(","))
    parser.add_argument(
        "--potsdam-counts", default="3,6", type=lambda s: [int(c) for c in s.split(",")], help="tiles per run"
    )
    parser.add_argument("--vaihingen-areas", default=None, help="comma-separated areas (default: all 33)")
    parser.add_argument("--train-on", choices=("potsdam", "vaihingen", "none"), default="potsdam")
    parser.add_argument("--train-steps", type=int, default=2, help="training batches (one epoch)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument(
        "--patch-size", type=int, default=None, help="patches.size_px (default: the preset's)"
    )
    parser.add_argument("--encoder", default=None, help="model.encoder (default: the preset's, resnet50)")
    parser.add_argument(
        "--eval-overlap",
        type=float,
        default=0.0,
        help="evaluate.overlap, also of the training's whole-tile validation (preset 0.5; 0: short on CPU)",
    )
    parser.add_argument("--eval-tta", default="none", help="evaluate.tta (preset: flip)")
    parser.add_argument(
        "--compresslevel", type=int, default=1, help="zip deflate level of the archives; -1 stored"
    )
    parser.add_argument(
        "--git-ref", default=None, help="copy the project from this commit, not the working tree"
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep every run's folder (default: only failed ones)"
    )
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="aerialseg-rehearsal-"))
    if workdir.resolve().is_relative_to(ROOT):
        parser.error(f"--workdir {workdir}: inside the repository; choose a scratch folder outside {ROOT}")
    args.workdir = workdir
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(HERE))
    runs = plan(args)
    report: dict[str, Any] = {
        "machine": machine(),
        "started": time.strftime("%Y-%m-%d %H:%M"),
        "settings": {
            k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("results",)
        },
    }
    print(f"rehearsal in {args.workdir}: {', '.join(r.name for r in runs)}", flush=True)
    start = time.perf_counter()
    for run in runs:
        execute(run, args.workdir, args)
        if not run.ok:
            break
    report["machine"]["load_average_end"] = [round(x, 1) for x in os.getloadavg()]
    report["minutes"] = round((time.perf_counter() - start) / 60, 1)
    report["runs"] = [
        {
            "name": r.name,
            "dataset": r.dataset,
            "tiles": r.tiles,
            "pixels": r.pixels,
            "tile_mib": r.tile_mib,
            "split": r.split,
            "heights_padded": r.padded,
            "ok": r.ok,
            "stages": [vars(s) for s in r.stages],
        }
        for r in runs
        if r.stages
    ]
    report["ok"] = all(r.ok for r in runs) and all(r.stages for r in runs)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    args.results.with_suffix(".md").write_text(table)
    print(table)
    if report["ok"] and not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
