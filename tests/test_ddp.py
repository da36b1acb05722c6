"""Two-process CPU DDP training through `train()`: one MLflow run, one set of files, every pixel of
the whole val tiles counted once.

Lightning's `ddp` strategy starts the other ranks by re-running the command line of the main
process (`sys.argv`). Under pytest that would re-run pytest, so the test runs a small script in a
subprocess instead: that is exactly how `dvc repro` runs `python pipeline/train.py`.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from aerialseg.checkpoint import load_checkpoint
from aerialseg.classes import IGNORE_INDEX
from aerialseg.config import Params

SCRIPT = textwrap.dedent(
    """
    import json
    import sys
    from pathlib import Path

    from aerialseg.config import Params
    from aerialseg.training import train

    if __name__ == "__main__":
        train(Params.model_validate(json.loads(Path(sys.argv[1]).read_text())))
    """
)


def _training(folder: Path, params: Params, **env: str) -> tuple[list[str], dict[str, str]]:
    """The command and environment that train `params` in `folder` the way `dvc repro` runs
    pipeline/train.py (one thread per process: several processes on a small machine)."""
    (folder / "params.json").write_text(json.dumps(params.model_dump(mode="json")))
    (folder / "run_train.py").write_text(SCRIPT)
    dropped = ("MLFLOW_TRACKING_URI", "RANK", "LOCAL_RANK")  # the script's own store; rank from Lightning
    inherited = {k: v for k, v in os.environ.items() if k not in dropped}
    return [sys.executable, "run_train.py", "params.json"], {**inherited, "OMP_NUM_THREADS": "1", **env}


def _scored_pixels(path: Path) -> tuple[int, int]:
    """(whole val tiles, eroded-reference pixels that are scored) in a val.h5."""
    with h5py.File(path, "r") as f:
        references = [f[f"tiles/{tile}/reference"][:] for tile in f["tiles"]]
    return len(references), sum(int(np.count_nonzero(r != IGNORE_INDEX)) for r in references)


@pytest.mark.slow
def test_two_process_cpu_ddp_training(
    patches_dir: Path, small_params: Callable[..., Params], tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    n_val, expected_pixels = _scored_pixels(patches_dir / "val.h5")
    # An odd number of val tiles on two ranks: one rank gets an empty step (a padding sampler
    # repeating a tile would count it twice; a rank without a step would hang the other).
    assert n_val % 2 == 1
    params = small_params(
        tmp_path,
        {
            "paths.patches": patches_dir,
            "train.batch_size": 2,
            "train.devices": 2,
            "train.strategy": "ddp",
            "tracking.experiment": "ddp",
        },
    )
    command, env = _training(tmp_path, params)
    done = subprocess.run(
        command,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )

    assert done.returncode == 0, done.stderr[-4000:]
    models = tmp_path / "models"
    # Exactly one MLflow run, made by rank 0, which saw two processes.
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("ddp")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    assert runs[0].data.params["train.world_size"] == "2"
    assert json.loads((models / "mlflow_run.json").read_text())["run_id"] == runs[0].info.run_id
    # The validation matrix, summed over both ranks, counted each labelled val pixel once.
    history = pd.read_csv(models / "history.csv")
    assert list(history["epoch"]) == [0]
    assert list(history["val_pixels"]) == [expected_pixels]
    assert runs[0].data.metrics["val_pixels"] == expected_pixels
    # One self-describing checkpoint and one set of Lightning checkpoints.
    _, card = load_checkpoint(models / "model.ckpt")
    assert card.metrics["val_pixels"] == expected_pixels
    assert sorted(p.name for p in models.iterdir()) == [
        "checkpoints",
        "history.csv",
        "mlflow_run.json",
        "model.ckpt",
    ]
    assert sorted(p.name for p in (models / "checkpoints").iterdir()) == [
        "best.ckpt",
        "fingerprint.json",
        "last.ckpt",
        "mlflow_run.json",
    ]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.slow
def test_a_second_node_started_by_hand_neither_logs_nor_writes(
    patches_dir: Path, small_params: Callable[..., Params], tmp_path: Path
) -> None:
    """Multi-node launched by hand (Lightning's own launcher): the same command on two "nodes" (two
    folders on this machine), `NODE_RANK=1` on the second. Only global rank 0 opens MLflow and
    touches the models folder; the first process of node 1 is global rank 1, not a second rank 0."""
    from mlflow import MlflowClient

    port = str(_free_port())
    nodes = []
    for node_rank in (0, 1):
        folder = tmp_path / f"node{node_rank}"
        folder.mkdir()
        params = small_params(
            folder,
            {
                "paths.patches": patches_dir,
                "train.batch_size": 2,
                "train.devices": 1,
                "train.num_nodes": 2,
                "train.strategy": "ddp",
                "tracking.experiment": "nodes",
            },
        )
        command, env = _training(
            folder, params, NODE_RANK=str(node_rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=port
        )
        nodes.append(
            subprocess.Popen(
                command,
                cwd=folder,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outputs = [node.communicate(timeout=400) for node in nodes]
    for node, (_, stderr) in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, stderr[-4000:]

    first, second = tmp_path / "node0", tmp_path / "node1"
    client = MlflowClient(f"sqlite:///{first / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("nodes").experiment_id])
    assert len(runs) == 1 and runs[0].data.params["train.world_size"] == "2"
    assert (first / "models" / "model.ckpt").exists()
    assert (first / "models" / "checkpoints" / "last.ckpt").exists()
    # Node 1 wrote nothing: no store, no run reference, no checkpoints, no fingerprint.
    assert sorted(p.name for p in second.iterdir()) == ["params.json", "run_train.py"]
