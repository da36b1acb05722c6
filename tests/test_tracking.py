"""Run <-> DVC links: lineage tags from dvc.lock, the hardware tag, the run tags."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from aerialseg.tracking import hardware_tag, lineage_tags, lock_entries, log_lineage, run_tags, stage_digest

UPSTREAM = ("scenes", "tiles", "patches")


def _lock(tiles_md5: str = "aaaa1111.dir", patches_md5: str = "bbbb2222.dir") -> dict[str, Any]:
    """A dvc.lock as DVC writes it, for scenes -> tiles -> patches (train not run yet)."""

    def out(path: str, md5: str) -> dict[str, Any]:
        return {"path": path, "hash": "md5", "md5": md5, "size": 1000, "nfiles": 4}

    return {
        "schema": "2.0",
        "stages": {
            "scenes": {
                "cmd": "python pipeline/scenes.py",
                "deps": [{"path": "pipeline/scenes.py", "hash": "md5", "md5": "9fa2", "size": 484}],
                "params": {"params.yaml": {"paths.raw": "data/raw", "synthetic": {"tiles": 4, "seed": 0}}},
                "outs": [out("data/raw/synthetic", "ffff0000.dir")],
            },
            "tiles": {
                "cmd": "python pipeline/tiles.py",
                "deps": [out("data/raw/synthetic", "ffff0000.dir")],
                "params": {"params.yaml": {"data": {"source": "synthetic"}}},
                "outs": [out("data/tiles", tiles_md5)],
            },
            "patches": {
                "cmd": "python pipeline/patches.py",
                "deps": [out("data/tiles", tiles_md5)],
                "params": {"params.yaml": {"patches": {"size": 64, "overlap": 0.5}}},
                "outs": [out("data/patches", patches_md5)],
            },
        },
    }


def _write(path: Path, lock: dict[str, Any], **dump: Any) -> Path:
    path.write_text(yaml.safe_dump(lock, **dump))
    return path


def test_lineage_tags_fingerprint_each_stage_entry(tmp_path: Path) -> None:
    lock = _write(tmp_path / "dvc.lock", _lock())
    tags = lineage_tags(UPSTREAM, lock)
    assert list(tags) == ["dvc.scenes", "dvc.tiles", "dvc.patches"]
    assert all(re.fullmatch(r"[0-9a-f]{12}", v) for v in tags.values())
    assert len(set(tags.values())) == 3
    assert tags["dvc.tiles"] == stage_digest(yaml.safe_load(lock.read_text())["stages"]["tiles"])


def test_lineage_tags_ignore_yaml_layout_but_follow_the_hashes(tmp_path: Path) -> None:
    before = lineage_tags(UPSTREAM, _write(tmp_path / "a.lock", _lock()))
    # Same content, other key order and style: same digests.
    assert lineage_tags(UPSTREAM, _write(tmp_path / "b.lock", _lock(), sort_keys=True, indent=4)) == before
    # New tiles: the tiles and patches entries change (patches lists the tiles as a dep), scenes does not.
    after = lineage_tags(UPSTREAM, _write(tmp_path / "c.lock", _lock(tiles_md5="cccc3333.dir")))
    assert after["dvc.scenes"] == before["dvc.scenes"]
    assert after["dvc.tiles"] != before["dvc.tiles"]
    assert after["dvc.patches"] != before["dvc.patches"]


def test_lineage_tags_without_a_usable_lock_are_empty(tmp_path: Path) -> None:
    assert lineage_tags(UPSTREAM, tmp_path / "missing.lock") == {}
    (tmp_path / "bad.lock").write_text("stages: [unclosed\n")
    assert lineage_tags(UPSTREAM, tmp_path / "bad.lock") == {}
    (tmp_path / "empty.lock").write_text("")
    assert lineage_tags(UPSTREAM, tmp_path / "empty.lock") == {}
    # A stage the lock does not have yet (train before its first run) is left out, not an error.
    lock = _write(tmp_path / "dvc.lock", _lock())
    assert set(lineage_tags(("patches", "train"), lock)) == {"dvc.patches"}
    assert set(lock_entries(("patches", "train"), lock)) == {"patches"}


def test_log_lineage_tags_the_run_only_under_dvc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    lock = _write(tmp_path / "dvc.lock", _lock())
    client = MlflowClient(uri)
    experiment = client.create_experiment("lineage", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id

    monkeypatch.delenv("DVC_STAGE", raising=False)
    assert log_lineage(run_id, UPSTREAM, lock) == {}
    assert not any(k.startswith("dvc.") for k in client.get_run(run_id).data.tags)

    monkeypatch.setenv("DVC_STAGE", "train")
    tags = log_lineage(run_id, UPSTREAM)  # the default: dvc.lock in the working directory
    assert tags == lineage_tags(UPSTREAM, lock)
    assert {k: v for k, v in client.get_run(run_id).data.tags.items() if k.startswith("dvc.")} == tags
    logged = json.loads(
        Path(client.download_artifacts(run_id, "dvc/lock_at_train.json", str(tmp_path))).read_text()
    )
    assert logged["dvc_stage"] == "train" and logged["digests"] == tags
    assert logged["stages"]["patches"]["outs"][0]["md5"] == "bbbb2222.dir"


def test_hardware_tag_names_the_device() -> None:
    assert hardware_tag()
    cpu = hardware_tag("cpu")
    assert re.fullmatch(r"CPU: .+ \(\d+ cores\)", cpu), cpu
    assert "2 processes" in hardware_tag("cpu", world_size=2)
    assert hardware_tag("cpu", world_size=4, num_nodes=2).endswith("on 2 nodes")


def test_run_tags_carry_the_dvc_experiment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DVC_EXP_NAME", "wide-overlap")
    tags = run_tags()
    assert tags["dvc_exp_name"] == "wide-overlap"
    if "git_commit" in tags:  # only inside a git checkout
        assert re.fullmatch(r"[0-9a-f]{40}", tags["git_commit"])
        assert tags["git_dirty"] in ("True", "False")
    monkeypatch.delenv("DVC_EXP_NAME")
    assert "dvc_exp_name" not in run_tags()
