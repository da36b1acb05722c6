"""The ISPRS 2D semantic labelling legend, in one place."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

IGNORE_INDEX = 255
"""Label index of pixels no loss or metric looks at (the eroded boundary band)."""

BOUNDARY_COLOUR = (0, 0, 0)
"""Colour the eroded ground truth paints its boundary band with."""


@dataclass(frozen=True)
class SemanticClass:
    index: int
    name: str
    colour: tuple[int, int, int]


CLASSES: tuple[SemanticClass, ...] = (
    SemanticClass(0, "impervious_surfaces", (255, 255, 255)),
    SemanticClass(1, "building", (0, 0, 255)),
    SemanticClass(2, "low_vegetation", (0, 255, 255)),
    SemanticClass(3, "tree", (0, 255, 0)),
    SemanticClass(4, "car", (255, 255, 0)),
    SemanticClass(5, "clutter", (255, 0, 0)),
)
NUM_CLASSES = len(CLASSES)
CLASS_NAMES: tuple[str, ...] = tuple(c.name for c in CLASSES)


class UnknownColourError(ValueError):
    """A label raster holds a colour that is not in the ISPRS legend."""


def _pack(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) uint8 -> (...) uint32, so colours can be compared as single numbers."""
    rgb = rgb.astype(np.uint32)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


def colours_to_index(
    rgb: np.ndarray, source: str | Path = "<array>", *, allow_boundary: bool = False
) -> np.ndarray:
    """Decode an (H, W, 3) ISPRS colour label into an (H, W) uint8 class index.

    Boundary black becomes IGNORE_INDEX when `allow_boundary` (eroded ground truth); any other
    colour outside the legend raises UnknownColourError naming the file, colour and pixel count.
    """
    if rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise ValueError(f"{source}: expected an (H, W, 3) colour label, got shape {rgb.shape}")
    packed = _pack(rgb)
    index = np.full(packed.shape, IGNORE_INDEX, dtype=np.uint8)
    known = np.zeros(packed.shape, dtype=bool)
    for cls in CLASSES:
        hit = packed == _pack(np.array(cls.colour, dtype=np.uint8))
        index[hit] = cls.index
        known |= hit
    if allow_boundary:
        known |= packed == _pack(np.array(BOUNDARY_COLOUR, dtype=np.uint8))
    if not known.all():
        values, counts = np.unique(packed[~known], return_counts=True)
        found = ", ".join(
            f"({v >> 16}, {(v >> 8) & 255}, {v & 255}): {n} px"
            for v, n in sorted(zip(values.tolist(), counts.tolist(), strict=True), key=lambda t: -t[1])[:5]
        )
        legend = ", ".join(f"{c.name}={c.colour}" for c in CLASSES)
        if allow_boundary:
            legend += f", boundary={BOUNDARY_COLOUR}"
        raise UnknownColourError(
            f"{source}: {int((~known).sum())} pixels have colours outside the ISPRS legend "
            f"(most frequent: {found}); expected one of {legend}"
        )
    return index


def index_to_colours(index: np.ndarray) -> np.ndarray:
    """(H, W) class index -> (H, W, 3) uint8 in the ISPRS palette; ignored pixels are black."""
    palette = np.zeros((256, 3), dtype=np.uint8)
    for cls in CLASSES:
        palette[cls.index] = cls.colour
    palette[IGNORE_INDEX] = BOUNDARY_COLOUR
    return palette[index]


def legend() -> list[dict[str, object]]:
    """The legend as plain data, for HDF5 attributes and checkpoints."""
    return [{"index": c.index, "name": c.name, "colour": list(c.colour)} for c in CLASSES]
