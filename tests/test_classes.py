"""Decoding and encoding ISPRS colour labels."""

from __future__ import annotations

import numpy as np
import pytest

from aerialseg.classes import (
    BOUNDARY_COLOUR,
    CLASS_NAMES,
    CLASSES,
    IGNORE_INDEX,
    NUM_CLASSES,
    SemanticClass,
    UnknownColourError,
    colours_to_index,
    index_to_colours,
    legend,
)

UNKNOWN = (12, 34, 56)


def rgb_image(colours: list[tuple[int, int, int]], shape: tuple[int, int]) -> np.ndarray:
    """An (H, W, 3) uint8 image filled with `colours` in row-major order, repeated."""
    flat = np.array([colours[i % len(colours)] for i in range(shape[0] * shape[1])], dtype=np.uint8)
    return flat.reshape(*shape, 3)


def test_legend_is_the_isprs_legend() -> None:
    assert NUM_CLASSES == 6
    assert [c.index for c in CLASSES] == list(range(6))
    assert CLASS_NAMES == ("impervious_surfaces", "building", "low_vegetation", "tree", "car", "clutter")
    assert [c.colour for c in CLASSES] == [
        (255, 255, 255),
        (0, 0, 255),
        (0, 255, 255),
        (0, 255, 0),
        (255, 255, 0),
        (255, 0, 0),
    ]
    assert len({c.colour for c in CLASSES} | {BOUNDARY_COLOUR}) == 7
    assert legend() == [{"index": c.index, "name": c.name, "colour": list(c.colour)} for c in CLASSES]


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.name)
@pytest.mark.parametrize("allow_boundary", [False, True])
def test_each_legend_colour_decodes(cls: SemanticClass, allow_boundary: bool) -> None:
    index = colours_to_index(rgb_image([cls.colour], (3, 5)), allow_boundary=allow_boundary)
    assert index.dtype == np.uint8
    assert index.shape == (3, 5)
    assert (index == cls.index).all()


def test_mixed_label_decodes_pixel_by_pixel() -> None:
    rng = np.random.default_rng(0)
    expected = rng.integers(0, NUM_CLASSES, size=(17, 23)).astype(np.uint8)
    palette = np.array([c.colour for c in CLASSES], dtype=np.uint8)
    np.testing.assert_array_equal(colours_to_index(palette[expected]), expected)


def test_boundary_black_is_ignored_only_when_allowed() -> None:
    colours = [CLASSES[1].colour, BOUNDARY_COLOUR, CLASSES[3].colour]
    rgb = rgb_image(colours, (4, 6))
    index = colours_to_index(rgb, allow_boundary=True)
    np.testing.assert_array_equal(index, np.tile([1, IGNORE_INDEX, 3], 8).reshape(4, 6))
    with pytest.raises(UnknownColourError) as info:
        colours_to_index(rgb, "label.tif")
    message = str(info.value)
    assert "label.tif" in message
    assert "(0, 0, 0): 8 px" in message


def test_unknown_colour_names_file_colour_and_count() -> None:
    colours = [CLASSES[0].colour] * 3 + [UNKNOWN]  # 1 pixel in 4 is unknown
    rgb = rgb_image(colours, (4, 7))
    for allow_boundary in (False, True):
        with pytest.raises(UnknownColourError) as info:
            colours_to_index(rgb, "gts/top_mosaic_09cm_area9.tif", allow_boundary=allow_boundary)
        message = str(info.value)
        assert "gts/top_mosaic_09cm_area9.tif" in message
        assert "(12, 34, 56): 7 px" in message
        assert "7 pixels" in message


def test_several_unknown_colours_are_counted_separately() -> None:
    rgb = rgb_image([CLASSES[2].colour], (10, 10))
    rgb[0, :5] = UNKNOWN
    rgb[1, :2] = (254, 255, 255)  # one off the white of impervious surfaces
    with pytest.raises(UnknownColourError) as info:
        colours_to_index(rgb, "x.tif")
    message = str(info.value)
    assert "7 pixels" in message
    assert "(12, 34, 56): 5 px" in message
    assert "(254, 255, 255): 2 px" in message
    # The most frequent unknown colour is listed first.
    assert message.index("(12, 34, 56)") < message.index("(254, 255, 255)")


def test_unknown_colour_error_is_a_value_error() -> None:
    assert issubclass(UnknownColourError, ValueError)


@pytest.mark.parametrize("shape", [(4, 4), (4, 4, 4), (3, 4, 4, 3)])
def test_wrong_shape_raises(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"a\.tif"):
        colours_to_index(np.zeros(shape, dtype=np.uint8), "a.tif")


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.name)
def test_index_to_colours_paints_the_legend(cls: SemanticClass) -> None:
    rgb = index_to_colours(np.full((2, 3), cls.index, dtype=np.uint8))
    assert rgb.dtype == np.uint8
    assert rgb.shape == (2, 3, 3)
    assert (rgb == np.array(cls.colour, dtype=np.uint8)).all()


def test_ignored_pixels_are_painted_black() -> None:
    rgb = index_to_colours(np.full((2, 2), IGNORE_INDEX, dtype=np.uint8))
    assert (rgb == np.array(BOUNDARY_COLOUR, dtype=np.uint8)).all()


def test_round_trip() -> None:
    rng = np.random.default_rng(0)
    index = rng.integers(0, NUM_CLASSES, size=(32, 48)).astype(np.uint8)
    np.testing.assert_array_equal(colours_to_index(index_to_colours(index)), index)
    index[rng.random(index.shape) < 0.2] = IGNORE_INDEX
    np.testing.assert_array_equal(colours_to_index(index_to_colours(index), allow_boundary=True), index)
