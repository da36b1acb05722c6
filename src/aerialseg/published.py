"""Published figures this project compares with, in one place, with their source.

The lecture: G. Cavallaro, "Deep Learning in Remote Sensing: Applications", lecture 4 of
"Introduction to Deep Learning Models", Juelich Supercomputing Centre / University of Iceland,
June 6th 2018, slides "Experiment 1: Test ResNet50 FCN", "Experiment 2: Test Pre-Trained
ResNet50 with ImageNet" and "Results Summary" (the project's reference copy of its text is
000_39339a0279f3eeb8.txt in the shared reference material, outside this repository). It trained
a Keras ResNet50 FCN with skip fusion on ISPRS Vaihingen (IRRG, 256 px patches with overlap 0.6,
augmentation, 20 epochs, from scratch or from ImageNet weights) and tested it on areas 15 and 23.

Its figures are on the **full** reference: each confusion matrix counts every pixel of its tile
(4,922,235 = 1919 x 2565 for area 15, 4,845,038 = 1903 x 2546 for area 23), boundaries included,
and its overall accuracies (80.68% / 78.78% from scratch, 82.15% / 82.04% with ImageNet weights,
from "Results Summary") are the traces of those matrices over their sums; its per-class
"Accuracy" columns are the rows' recalls. The matrices are kept here as printed (rows: reference,
columns: prediction, in the project's class order) so that every figure can be recomputed from
them (tests/test_evaluation.py does: the printed OAs and accuracies match to the printed digits).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LECTURE_SOURCE = (
    'G. Cavallaro, "Deep Learning in Remote Sensing: Applications", lecture 4, Juelich '
    'Supercomputing Centre, 6 June 2018, slides "Experiment 1/2" and "Results Summary"'
)
LECTURE_TILES = ("15", "23")
"""Vaihingen areas the lecture tested on (official *training* areas of the benchmark)."""
LECTURE_TAG = "lecture_comparison"
"""MLflow tag `evaluate` sets on runs that compare with the lecture (from_scratch, imagenet or
neither: the training that matches train.pretrained); the leaderboard reads it."""
LECTURE_SETTINGS = {"from_scratch": "ResNet50 FCN", "imagenet": "Pre-trained ResNet50 (ImageNet)"}
"""The lecture's two trainings: the encoder from random weights, or from ImageNet weights."""


@dataclass(frozen=True)
class LectureResult:
    """One tile of one of the lecture's trainings, as published (full reference)."""

    tile: str
    setting: str  # a key of LECTURE_SETTINGS
    overall_accuracy: float  # as printed in "Results Summary", as a fraction
    recall_percent: tuple[float, ...]  # the "Accuracy" column per class, as printed (percent, 1 decimal)
    confusion_matrix: tuple[tuple[int, ...], ...]  # rows: reference, columns: prediction

    @property
    def pixels(self) -> int:
        return int(np.asarray(self.confusion_matrix).sum())

    @property
    def recall(self) -> tuple[float, ...]:
        """Per-class accuracy from the confusion matrix (unrounded)."""
        cm = np.asarray(self.confusion_matrix, dtype=np.float64)
        return tuple(float(v) for v in np.diag(cm) / cm.sum(axis=1))


LECTURE: dict[tuple[str, str], LectureResult] = {
    (r.tile, r.setting): r
    for r in (
        LectureResult(
            "15",
            "from_scratch",
            0.8068,
            (79.3, 84.8, 80.1, 80.3, 39.9, 0.0),
            (
                (678470, 27787, 111927, 35596, 1332, 0),
                (77693, 911674, 73864, 11848, 91, 0),
                (50176, 35116, 1049665, 174888, 44, 8),
                (15034, 4887, 304333, 1318935, 0, 0),
                (18528, 13, 181, 305, 12657, 0),
                (226, 581, 6103, 13, 260, 0),
            ),
        ),
        LectureResult(
            "23",
            "from_scratch",
            0.7878,
            (72.3, 82.8, 79.3, 79.9, 42.3, 0.0),
            (
                (579374, 27187, 153102, 40069, 581, 1339),
                (62403, 733366, 78575, 9724, 22, 1194),
                (43527, 23396, 1067768, 210626, 411, 0),
                (14370, 5981, 338902, 1429851, 0, 67),
                (8464, 92, 189, 164, 6538, 0),
                (0, 1614, 5929, 213, 0, 0),
            ),
        ),
        LectureResult(
            "15",
            "imagenet",
            0.8215,
            (75.6, 93.6, 72.2, 86.4, 81.9, 0.0),
            (
                (646590, 40574, 102219, 60719, 5003, 7),
                (12621, 1006203, 39785, 16494, 67, 0),
                (50571, 49736, 945549, 263760, 281, 0),
                (17049, 7515, 199078, 1419534, 8, 5),
                (5685, 24, 6, 6, 25963, 0),
                (634, 1, 6337, 0, 211, 0),
            ),
        ),
        LectureResult(
            "23",
            "imagenet",
            0.8204,
            (76.2, 94.6, 66.6, 90.4, 84.9, 0.0),
            (
                (611119, 34778, 93020, 60029, 2482, 224),
                (8924, 837288, 21510, 17213, 279, 70),
                (54358, 39947, 896551, 354659, 197, 16),
                (17677, 8520, 145840, 1616651, 361, 122),
                (2270, 7, 0, 55, 13115, 0),
                (112, 239, 7290, 115, 0, 0),
            ),
        ),
    )
}
"""(tile, setting) -> the lecture's published result."""


def lecture_setting(pretrained: str | None) -> str | None:
    """The lecture training that a run with `train.pretrained` compares with: `none` ->
    from_scratch, `imagenet` -> imagenet; None for a local weights file (neither matches)."""
    value = (pretrained or "none").strip().lower()
    return {"none": "from_scratch", "imagenet": "imagenet"}.get(value)


def lecture_overall_accuracy_text() -> str:
    """The lecture's overall accuracies in one phrase, for notes under tables: "OA 80.68% / 78.78%
    from scratch, 82.15% / 82.04% with ImageNet weights (areas 15 / 23)"."""
    scratch = " / ".join(f"{LECTURE[(t, 'from_scratch')].overall_accuracy:.2%}" for t in LECTURE_TILES)
    imagenet = " / ".join(f"{LECTURE[(t, 'imagenet')].overall_accuracy:.2%}" for t in LECTURE_TILES)
    return f"OA {scratch} from scratch, {imagenet} with ImageNet weights (areas {' / '.join(LECTURE_TILES)})"
