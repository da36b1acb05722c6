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

# ---------------------------------------------------------------- the model registry

REGISTERED_MODEL_TEMPLATE = "aerialseg-{data.source}"
"""tracking.registered_model's default: one registered model per dataset (`aerialseg-synthetic`,
`aerialseg-vaihingen`); a preset adds its own name (`aerialseg-{data.source}-lecture`)."""
CANDIDATE_ALIAS = "candidate"
"""tracking.alias's default: the newest version that `evaluate` has tested."""
CHAMPION_ALIAS = "champion"
"""The version whose validation figure (CHAMPION_METRIC) is the best so far among those validated
the same way (CHAMPION_COMPARABLE); moved by `evaluate`, never on a test figure."""
CHAMPION_METRIC = selected(VAL_MEAN_F1)
"""The figure that chose the published checkpoint (best val_mean_f1) and that decides the champion."""
CHAMPION_COMPARABLE = (
    "data.source",
    "data.raw_dir",
    "data.val_tiles",
    "synthetic.tiles",
    "synthetic.size_px",
    "synthetic.seed",
    "validation.overlap",
    "validation.tta",
    "validation.blend",
)
"""The run params that define the validation figure's pixels and protocol: two versions compare
only when these are the same (other tiles, or another blending, give figures of another test)."""
VERSION_VALIDATION_TAG = "aerialseg.validation"
"""On a model version: `selected_val_mean_f1=<value>` and the CHAMPION_COMPARABLE params, as JSON."""
VERSION_CHAMPION_TAG = "aerialseg.champion"
"""On a model version: why `evaluate` did or did not make it the champion, in one sentence."""


class RegisteredModelNameError(ValueError):
    """tracking.registered_model names a key that params.yaml does not have."""


def registered_model_name(template: str | None, sections: object) -> str | None:
    """The registered model of a run: `template` (tracking.registered_model) with each `{section.key}`
    replaced by that param of `sections` (the Params, or any object with those attributes), e.g.
    `aerialseg-{data.source}` -> `aerialseg-vaihingen`; a name without braces is used as it is.
    None when `template` is None (no registration). Raises RegisteredModelNameError naming the
    placeholder that is not a param."""
    if template is None:
        return None
    try:
        name = template.format_map(_Sections(sections))
    except (AttributeError, KeyError, IndexError, ValueError) as err:
        said = err.args[0] if err.args else type(err).__name__
        raise RegisteredModelNameError(
            f"tracking.registered_model: {template!r}: {said}; expected a name, or a template whose "
            "{...} are params, e.g. 'aerialseg-{data.source}'"
        ) from None
    if not name.strip() or "/" in name or ":" in name:
        raise RegisteredModelNameError(
            f"tracking.registered_model: {template!r} gives {name!r}; expected a non-empty name "
            "without '/' or ':' (it goes into models:/<name>@<alias> URIs)"
        )
    return name


class _Sections(dict[str, object]):
    """format_map's view of the params: `{data.source}` -> sections.data.source, named in errors."""

    def __init__(self, sections: object) -> None:
        super().__init__()
        self.sections = sections

    def __missing__(self, key: str) -> object:
        if not hasattr(self.sections, key):
            raise KeyError(f"no params section {key!r}")
        return _Section(key, getattr(self.sections, key))


class _Section:
    def __init__(self, name: str, value: object) -> None:
        self.name, self.value = name, value

    def __getattr__(self, key: str) -> object:
        if key.startswith("_") or not hasattr(self.value, key):
            raise AttributeError(f"no param {self.name}.{key}")
        return getattr(self.value, key)

    def __format__(self, spec: str) -> str:
        name = self.name
        raise ValueError(f"{{{name}}} is a whole section; name one of its keys, e.g. {{{name}.<key>}}")
