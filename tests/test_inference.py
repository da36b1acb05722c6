"""Sliding-window inference: full coverage, averaged blending, any raster size."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from aerialseg.inference import predict_probabilities


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
    probs = predict_probabilities(net, image, window=64, overlap=overlap, batch_size=3)
    with torch.no_grad():
        expected = torch.softmax(net(torch.from_numpy(image)[None]), dim=1)[0].numpy()
    assert probs.shape == (6, height, width)
    np.testing.assert_allclose(probs, expected, rtol=1e-5, atol=1e-6)


def test_overlapping_windows_are_averaged_not_overwritten() -> None:
    image = np.zeros((1, 32, 64), dtype=np.float32)
    # Windows at columns 0 and 32: the middle 0..32 of the second window overlaps the first's right half.
    probs = predict_probabilities(OffsetNet(), image, window=32, overlap=0.0, batch_size=1)
    single = torch.softmax(OffsetNet()(torch.zeros(1, 1, 32, 32)), dim=1)[0].numpy()
    np.testing.assert_allclose(probs[:, :, :32], single, rtol=1e-6)
    both = predict_probabilities(OffsetNet(), np.zeros((1, 32, 48), np.float32), window=32, overlap=0.0)
    # Columns 16..31 are covered by windows at 0 and 16: their value is the mean of both views.
    first, second = single[:, :, 16:32], single[:, :, 0:16]
    np.testing.assert_allclose(both[:, :, 16:32], (first + second) / 2, rtol=1e-6)
    np.testing.assert_allclose(both.sum(axis=0), 1.0, rtol=1e-6)


def test_raster_smaller_than_the_window_is_padded_and_cropped() -> None:
    image = np.random.default_rng(1).standard_normal((4, 40, 50)).astype(np.float32)
    net = PixelwiseNet().eval()
    probs = predict_probabilities(net, image, window=64, overlap=0.5)
    with torch.no_grad():
        expected = torch.softmax(net(torch.from_numpy(image)[None]), dim=1)[0].numpy()
    np.testing.assert_allclose(probs, expected, rtol=1e-5, atol=1e-6)


def test_flip_tta_runs_three_views_per_window() -> None:
    image = np.random.default_rng(2).standard_normal((4, 64, 64)).astype(np.float32)
    net = PixelwiseNet().eval()
    plain = predict_probabilities(net, image, window=64, overlap=0.0)
    calls = net.calls
    flipped = predict_probabilities(net, image, window=64, overlap=0.0, tta=True)
    assert net.calls - calls == 3 * calls
    # A pixelwise model is flip-equivariant, so TTA must not change its answer.
    np.testing.assert_allclose(flipped, plain, rtol=1e-5, atol=1e-6)


def test_window_not_multiple_of_32_is_refused() -> None:
    with pytest.raises(ValueError, match="multiple of 32"):
        predict_probabilities(PixelwiseNet(), np.zeros((4, 100, 100), np.float32), window=50, overlap=0.5)
