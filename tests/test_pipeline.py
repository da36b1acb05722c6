"""End to end: the real `dvc repro` on a copy of the project, with tiny params, tracked by MLflow."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import h5py
import pytest
import yaml
from project_copy import copy_project, mlflow_client, run, set_params, stages_run

pytestmark = pytest.mark.slow


def _run(project: Path, *args: str) -> str:
    result = run(project, *args)
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    project = copy_project(tmp_path_factory.mktemp("project"))
    first = _run(project, "dvc", "repro")
    assert stages_run(first) == {"params", "scenes", "tiles", "patches", "train", "evaluate"}
    return project


def test_metrics_file_has_the_isprs_figures(project: Path) -> None:
    metrics = json.loads((project / "reports" / "metrics.json").read_text())
    for key in ("overall_accuracy", "mean_f1", "miou", "mean_f1_5", "miou_5", "overall_accuracy_full"):
        assert 0.0 <= metrics[key] <= 1.0
    assert -1.0 <= metrics["kappa"] <= 1.0
    # metrics.json is the summary `dvc metrics show` prints; scores.json holds the details.
    assert set(metrics) == {
        "overall_accuracy",
        "kappa",
        "mean_f1",
        "miou",
        "mean_f1_5",
        "miou_5",
        "overall_accuracy_full",
        "pixels",
        "f1",
        "mlflow_run_id",
    }
    details = json.loads((project / "reports" / "scores.json").read_text())
    assert {k: details[k] for k in metrics if k != "f1"} == {k: v for k, v in metrics.items() if k != "f1"}
    assert metrics["f1"] == {name: cls["f1"] for name, cls in details["per_class"].items()}
    assert details["tiles"]["area4"]["overall_accuracy_full"] == metrics["overall_accuracy_full"]
    assert set(details["per_class"]) >= {"impervious_surfaces", "building", "low_vegetation", "tree", "car"}
    assert set(details["per_class"]["building"]) == {"support", "precision", "recall", "f1", "iou"}
    assert list(details["tiles"]) == ["area4"]
    cm = (project / "reports" / "confusion_matrix.csv").read_text().splitlines()
    assert len(cm) == 7 and cm[0].startswith("reference,impervious_surfaces")
    assert sum(int(v) for line in cm[1:] for v in line.split(",")[1:]) == metrics["pixels"]
    per_class = (project / "reports" / "per_class.csv").read_text().splitlines()
    assert per_class[0] == "class,f1,precision,recall,iou" and len(per_class) == 7
    for name in (
        "confusion_matrix.png",
        "confusion_matrix_normalized.png",
        "per_class_f1.png",
        "training_curves.png",
        "overlays/area4.png",
        "predictions/area4.png",
    ):
        assert (project / "reports" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_dvc_plots_show_renders_the_curves_bars_and_images(project: Path, tmp_path: Path) -> None:
    # Rendered outside the project: its git status stays clean for `dvc exp run` below.
    output = _run(project, "dvc", "plots", "show", "--json", "-o", str(tmp_path))
    shown, _ = json.JSONDecoder().raw_decode(output)  # stdout's JSON; stderr follows it
    assert "errors" not in shown, shown.get("errors")
    plots = shown["data"]
    assert {"loss", "validation_metrics", "test_f1_per_class"} <= set(plots)
    for name in ("loss", "validation_metrics", "test_f1_per_class"):
        assert [p["type"] for p in plots[name]] == ["vega"]
    bars = plots["test_f1_per_class"][0]["content"]["data"]["values"]
    assert {row["class"] for row in bars} >= {"building", "tree"}
    assert [p["type"] for p in plots["reports/confusion_matrix.png"]] == ["image"]
    assert [p["type"] for p in plots["reports/overlays/area4.png"]] == ["image"]


def test_prediction_geotiff_keeps_the_tile_georeference(project: Path) -> None:
    import rasterio

    with rasterio.open(project / "reports/predictions/area4.tif") as pred:
        with rasterio.open(project / "data/raw/synthetic/top/top_mosaic_09cm_area4.tif") as top:
            assert (pred.crs, pred.transform, pred.shape) == (top.crs, top.transform, top.shape)
        assert pred.dtypes[0] == "uint8" and pred.read(1).max() <= 5
        assert pred.colormap(1)[1][:3] == (0, 0, 255)


def test_the_mlflow_run_holds_params_curves_metrics_and_model(project: Path) -> None:
    import mlflow
    import torch

    run_id = json.loads((project / "reports" / "metrics.json").read_text())["mlflow_run_id"]
    assert json.loads((project / "models" / "mlflow_run.json").read_text())["run_id"] == run_id
    client = mlflow_client(project)
    run = client.get_run(run_id)
    assert run.data.params["train.epochs"] == "2" and run.data.params["model.encoder"] == "resnet18"
    assert run.data.params["patches.overlap"] == "0.5"
    assert run.data.tags["evaluate.overlap"] == "0.5"
    assert len(run.data.tags["git_commit"]) == 40
    assert len(client.get_metric_history(run_id, "val_loss")) == 2
    assert len(client.get_metric_history(run_id, "train_loss")) == 2
    for key in ("test_overall_accuracy", "test_mean_f1", "test_miou", "test_kappa", "train_seconds"):
        assert key in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(run_id, "evaluation")}
    assert {
        "evaluation/metrics.json",
        "evaluation/scores.json",
        "evaluation/per_class.csv",
        "evaluation/confusion_matrix.csv",
        "evaluation/confusion_matrix.png",
        "evaluation/per_class_f1.png",
        "evaluation/training_curves.png",
        "evaluation/overlays",
    } <= artifacts
    assert {a.path for a in client.list_artifacts(run_id, "evaluation/overlays")} == {
        "evaluation/overlays/area4.png"
    }
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    model = mlflow.pytorch.load_model(f"runs:/{run_id}/model")
    assert model(torch.zeros(1, 4, 64, 64)).shape == (1, 6, 64, 64)


def test_dvc_and_mlflow_link_both_ways(project: Path) -> None:
    from aerialseg.tracking import lineage_tags, lock_entries

    # DVC -> MLflow: the metrics file and the train output name the run.
    run_id = json.loads((project / "reports" / "metrics.json").read_text())["mlflow_run_id"]
    assert json.loads((project / "models" / "mlflow_run.json").read_text())["run_id"] == run_id
    client = mlflow_client(project)
    run = client.get_run(run_id)
    tags = run.data.tags
    # MLflow -> DVC: code, hardware, training time and the dvc.lock entries it came from.
    assert len(tags["git_commit"]) == 40 and tags["git_dirty"] in ("True", "False")
    assert tags["hardware"].startswith(("CPU: ", "1x ")), tags["hardware"]
    assert run.data.metrics["train_seconds"] > 0
    expected = lineage_tags(("scenes", "tiles", "patches", "train"), project / "dvc.lock")
    assert set(expected) == {"dvc.scenes", "dvc.tiles", "dvc.patches", "dvc.train"}
    assert {k: tags.get(k) for k in expected} == expected
    train = lock_entries(["train"], project / "dvc.lock")["train"]
    assert "models/mlflow_run.json" in {out["path"] for out in train["outs"]}
    logged = client.download_artifacts(run_id, "dvc/lock_at_evaluate.json", str(project / ".dl"))
    assert json.loads(Path(logged).read_text())["digests"] == expected
    # The registry: the newest model is the `candidate` of the dataset's registered model.
    assert client.get_model_version_by_alias("aerialseg-synthetic", "candidate").run_id == run_id
    # The tiles and patches are the run's dataset inputs, with dvc.lock's digests.
    digests = {
        o["path"]: o["md5"]
        for s in ("tiles", "patches")
        for o in lock_entries([s], project / "dvc.lock")[s]["outs"]
    }
    assert {d.dataset.name: d.dataset.digest for d in run.inputs.dataset_inputs} == digests


def test_second_repro_runs_nothing(project: Path) -> None:
    assert stages_run(_run(project, "dvc", "repro")) == set()


def test_small_results_are_committed_to_git_and_diff_between_commits(project: Path, tmp_path: Path) -> None:
    small = [
        "reports/metrics.json",
        "reports/scores.json",
        "reports/per_class.csv",
        "reports/confusion_matrix.png",
        "reports/overlays/area4.png",
        "models/history.csv",
    ]
    large = ["reports/predictions/area4.tif", "models/model.ckpt", "data/patches/train.h5"]
    ignored = run(project, "git", "check-ignore", *small, *large, check=False).stdout.split()
    assert ignored == large
    run(project, "git", "add", "-A")
    run(project, "git", "-c", "user.name=t", "-c", "user.email=t@e.org", "commit", "-qm", "results")
    # Another result: `dvc metrics diff` and `dvc plots diff` compare it with the commit.
    set_params(project, {"train": {"seed": 1}})
    assert stages_run(_run(project, "dvc", "repro")) == {"params", "train", "evaluate"}
    diff = json.loads(run(project, "dvc", "metrics", "diff", "HEAD", "--json").stdout)
    changed = diff["reports/metrics.json"]
    assert changed["overall_accuracy"]["old"] != changed["overall_accuracy"]["new"]
    plots = json.loads(run(project, "dvc", "plots", "diff", "HEAD", "--json", "-o", str(tmp_path)).stdout)
    assert "errors" not in plots, plots.get("errors")
    bars = plots["data"]["test_f1_per_class"][0]["content"]["data"]["values"]
    assert {row["rev"] for row in bars} == {"HEAD", "workspace"}
    # Back to the commit: git restores params.yaml and the small results, DVC the cached ones.
    run(project, "git", "checkout", "-q", "--", ".")
    run(project, "dvc", "checkout", "-q")
    assert stages_run(_run(project, "dvc", "repro")) == set()
    assert run(project, "git", "status", "--porcelain").stdout == ""


def _leaves(tree: Any, prefix: str) -> list[str]:
    if isinstance(tree, dict):
        return [leaf for k, v in tree.items() for leaf in _leaves(v, f"{prefix}.{k}")]
    return [prefix]


def _another(value: Any) -> Any:
    """A different value of the same kind (DVC hashes values; it does not validate them)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return value + 1
    if isinstance(value, list):
        return [*value, "x"]
    return "x" if value is None else f"{value}x"


