"""The lecture's "ResNet50 FCN with skip fusion" (`model.arch: fcn_skip`), on any smp encoder."""

from __future__ import annotations

import segmentation_models_pytorch as smp
import torch
from torch import nn


class FCNSkip(nn.Module):
    """The lecture's "ResNet50 FCN with skip fusion": FCN-8s-style heads on an smp encoder.

    The encoder's outputs at strides 8, 16 and 32 are each turned into class scores by a 1x1
    convolution, upsampled bilinearly to the input size and summed, so coarse, semantic scores
    are refined by finer, more local ones.
    """

    STAGES = (3, 4, 5)
    """Indices of smp's encoder features with strides 8, 16 and 32 (feature k has stride 2**k)."""

    def __init__(
        self, encoder_name: str, in_channels: int, classes: int, encoder_weights: str | None = None
    ) -> None:
        super().__init__()
        self.encoder = smp.encoders.get_encoder(
            encoder_name, in_channels=in_channels, depth=5, weights=encoder_weights
        )
        channels = self.encoder.out_channels
        self.heads = nn.ModuleList(nn.Conv2d(channels[i], classes, kernel_size=1) for i in self.STAGES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.encoder(x)
        size = x.shape[-2:]
        scores = [
            nn.functional.interpolate(head(features[i]), size=size, mode="bilinear", align_corners=False)
            for head, i in zip(self.heads, self.STAGES, strict=True)
        ]
        return torch.stack(scores).sum(dim=0)
