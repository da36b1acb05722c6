"""The sliding-window engine: full coverage, blending, TTA views, any raster size, bounded rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from aerialseg.inference import (
    BLENDS,
    TTA,
    ArrayRows,
    Settings,
    blend_weights,
    predict_probabilities,
    stream_blocks,
)


class PixelwiseNet(nn.Module):
    """A 1x1 convolution sees no context, so the stitched prediction must equal the whole-image one."""

    def __init__(self, bands: int = 4, classes: int = 6) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(bands, classes, kernel_size=1)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += len(x)
        return self.conv(x)


class OffsetNet(nn.Module):
    """Scores that depend on the position inside the window, to expose how windows are blended."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        ramp = torch.linspace(-3, 3, w).expand(n, 1, h, w)
        return torch.cat([ramp, -ramp], dim=1)


@pytest.mark.parametrize(("height", "width", "overlap"), [(96, 160, 0.5), (100, 75, 0.25), (64, 64, 0.0)])
def test_stitched_prediction_equals_whole_image_prediction(height: int, width: int, overlap: float) -> None:
    image = np.random.default_rng(0).standard_normal((4, height, width)).astype(np.float32)
    net = PixelwiseNet().eval()
    probs = predict_probabilities(net, image, Settings(window=64, overlap=overlap, batch_size=3))
    with torch.no_grad():
        expected = torch.softmax(net(torch.from_numpy(image)[None]), dim=1)[0].numpy()
    assert probs.shape == (6, height, width)
    np.testing.assert_allclose(probs, expected, rtol=1e-5, atol=1e-6)


def test_overlapping_windows_are_averaged_not_overwritten() -> None:
    image = np.zeros((1, 32, 64), dtype=np.float32)
    # Windows at columns 0 and 32: the middle 0..32 of the second window overlaps the first's right half.
    probs = predict_probabilities(
        OffsetNet(), image, Settings(window=32, overlap=0.0, batch_size=1, blend="uniform")
    )
    single = torch.softmax(OffsetNet()(torch.zeros(1, 1, 32, 32)), dim=1)[0].numpy()
    np.testing.assert_allclose(probs[:, :, :32], single, rtol=1e-6)
    both = predict_probabilities(
        OffsetNet(), np.zeros((1, 32, 48), np.float32), Settings(window=32, overlap=0.0, blend="uniform")
    )
    # Columns 16..31 are covered by windows at 0 and 16: their value is the mean of both views.
    first, second = single[:, :, 16:32], single[:, :, 0:16]
    np.testing.assert_allclose(both[:, :, 16:32], (first + second) / 2, rtol=1e-6)
    np.testing.assert_allclose(both.sum(axis=0), 1.0, rtol=1e-6)


def test_raster_smaller_than_the_window_is_padded_and_cropped() -> None:
    image = np.random.default_rng(1).standard_normal((4, 40, 50)).astype(np.float32)
    net = PixelwiseNet().eval()
    probs = predict_probabilities(net, image, Settings(window=64, overlap=0.5))
    with torch.no_grad():
        expected = torch.softmax(net(torch.from_numpy(image)[None]), dim=1)[0].numpy()
    np.testing.assert_allclose(probs, expected, rtol=1e-5, atol=1e-6)


def test_flip_tta_runs_three_views_per_window() -> None:
    image = np.random.default_rng(2).standard_normal((4, 64, 64)).astype(np.float32)
    net = PixelwiseNet().eval()
    plain = predict_probabilities(net, image, Settings(window=64, overlap=0.0))
    calls = net.calls
    flipped = predict_probabilities(net, image, Settings(window=64, overlap=0.0, tta="flip"))
    assert net.calls - calls == 3 * calls
    # A pixelwise model is flip-equivariant, so TTA must not change its answer.
    np.testing.assert_allclose(flipped, plain, rtol=1e-5, atol=1e-6)


def test_window_not_multiple_of_32_is_refused() -> None:
    with pytest.raises(ValueError, match="multiple of 32"):
        predict_probabilities(PixelwiseNet(), np.zeros((4, 100, 100), np.float32), Settings(window=50))