def test_the_run_cache_sees_every_param_of_every_stage_it_caches(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DVC's run cache restores a stage's outputs for params it has run with before; a param it
    cannot see (DVC strips keys named `size` or `nfiles` from the hash) would restore stale ones."""
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo
    from dvc.stage.cache import _can_hash, _get_cache_hash
    from dvc.stage.serialize import to_single_stage_lockfile

    path = project / "params.yaml"
    original = path.read_text()
    raw = yaml.safe_load(original)

    def run_cache_key(stage: Any) -> str:
        for dep in stage.deps:
            if isinstance(dep, ParamsDependency):
                dep.save()  # reads params.yaml again
        return str(_get_cache_hash(to_single_stage_lockfile(stage), key=True))

    checked = []
    monkeypatch.chdir(project)  # DVC resolves a stage's paths from the working directory
    try:
        with Repo(str(project)) as repo:
            for name in ("scenes", "tiles", "patches", "train", "evaluate"):
                stage = repo.stage.collect(name)[0]
                if not _can_hash(stage):
                    continue  # never restored from the run cache
                path.write_text(original)  # the previous stage's loop left its last change
                base = run_cache_key(stage)
                keys = [leaf for dep in stage.params for p in dep.params for leaf in _leaves(_get(raw, p), p)]
                for key in keys:
                    changed = copy.deepcopy(raw)
                    parent, last = key.rsplit(".", 1)
                    _get(changed, parent)[last] = _another(_get(raw, key))
                    path.write_text(yaml.safe_dump(changed, sort_keys=False))
                    assert run_cache_key(stage) != base, f"{name}: the run cache does not see {key}"
                    checked.append(key)
    finally:
        path.write_text(original)
    # train is run-cached too, now that its resume checkpoints are no output (no `persist`).
    assert {
        "patches.size_px",
        "synthetic.size_px",
        "data.val_tiles",
        "train.seed",
        "evaluate.batch_size",
    } <= set(checked)

    # For real: with an entry for 64 px in the run cache, 32 px patches are made anew; back at
    # 64 px, the run cache restores the patches it made for 64 px (legitimately).
    set_params(project, {"patches": {"size_px": 32}})
    assert stages_run(_run(project, "dvc", "repro", "patches")) == {"patches"}
    assert _patch_size(project) == 32
    path.write_text(original)
    restored = _run(project, "dvc", "repro", "patches")
    assert "Stage 'patches' is cached - skipping run" in restored
    assert _patch_size(project) == 64
    assert stages_run(_run(project, "dvc", "repro")) == set()


def _patch_size(project: Path) -> int:
    with h5py.File(project / "data/patches/train.h5", "r") as h5:
        return int(h5.attrs["size"])


def _get(tree: Any, key: str) -> Any:
    for part in key.split("."):
        tree = tree[part]
    return tree


def test_settings_that_cannot_change_a_result_rerun_nothing(project: Path) -> None:
    """They live in settings.yaml, which no stage depends on: `dvc status` stays clean."""
    for key, value in (("num_workers", 1), ("resume", True)):
        set_params(project, {"train": {key: value}})
        assert "up to date" in _run(project, "dvc", "status"), key
    set_params(project, {"tracking": {"experiment": "other", "registered_model": "other", "alias": "x"}})
    assert "up to date" in _run(project, "dvc", "status")
    assert stages_run(_run(project, "dvc", "repro")) == set()
    run(project, "git", "checkout", "-q", "settings.yaml")


def test_a_misspelt_section_stops_dvc_repro_with_its_name(project: Path) -> None:
    params = project / "params.yaml"
    params.write_text(params.read_text() + "trian:\n  epochs: 5\n")
    result = run(project, "dvc", "repro", check=False)
    assert result.returncode != 0
    assert "params: params.yaml: invalid parameters" in result.stderr
    assert "  trian: unknown key (check its spelling)" in result.stderr
    assert not stages_run(result.stdout) - {"params"}
    run(project, "git", "checkout", "-q", "params.yaml")
    assert stages_run(_run(project, "dvc", "repro")) == set()


def test_a_choice_not_in_its_registry_stops_dvc_repro_before_any_stage(project: Path) -> None:
    """The registries are read by the `params` stage (aerialseg.choices), not by config.py, so no
    data stage depends on the model code; a bad choice still stops `dvc repro` before training."""
    set_params(project, {"evaluate": {"blend": "hann"}})
    result = run(project, "dvc", "repro", check=False)
    assert result.returncode != 0
    assert (
        "params: params.yaml: evaluate.blend: 'hann' is not a window blending; "
        "choose one of: cosine, gaussian, uniform"
    ) in result.stderr
    assert not stages_run(result.stdout) - {"params"}
    run(project, "git", "checkout", "-q", "params.yaml")


def test_overlap_change_reruns_patches_train_evaluate_only(project: Path) -> None:
    # (`params`, the check of params.yaml, runs on any change of the file and writes nothing.)
    runs_before = len(mlflow_client(project).search_runs([_experiment_id(project)]))
    set_params(project, {"patches": {"overlap": 0.25}})
    assert stages_run(_run(project, "dvc", "repro")) == {"params", "patches", "train", "evaluate"}
    assert len(mlflow_client(project).search_runs([_experiment_id(project)])) == runs_before + 1

    # evaluate.overlap also shapes validation, hence model selection: it retrains.
    set_params(project, {"evaluate": {"overlap": 0.25}})
    assert stages_run(_run(project, "dvc", "repro")) == {"params", "train", "evaluate"}
    # A setting of evaluate alone reruns evaluate alone, into the same MLflow run.
    run_id = json.loads((project / "reports" / "metrics.json").read_text())["mlflow_run_id"]
    set_params(project, {"evaluate": {"batch_size": 2}})
    assert stages_run(_run(project, "dvc", "repro")) == {"params", "evaluate"}
    assert json.loads((project / "reports" / "metrics.json").read_text())["mlflow_run_id"] == run_id
    tags = mlflow_client(project).get_run(run_id).data.tags
    assert tags["evaluate.batch_size"] == "2" and tags["evaluate.overlap"] == "0.25"


def test_dvc_experiment_makes_a_new_run_and_shows_its_metrics(project: Path) -> None:
    client = mlflow_client(project)
    runs_before = {r.info.run_id for r in client.search_runs([_experiment_id(project)])}
    _run(project, "dvc", "exp", "run", "-n", "one-epoch", "-S", "train.epochs=1")
    runs = client.search_runs([_experiment_id(project)])
    new = [r for r in runs if r.info.run_id not in runs_before]
    assert len(new) == 1
    assert new[0].data.params["train.epochs"] == "1"
    assert new[0].data.tags.get("dvc_exp_name") == "one-epoch"
    shown = json.loads(_run(project, "dvc", "exp", "show", "--json"))
    text = json.dumps(shown)
    assert "one-epoch" in text and "overall_accuracy" in text and "mean_f1" in text
    metrics = json.loads(_run(project, "dvc", "metrics", "show", "--json"))
    assert "miou" in json.dumps(metrics) and "kappa" in json.dumps(metrics)
    from aerialseg.tracking import lineage_tags

    assert new[0].data.tags.get("dvc.train") == lineage_tags(["train"], project / "dvc.lock")["dvc.train"]
    # The leaderboard ranks every run of the experiment, this one included.
    table = _run(project, "aerialseg", "leaderboard", "--format", "csv")
    assert "one-epoch" in table and all(r.info.run_id in table for r in runs)


def _experiment_id(project: Path) -> str:
    return str(json.loads((project / "models" / "mlflow_run.json").read_text())["experiment_id"])
