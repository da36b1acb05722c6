"""ISPRS evaluation: one confusion matrix, every figure of the protocol derived from it.

Convention: rows are the reference (ground truth), columns the prediction. Pixels whose
reference is IGNORE_INDEX (the eroded boundary band) are never counted.

Undefined values are reported as None, never NaN, so that the result is valid JSON:

* a class absent from the reference (support 0) has no recall, F1 or IoU;
* its precision is None only if it was never predicted either, otherwise 0.0 (every
  prediction of it is wrong);
* a class present in the reference but never predicted has precision 0.0 (as scikit-learn's
  ``zero_division=0``), recall 0.0, F1 0.0 and IoU 0.0.

``mean_f1`` and ``miou`` average over the classes present in the reference only (the ISPRS
convention: clutter, for instance, is absent from some test tiles, and a class that cannot be
right or wrong must not pull the mean towards 0 or 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from aerialseg.classes import CLASS_NAMES, IGNORE_INDEX, NUM_CLASSES

COUNT_CHUNK = 1 << 22
"""Pixels counted at a time by `confusion_matrix` (4 Mi: ~100 MB of temporaries)."""


def confusion_matrix(
    pred: np.ndarray,
    target: np.ndarray,
    num_classes: int = NUM_CLASSES,
    ignore_index: int = IGNORE_INDEX,
) -> np.ndarray:
    """Count (reference, prediction) pairs into an int64 (num_classes, num_classes) matrix.

    Works on arrays of any (equal) shape. Pixels whose target is `ignore_index` are skipped,
    whatever the prediction there. Raises ValueError on a shape mismatch, a non-integer dtype,
    or a counted target/prediction value outside [0, num_classes).
    """
    pred = np.asarray(pred)
    target = np.asarray(target)
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from target shape {target.shape}")
    for name, array in (("prediction", pred), ("target", target)):
        if not np.issubdtype(array.dtype, np.integer):
            raise ValueError(f"{name} must hold integer class indices, got dtype {array.dtype}")

    # Counted a chunk of pixels at a time: the int64 codes of a whole 6000 x 6000 Potsdam tile
    # would be 2 x 288 MB more (and bincount's own int64 copy), on top of the tile itself.
    targets, preds = target.reshape(-1), pred.reshape(-1)
    flat = np.zeros(num_classes * num_classes, dtype=np.int64)
    for start in range(0, targets.size, COUNT_CHUNK):
        t, p = targets[start : start + COUNT_CHUNK], preds[start : start + COUNT_CHUNK]
        counted = t != ignore_index
        # int64 before arithmetic: uint8 labels would overflow in num_classes * target + pred.
        t = t[counted].astype(np.int64)
        p = p[counted].astype(np.int64)
        _check_range("target", t, num_classes, ignore_index)
        _check_range("prediction", p, num_classes, ignore_index)
        flat += np.bincount(num_classes * t + p, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def _check_range(name: str, values: np.ndarray, num_classes: int, ignore_index: int) -> None:
    bad = (values < 0) | (values >= num_classes)
    if bad.any():
        found = np.unique(values[bad])[:10].tolist()
        raise ValueError(
            f"{name} holds {int(bad.sum())} counted pixels with values {found} outside "
            f"[0, {num_classes}) (ignore_index={ignore_index} is only skipped in the target)"
        )


EXCLUDED_FROM_5_CLASS_MEANS = ("clutter",)


def scores(cm: np.ndarray, class_names: Sequence[str] = CLASS_NAMES) -> dict[str, Any]:
    """Every ISPRS figure from a confusion matrix (rows = reference), as plain JSON data.

    Keys: overall_accuracy, kappa (Cohen's), mean_f1, miou, pixels (total counted), and
    per_class {name: {support, precision, recall, f1, iou}}; recall is the per-class accuracy.
    mean_f1_5 and miou_5 leave clutter out of the means, as papers on the ISPRS benchmark
    report them (clutter still counts in the overall accuracy).
    See the module docstring for when a value is None.
    """
    cm = _validated(cm, class_names)
    total = int(cm.sum())
    tp = np.diag(cm)
    support = cm.sum(axis=1)  # reference pixels per class
    predicted = cm.sum(axis=0)

    per_class = {
        name: _class_scores(int(tp[i]), int(support[i]), int(predicted[i]))
        for i, name in enumerate(class_names)
    }
    present = [name for i, name in enumerate(class_names) if support[i] > 0]
    return {
        "overall_accuracy": float(tp.sum() / total) if total else None,
        "kappa": _kappa(cm),
        "mean_f1": mean_over(per_class, "f1", present),
        "miou": mean_over(per_class, "iou", present),
        "mean_f1_5": mean_over(per_class, "f1", [n for n in present if n not in EXCLUDED_FROM_5_CLASS_MEANS]),
        "miou_5": mean_over(per_class, "iou", [n for n in present if n not in EXCLUDED_FROM_5_CLASS_MEANS]),
        "pixels": total,
        "per_class": per_class,
    }


def _validated(cm: np.ndarray, class_names: Sequence[str]) -> np.ndarray:
    cm = np.asarray(cm)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"confusion matrix must be square, got shape {cm.shape}")
    if cm.shape[0] != len(class_names):
        raise ValueError(
            f"confusion matrix has {cm.shape[0]} classes but {len(class_names)} names were given"
        )
    if not np.issubdtype(cm.dtype, np.integer):
        raise ValueError(f"confusion matrix must hold integer counts, got dtype {cm.dtype}")
    if (cm < 0).any():
        raise ValueError("confusion matrix holds negative counts")
    return cm.astype(np.int64)


def _class_scores(tp: int, support: int, predicted: int) -> dict[str, Any]:
    fn = support - tp
    fp = predicted - tp
    if predicted:
        precision: float | None = tp / predicted
    else:
        # Never predicted: wrong by omission if the class is in the reference, else moot.
        precision = 0.0 if support else None
    if not support:
        return {"support": 0, "precision": precision, "recall": None, "f1": None, "iou": None}
    # Written with counts rather than 2PR/(P+R) so that tp = 0 gives 0, not 0/0.
    return {
        "support": support,
        "precision": precision,
        "recall": tp / support,
        "f1": 2 * tp / (2 * tp + fp + fn),
        "iou": tp / (tp + fp + fn),
    }


def _kappa(cm: np.ndarray) -> float | None:
    """Cohen's kappa; None when chance agreement is already perfect (e.g. a single class)."""
    total = cm.sum()
    if not total:
        return None
    # float64 before multiplying: products of pixel counts overflow int64 on large mosaics.
    rows = cm.sum(axis=1).astype(np.float64)
    cols = cm.sum(axis=0).astype(np.float64)
    observed = np.trace(cm) / total
    expected = float(rows @ cols) / float(total) ** 2
    if expected >= 1.0:
        return None
    return float((observed - expected) / (1.0 - expected))


def mean_over(per_class: dict[str, dict[str, Any]], key: str, classes: Sequence[str]) -> float | None:
    """Mean of `per_class[c][key]` over `classes`, skipping None; None if nothing is left."""
    values = [per_class[c][key] for c in classes if per_class[c][key] is not None]
    return float(sum(values) / len(values)) if values else None