@pytest.mark.parametrize(("tta", "views"), [("none", 1), ("flip", 3), ("d4", 8)])
@pytest.mark.parametrize("blend", list(BLENDS))
def test_every_tta_and_blend_brings_each_view_back_to_its_place(tta: str, views: int, blend: str) -> None:
    """A pixelwise network is equivariant to flips and rotations, and a weighted mean of equal
    values is that value: any wrongly undone view or misplaced weight would show."""
    image = np.random.default_rng(3).standard_normal((4, 80, 112)).astype(np.float32)
    net = PixelwiseNet().eval()
    probs = predict_probabilities(net, image, Settings(window=64, overlap=0.5, tta=tta, blend=blend))
    windows = net.calls
    with torch.no_grad():
        expected = torch.softmax(net(torch.from_numpy(image)[None]), dim=1)[0].numpy()
    np.testing.assert_allclose(probs, expected, rtol=1e-5, atol=1e-6)
    assert windows == views * 6  # 2 x 3 windows of 64 px cover 80 x 112 at overlap 0.5


def test_smooth_blending_weighs_window_centres_above_window_borders() -> None:
    """OffsetNet's scores depend on the position in the window; where two windows overlap, a
    cosine blend follows the window whose centre is nearer, a uniform one takes the plain mean."""
    image = np.zeros((1, 32, 48), np.float32)
    uniform = predict_probabilities(OffsetNet(), image, Settings(window=32, overlap=0.0, blend="uniform"))
    cosine = predict_probabilities(OffsetNet(), image, Settings(window=32, overlap=0.0, blend="cosine"))
    single = torch.softmax(OffsetNet()(torch.zeros(1, 1, 32, 32)), dim=1)[0].numpy()
    # Column 17 is 1 px into the overlap: near the first window's right border (col 17 of 32) and
    # near the second window's left border (col 1 of 32); column 30 is the first window's border
    # and the second window's centre: the cosine blend follows the second window there.
    assert abs(cosine[0, 0, 30] - single[0, 0, 14]) < abs(uniform[0, 0, 30] - single[0, 0, 14])
    np.testing.assert_allclose(cosine.sum(axis=0), 1.0, rtol=1e-6)


def test_blend_weights_are_positive_and_peak_in_the_centre() -> None:
    for blend in BLENDS:
        w = blend_weights(blend, 64)
        assert w.shape == (64, 64) and w.min() > 0
        assert w[32, 32] == w.max()
    assert (blend_weights("uniform", 64) == 1).all()


def test_a_choice_that_is_not_in_its_registry_lists_the_options() -> None:
    with pytest.raises(
        ValueError, match="'rot' is not a test-time augmentation; choose one of: d4, flip, none"
    ):
        Settings(window=64, tta="rot").check()
    with pytest.raises(
        ValueError, match="'hann' is not a window blending; choose one of: cosine, gaussian, uniform"
    ):
        Settings(window=64, blend="hann").check()
    assert list(TTA) == ["none", "flip", "d4"]


class _CountingRows(ArrayRows):
    def __init__(self, image: np.ndarray) -> None:
        super().__init__(image)
        self.furthest = 0

    def read(self, top: int, bottom: int) -> tuple[np.ndarray, np.ndarray | None]:
        self.furthest = max(self.furthest, bottom)
        return super().read(top, bottom)


def test_rows_are_handed_on_before_the_raster_is_read_to_the_end() -> None:
    """Bounded memory: the first finished rows come out after about two windows of input rows."""
    image = np.random.default_rng(4).standard_normal((4, 640, 96)).astype(np.float32)
    rows = _CountingRows(image)
    blocks = stream_blocks(PixelwiseNet().eval(), rows, Settings(window=64, overlap=0.5, batch_size=2))
    first = next(blocks)
    assert first.row == 0 and rows.furthest <= 2 * 64
    rest = list(blocks)
    assert sum(b.probabilities.shape[1] for b in [first, *rest]) == 640 and rows.furthest == 640


def test_bf16_gives_the_classes_of_fp32_on_almost_every_pixel() -> None:
    image = np.random.default_rng(5).standard_normal((4, 96, 96)).astype(np.float32)
    net = PixelwiseNet().eval()
    fp32 = predict_probabilities(net, image, Settings(window=64, precision="32")).argmax(0)
    bf16 = predict_probabilities(net, image, Settings(window=64, precision="bf16")).argmax(0)
    assert (fp32 == bf16).mean() > 0.97
