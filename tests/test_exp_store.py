"""No silent local store: `dvc exp run --temp` and `--queue` land their MLflow runs in the project's store.

DVC runs a temporary or queued experiment in a throwaway copy of the project (.dvc/tmp/exps/...); a
store resolved from the working directory would be a new mlflow.db there, deleted with the copy.
tracking.tracking_uri() resolves the default store from DVC_ROOT (the original project's root, as
DVC sets it for those runs), and tracking.ensure_experiment puts the experiment's artifacts in the
project's mlruns/. Here the real `dvc exp run --temp`, then a queued experiment (`--queue`,
`--run-all`), run the tiny pipeline in a copy of the project.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from project_copy import TINY, copy_project, mlflow_client, run

pytestmark = pytest.mark.slow

EXPERIMENT = "temp-experiments"
PARAMS = {
    **TINY,
    "train": {**TINY["train"], "epochs": 1, "limit_train_batches": 1},
    "tracking": {"experiment": EXPERIMENT},
}


def test_temp_and_queued_experiments_land_in_the_projects_store(tmp_path: Path) -> None:
    project = copy_project(tmp_path / "project", PARAMS)
    run(project, "dvc", "exp", "run", "--temp", "-n", "in-temp", timeout=900)

    # The run is in the project's own store ...
    assert (project / "mlflow.db").is_file()
    client = mlflow_client(project)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    assert [r.data.tags.get("dvc_exp_name") for r in runs] == ["in-temp"]
    (found,) = runs
    assert found.info.status == "FINISHED"
    assert "test_overall_accuracy" in found.data.metrics
    # ... with its artifacts in the project's mlruns/, not in the deleted copy's.
    assert experiment.artifact_location == (project / "mlruns").as_uri()
    artifacts = Path(found.info.artifact_uri.removeprefix("file://"))
    assert artifacts.is_relative_to(project / "mlruns")
    logged = json.loads((artifacts / "evaluation" / "metrics.json").read_text())
    assert logged["mlflow_run_id"] == found.info.run_id
    # No other store was made anywhere in the project (the copy under .dvc/tmp/exps is gone).
    assert [p for p in project.rglob("mlflow.db") if p != project / "mlflow.db"] == []

    # DVC's side names the same run: the experiment's metrics.json holds its id.
    shown = run(project, "dvc", "exp", "show", "--json").stdout
    assert "in-temp" in shown and found.info.run_id in shown

    # A queued experiment (run by DVC's queue worker in its own copy) lands there too.
    run(project, "dvc", "exp", "run", "--queue", "-n", "in-queue", "-S", "train.seed=1")
    run(project, "dvc", "exp", "run", "--run-all", timeout=900)
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.data.tags.get("dvc_exp_name") for r in runs) == ["in-queue", "in-temp"]
    for each in runs:
        assert each.info.status == "FINISHED"
        assert Path(each.info.artifact_uri.removeprefix("file://"), "evaluation", "metrics.json").is_file()
    assert [p for p in project.rglob("mlflow.db") if p != project / "mlflow.db"] == []
