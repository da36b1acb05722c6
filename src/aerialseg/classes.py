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


def _unpack(value: int) -> tuple[int, int, int]:
    return (value >> 16) & 255, (value >> 8) & 255, value & 255


@dataclass(frozen=True)
class ColourDecoding:
    """What `decode_colours` made of a colour label."""

    index: np.ndarray
    """(H, W) uint8 class index; IGNORE_INDEX for boundary black and for unknown colours."""
    snapped: int
    """Pixels whose colour was off a legend colour by 1..tolerance and was taken as that colour."""
    unknown: dict[tuple[int, int, int], int]
    """Colours farther than the tolerance from every legend colour, with their pixel counts."""


def decode_colours(rgb: np.ndarray, *, allow_boundary: bool = False, tolerance: int = 0) -> ColourDecoding:
    """Decode an (H, W, 3) ISPRS colour label without raising on colours outside the legend.

    A colour within `tolerance` (largest absolute difference over R, G and B) of a legend colour
    counts as that colour: label files saved through lossy or resampling tools carry colours a
    few values off. Legend colours are 255 apart in at least one channel, so with a tolerance
    below 128 every colour is near at most one of them. Callers that read a label in blocks
    add up `snapped` and `unknown` and raise `unknown_colour_error` once for the whole file.
    """
    if rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise ValueError(f"expected an (H, W, 3) colour label, got shape {rgb.shape}")
    if not 0 <= tolerance < 128:
        raise ValueError(f"colour tolerance must be in 0..127, got {tolerance}")
    targets = [(cls.colour, cls.index) for cls in CLASSES]
    if allow_boundary:
        targets.append((BOUNDARY_COLOUR, IGNORE_INDEX))
    packed = _pack(rgb)
    index = np.full(packed.shape, IGNORE_INDEX, dtype=np.uint8)
    known = np.zeros(packed.shape, dtype=bool)
    for colour, value in targets:
        hit = packed == _pack(np.array(colour, dtype=np.uint8))
        index[hit] = value
        known |= hit
    if known.all():
        return ColourDecoding(index, 0, {})
    # Off-legend pixels are rare, so only their distinct colours are compared with the legend.
    off_legend = np.flatnonzero(~known.ravel())
    values, inverse, counts = np.unique(packed.ravel()[off_legend], return_inverse=True, return_counts=True)
    colours = np.stack([(values >> 16) & 255, (values >> 8) & 255, values & 255], axis=1).astype(np.int16)
    legend_colours = np.array([colour for colour, _ in targets], dtype=np.int16)
    distance = np.abs(colours[:, None, :] - legend_colours[None, :, :]).max(axis=2)
    nearest = distance.argmin(axis=1)
    within = distance[np.arange(len(values)), nearest] <= tolerance
    target_values = np.array([value for _, value in targets], dtype=np.uint8)
    decoded = np.where(within, target_values[nearest], IGNORE_INDEX).astype(np.uint8)
    index.reshape(-1)[off_legend] = decoded[inverse.ravel()]
    snapped = int(counts[within].sum())
    unknown = {
        _unpack(value): count
        for value, count, ok in zip(values.tolist(), counts.tolist(), within.tolist(), strict=True)
        if not ok
    }
    return ColourDecoding(index, snapped, unknown)


def unknown_colour_error(
    source: str | Path,
    unknown: dict[tuple[int, int, int], int],
    *,
    allow_boundary: bool = False,
    tolerance: int = 0,
) -> UnknownColourError:
    """The error for `unknown` colours of `source`: file, total, the most frequent colours, the legend."""
    found = ", ".join(f"{c}: {n} px" for c, n in sorted(unknown.items(), key=lambda t: -t[1])[:5])
    legend = ", ".join(f"{c.name}={c.colour}" for c in CLASSES)
    if allow_boundary:
        legend += f", boundary={BOUNDARY_COLOUR}"
    within = f" (or within {tolerance} of one in each of R, G, B)" if tolerance else ""
    return UnknownColourError(
        f"{source}: {sum(unknown.values())} pixels have colours outside the ISPRS legend "
        f"(most frequent: {found}); expected one of {legend}{within}"
    )


def colours_to_index(
    rgb: np.ndarray, source: str | Path = "<array>", *, allow_boundary: bool = False, tolerance: int = 0
) -> np.ndarray:
    """Decode an (H, W, 3) ISPRS colour label into an (H, W) uint8 class index.

    Boundary black becomes IGNORE_INDEX when `allow_boundary` (eroded ground truth). Colours
    within `tolerance` of a legend colour are snapped to it (see `decode_colours`); any other
    colour outside the legend raises UnknownColourError naming the file, colour and pixel count.
    """
    if rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise ValueError(f"{source}: expected an (H, W, 3) colour label, got shape {rgb.shape}")
    decoded = decode_colours(rgb, allow_boundary=allow_boundary, tolerance=tolerance)
    if decoded.unknown:
        raise unknown_colour_error(
            source, decoded.unknown, allow_boundary=allow_boundary, tolerance=tolerance
        )
    return decoded.index


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
