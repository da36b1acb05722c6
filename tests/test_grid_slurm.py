"""`aerialseg grid --slurm` on the one-node Slurm cluster of tests/test_slurm.py (its `cluster`
fixture): one job array, each task in its own git worktree of a tiny copy of the project, sharing the
copy's DVC cache and MLflow store; every point a DVC experiment the copy's `dvc exp show` lists and
an MLflow run; the worktrees removed, that of a failed task too (its params.yaml and dvc.lock kept in
slurm/logs/). Run it under `flock /tmp/slurm.lock` (one Slurm cluster per machine).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from project_copy import TINY, copy_project, mlflow_client, project_env, run
from test_slurm import JOB_TIMEOUT, Cluster, cluster  # noqa: F401 (the fixture)

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

PARAMS = {
    **TINY,
    "train": {
        **TINY["train"],
        "epochs": 1,
        "limit_train_batches": 1,
        "precision": "32",
        "accelerator": "cpu",
    },
}
# Two points that train, and one that fails in the tiles stage (no area 99), after both in the array.
GRID = """\
name: sl
combine: product
axes:
  point:
    - {train.lr: 0.01}
    - {train.lr: 0.002}
    - {name: broken, data.test_tiles: [99]}
"""
GOOD = ["sl-lr_0.002", "sl-lr_0.01"]


def test_a_grid_is_one_job_array_of_worktrees_collected_into_the_project(
    cluster: Cluster,  # noqa: F811
    tmp_path: Path,
) -> None:
    project = copy_project(tmp_path / "project", PARAMS)
    (project / "grid.yaml").write_text(GRID)
    env = cluster.env(project_env(project))
    done = run(
        project,
        "aerialseg",
        "grid",
        "grid.yaml",
        "--slurm",
        "--wait",
        env=env,
        timeout=JOB_TIMEOUT,
        check=False,
    )
    (job,) = re.findall(r"Submitted batch job (\d+)", done.stdout + done.stderr)
    logs = {p.name: p.read_text(errors="replace") for p in (project / "slurm" / "logs").glob(f"*-{job}_*")}
    shown_logs = "\n".join(f"--- {name}\n{text[-3000:]}" for name, text in sorted(logs.items()))
    assert done.returncode != 0, "the broken point must fail the array"
    assert f"aerialseg-grid-{job}_2.err" in logs, shown_logs
    assert "tiles" in logs[f"aerialseg-grid-{job}_2.err"], shown_logs

    # The two good points: DVC experiments of the project (refs shared by the worktrees) ...
    shown = json.loads(run(project, "dvc", "exp", "show", "--json", env=env).stdout)
    experiments = {e["name"]: e for rev in shown for e in (rev.get("experiments") or [])}
    assert sorted(experiments) == GOOD, shown_logs
    # ... and MLflow runs in the project's store, artifacts in its mlruns/, ids in the experiments.
    client = mlflow_client(project)
    experiment = client.get_experiment_by_name("aerialseg")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id], "attributes.status = 'FINISHED'")
    assert sorted(r.data.tags["dvc_exp_name"] for r in runs) == GOOD, shown_logs
    for each in runs:
        assert each.info.run_id in json.dumps(experiments[each.data.tags["dvc_exp_name"]])
        assert Path(each.info.artifact_uri.removeprefix("file://")).is_relative_to(project / "mlruns")
        assert "test_overall_accuracy" in each.data.metrics
    assert {r.data.params["train.lr"] for r in runs} == {"0.01", "0.002"}

    # Nothing of the tasks is left in the project: no worktree (the failed one's neither), its own
    # params.yaml untouched, every store and output where it was.
    worktrees = run(project, "git", "worktree", "list", "--porcelain", env=env).stdout
    assert worktrees.count("worktree ") == 1, worktrees
    assert list((project / ".dvc" / "tmp" / "grid" / "worktrees").iterdir()) == []
    assert run(project, "git", "status", "--porcelain", "--untracked-files=no", env=env).stdout == ""
    assert [p for p in project.rglob("mlflow.db") if p != project / "mlflow.db"] == []
    # The failed task's params.yaml and dvc.lock, kept for debugging.
    kept = project / "slurm" / "logs" / f"grid-{job}_2.params.yaml"
    assert "99" in kept.read_text(), shown_logs
    # The same grid again is refused before anything is submitted: its experiments exist.
    again = run(project, "aerialseg", "grid", "grid.yaml", "--slurm", env=env, check=False)
    assert again.returncode == 2 and "sl-lr_0.002, sl-lr_0.01 exist at" in again.stderr, again.stderr
    assert "Submitted batch job" not in again.stdout

    # Each experiment's checkpoint is in the project's DVC cache (the worktrees shared it).
    refs = run(
        project, "git", "for-each-ref", "--format=%(objectname) %(refname)", "refs/exps", env=env
    ).stdout
    for name in GOOD:
        (rev,) = [line.split()[0] for line in refs.splitlines() if line.endswith(f"/{name}")]
        lock = yaml.safe_load(run(project, "git", "show", f"{rev}:dvc.lock", env=env).stdout)
        (model,) = [o for o in lock["stages"]["train"]["outs"] if o["path"] == "models/model.ckpt"]
        assert (project / ".dvc" / "cache" / "files" / "md5" / model["md5"][:2] / model["md5"][2:]).is_file()
