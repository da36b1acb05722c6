from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn import metrics as skm

from aerialseg import metrics
from aerialseg.classes import CLASS_NAMES, IGNORE_INDEX, NUM_CLASSES
from aerialseg.metrics import confusion_matrix, mean_over, scores

LABELS = list(range(NUM_CLASSES))


def _random_labels(seed: int, shape: tuple[int, ...] = (64, 80)) -> tuple[np.ndarray, np.ndarray]:
    """Noisy predictions of a random reference, with ~10 % of the reference ignored."""
    rng = np.random.default_rng(seed)
    target = rng.integers(0, NUM_CLASSES, size=shape).astype(np.uint8)
    pred = np.where(rng.random(shape) < 0.6, target, rng.integers(0, NUM_CLASSES, size=shape))
    target[rng.random(shape) < 0.1] = IGNORE_INDEX
    return pred.astype(np.uint8), target


def _counted(pred: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    keep = target != IGNORE_INDEX
    return pred[keep].ravel(), target[keep].ravel()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_confusion_matrix_matches_sklearn(seed: int) -> None:
    pred, target = _random_labels(seed)
    cm = confusion_matrix(pred, target)
    p, t = _counted(pred, target)
    assert cm.dtype == np.int64
    assert cm.shape == (NUM_CLASSES, NUM_CLASSES)
    np.testing.assert_array_equal(cm, skm.confusion_matrix(t, p, labels=LABELS))


def test_confusion_matrix_counted_in_chunks_is_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    pred, target = _random_labels(3)
    whole = confusion_matrix(pred, target)
    monkeypatch.setattr(metrics, "COUNT_CHUNK", 7)  # chunks that split rows, and a short last one
    np.testing.assert_array_equal(confusion_matrix(pred, target), whole)
    bad = pred.copy()
    bad.flat[-1] = NUM_CLASSES  # in the last chunk only
    target.flat[-1] = 0
    with pytest.raises(ValueError, match="prediction"):
        confusion_matrix(bad, target)


def test_confusion_matrix_any_shape_and_ignored_predictions() -> None:
    target = np.array([[[0, 1], [IGNORE_INDEX, 2]]])
    # A garbage prediction under an ignored pixel is not counted and not an error.
    pred = np.array([[[0, 2], [IGNORE_INDEX, 2]]])
    cm = confusion_matrix(pred, target, num_classes=3)
    np.testing.assert_array_equal(cm, [[1, 0, 0], [0, 0, 1], [0, 0, 1]])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scores_match_sklearn(seed: int) -> None:
    pred, target = _random_labels(seed)
    result = scores(confusion_matrix(pred, target))
    p, t = _counted(pred, target)

    precision, recall, f1, support = skm.precision_recall_fscore_support(t, p, labels=LABELS, zero_division=0)
    iou = skm.jaccard_score(t, p, labels=LABELS, average=None, zero_division=0)
    assert result["pixels"] == t.size
    assert result["overall_accuracy"] == pytest.approx(skm.accuracy_score(t, p))
    assert result["kappa"] == pytest.approx(skm.cohen_kappa_score(t, p))
    assert result["mean_f1"] == pytest.approx(f1.mean())
    assert result["miou"] == pytest.approx(iou.mean())
    # The benchmark's 5-class means: every class but clutter (the last).
    assert CLASS_NAMES[-1] == "clutter"
    assert result["mean_f1_5"] == pytest.approx(f1[:-1].mean())
    assert result["miou_5"] == pytest.approx(iou[:-1].mean())
    for i, name in enumerate(CLASS_NAMES):
        row = result["per_class"][name]
        assert row["support"] == support[i]
        assert row["precision"] == pytest.approx(precision[i])
        assert row["recall"] == pytest.approx(recall[i])
        assert row["f1"] == pytest.approx(f1[i])
        assert row["iou"] == pytest.approx(iou[i])


def test_perfect_prediction() -> None:
    _, target = _random_labels(3)
    result = scores(confusion_matrix(target, target))
    for key in ("overall_accuracy", "kappa", "mean_f1", "miou"):
        assert result[key] == pytest.approx(1.0)
    for row in result["per_class"].values():
        assert row["precision"] == row["recall"] == row["f1"] == row["iou"] == pytest.approx(1.0)


def test_class_absent_from_reference_is_excluded_from_means() -> None:
    pred, target = _random_labels(4)
    clutter = CLASS_NAMES.index("clutter")
    target[target == clutter] = 0
    pred[pred == clutter] = 0
    result = scores(confusion_matrix(pred, target))

    row = result["per_class"]["clutter"]
    assert row == {"support": 0, "precision": None, "recall": None, "f1": None, "iou": None}
    present = [c for c in range(NUM_CLASSES) if c != clutter]
    p, t = _counted(pred, target)
    assert result["mean_f1"] == pytest.approx(
        skm.f1_score(t, p, labels=present, average="macro", zero_division=0)
    )
    assert result["miou"] == pytest.approx(
        skm.jaccard_score(t, p, labels=present, average="macro", zero_division=0)
    )


def test_class_absent_from_reference_but_predicted_has_precision_zero() -> None:
    # Class 2 is predicted once but never in the reference.
    cm = confusion_matrix(np.array([0, 1, 2]), np.array([0, 1, 1]), num_classes=3)
    result = scores(cm, class_names=["a", "b", "c"])
    assert result["per_class"]["c"] == {
        "support": 0,
        "precision": 0.0,
        "recall": None,
        "f1": None,
        "iou": None,
    }
    # Means over a and b only: f1 = (1 + 2/3) / 2, iou = (1 + 1/2) / 2.
    assert result["mean_f1"] == pytest.approx((1 + 2 / 3) / 2)
    assert result["miou"] == pytest.approx(0.75)


def test_class_in_reference_never_predicted_scores_zero() -> None:
    cm = confusion_matrix(np.array([0, 0, 0]), np.array([0, 0, 1]), num_classes=2)
    row = scores(cm, class_names=["a", "b"])["per_class"]["b"]
    assert row == {"support": 1, "precision": 0.0, "recall": 0.0, "f1": 0.0, "iou": 0.0}


def test_empty_and_single_class_matrices_give_none_not_nan() -> None:
    empty = scores(np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=np.int64))
    assert empty["pixels"] == 0
    assert empty["overall_accuracy"] is empty["kappa"] is empty["mean_f1"] is empty["miou"] is None
    # Chance agreement is already perfect: kappa is undefined.
    single = scores(confusion_matrix(np.zeros(5, np.uint8), np.zeros(5, np.uint8)))
    assert single["kappa"] is None
    assert single["overall_accuracy"] == 1.0


