"""What one experiment adds to the DVC cache, with the default network (FPN-ResNet50).

A tiny copy of the project (tests/project_copy.py: 4 synthetic tiles of 128 px, 64 px patches,
one epoch of two batches) runs `dvc repro`, then one `dvc exp run -S train.seed=1`; the figure is
`du` of .dvc/cache after the experiment minus before it. The data stages are shared by both runs,
so the growth is what an experiment of the lecture's competition costs: the trained model and the
evaluation's outputs. Baseline: the size of the model's own weights (model.ckpt).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from common import record

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from project_copy import TINY, copy_project, project_env, run

MiB = 2**20


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    params = {**TINY, "model": {"arch": "fpn", "encoder": "resnet50"},
              "train": {**TINY["train"], "epochs": 1}}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        project = copy_project(Path(tmp) / "project", params)
        env = project_env(project)
        run(project, "dvc", "repro", env=env)
        before = du(project / ".dvc" / "cache")
        run(project, "dvc", "exp", "run", "-S", "train.seed=1", env=env)
        after = du(project / ".dvc" / "cache")
        model = (project / "models" / "model.ckpt").stat().st_size
        checkpoints = du(project / "models" / "checkpoints")
    record(
        "dvc_cache",
        {
            "growth_per_experiment": {
                "value": round((after - before) / MiB, 1),
                "unit": "MiB",
                "baseline": f"model.ckpt alone: {model / MiB:.1f} MiB (FPN-ResNet50 weights + model card)",
                "goal": "<= ~150 MiB (issue 11)",
            },
            "resume_checkpoints_not_cached": {
                "value": round(checkpoints / MiB, 1),
                "unit": "MiB",
                "baseline": "models/checkpoints (last + best, optimizer state): on disk, not in the cache",
            },
        },
    )


if __name__ == "__main__":
    main()
