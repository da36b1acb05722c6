"""The names a run is recorded under in MLflow (metrics, tags, artifact folders), in one place.

`train` logs the per-epoch curves and the figures of the published epoch, `evaluate` the test
figures, tags and artifacts on the same run; `leaderboard` and `reports` read them back. A name
that one module writes and another reads is defined here, so the two cannot drift apart.
"""

from __future__ import annotations

# ---------------------------------------------------------------- metrics

TRAIN = "train_"
"""Prefix of the training curves (Lightning's logger), as VAL of the validation ones."""
VAL = "val_"
TRAIN_LOSS = "train_loss"
VAL_LOSS = "val_loss"
"""Cross-entropy of the blended probabilities on the scored pixels of the validation tiles."""
VAL_PIXELS = "val_pixels"
"""Pixels scored per validation: a count, no curve worth plotting."""
VAL_SECONDS = "val_seconds"
SCORES = ("overall_accuracy", "kappa", "mean_f1", "miou", "mean_f1_5", "miou_5")
"""The figures of metrics.scores that are logged: val_<figure> per epoch, selected_val_<figure>
for the published epoch, test_<figure> by `evaluate`."""
SELECTED_EPOCH = "selected_epoch"
"""The epoch whose checkpoint `train` published (1-based)."""
TRAIN_SECONDS = "train_seconds"
"""Wall-clock seconds of training, added up over resumed parts."""


def val(figure: str) -> str:
    """`val_<figure>`: per epoch, on the whole validation tiles."""
    return VAL + figure


def selected(metric: str) -> str:
    """`selected_<metric>`: the value of the published epoch, logged once at the end of training."""
    return "selected_" + metric


def test(*parts: str) -> str:
    """`test_<part>_<part>...`: `evaluate`'s figures (eroded reference): test_mean_f1,
    test_f1_building (per class), test_area15_overall_accuracy_full (per tile, full reference)."""
    return "test_" + "_".join(parts)


VAL_MEAN_F1 = val("mean_f1")
"""The figure that picks the published checkpoint, stops early and drives the plateau scheduler."""

# ---------------------------------------------------------------- tags

HARDWARE_TAG = "hardware"
LINEAGE_TAG_PREFIX = "dvc."
"""dvc.<stage>: the digest of that stage's dvc.lock entry."""
OWNER_HOST_TAG = "aerialseg.host"
OWNER_PID_TAG = "aerialseg.pid"
OWNER_START_TAG = "aerialseg.pid_start"
"""Which process trains a run (rank 0's host, pid and the pid's start time, in clock ticks after
boot, where /proc has it): a RUNNING run whose process on this host is gone was killed."""
GIT_COMMIT_TAG = "git_commit"
GIT_DIRTY_TAG = "git_dirty"
"""str(bool): whether tracked files differed from the commit."""
DVC_EXP_TAG = "dvc_exp_name"
EVALUATE_TAG_PREFIX = "evaluate."
"""evaluate.<key>: the evaluate params of the last evaluation (tags: a rerun may change them)."""

# ---------------------------------------------------------------- artifact folders

MODEL_ARTIFACT = "model"
"""The logged model (runs:/<run id>/model)."""
EVALUATION_ARTIFACTS = "evaluation"
"""`evaluate`'s reports, figures, predictions and overlays."""
LINEAGE_ARTIFACTS = "dvc"
"""dvc/lock_at_<stage>.json: the dvc.lock entries a stage ran with."""