def test_scores_are_plain_json() -> None:
    pred, target = _random_labels(5)
    target[target == 4] = 0  # an absent class, so None values are in the output
    result = scores(confusion_matrix(pred, target))
    text = json.dumps(result, allow_nan=False)
    assert json.loads(text) == result

    def plain(value: object) -> bool:
        if isinstance(value, dict):
            return all(isinstance(k, str) and plain(v) for k, v in value.items())
        return value is None or type(value) in (int, float)

    assert plain(result)


def test_shape_mismatch_names_both_shapes() -> None:
    with pytest.raises(ValueError, match=r"\(4, 5\).*\(4, 6\)"):
        confusion_matrix(np.zeros((4, 5), np.uint8), np.zeros((4, 6), np.uint8))


@pytest.mark.parametrize("which", ["pred", "target"])
def test_out_of_range_values_are_rejected(which: str) -> None:
    good = np.zeros(4, np.uint8)
    bad = np.array([0, 1, NUM_CLASSES, 2], np.uint8)
    pred, target = (bad, good) if which == "pred" else (good, bad)
    name = "prediction" if which == "pred" else "target"
    with pytest.raises(ValueError, match=rf"{name} .*\[{NUM_CLASSES}\]"):
        confusion_matrix(pred, target)


def test_negative_and_non_integer_inputs_are_rejected() -> None:
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix(np.array([-1, 0]), np.array([0, 0]))
    with pytest.raises(ValueError, match="integer"):
        confusion_matrix(np.array([0.0, 1.0]), np.array([0, 1]))


def test_scores_rejects_mismatched_names() -> None:
    with pytest.raises(ValueError, match="names"):
        scores(np.zeros((3, 3), np.int64))


def test_mean_over_skips_none() -> None:
    per_class = {"a": {"f1": 0.5}, "b": {"f1": None}, "c": {"f1": 1.0}}
    assert mean_over(per_class, "f1", ["a", "b", "c"]) == pytest.approx(0.75)
    assert mean_over(per_class, "f1", ["b"]) is None


def test_clutter_counts_in_overall_accuracy_but_not_in_5_class_means() -> None:
    # Two pixels per class; every clutter pixel is wrong, everything else right.
    target = np.repeat(np.arange(NUM_CLASSES), 2)
    pred = np.where(target == 5, 0, target)
    result = scores(confusion_matrix(pred, target))
    assert result["overall_accuracy"] == pytest.approx(10 / 12)
    assert result["per_class"]["clutter"]["f1"] == 0.0
    assert result["mean_f1"] < result["mean_f1_5"]
    # Impervious gained two false positives: F1 = 2*2 / (2*2 + 2) = 2/3; the other four are perfect.
    assert result["mean_f1_5"] == pytest.approx((2 / 3 + 4) / 5)
    assert result["miou_5"] == pytest.approx((0.5 + 4) / 5)
