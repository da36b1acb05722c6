"""Full-tile inference: seconds per megapixel, and what windowing + blending cost beyond the forward passes.

FPN-ResNet50, 4 bands, a 1024 x 1024 tile, 256 px windows with overlap 0.5, batch 8.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import segmentation_models_pytorch as smp
import torch
from common import record

from aerialseg.inference import Settings, predict_probabilities
from aerialseg.windows import window_grid

TILE, WINDOW, OVERLAP, BATCH, ROUNDS = 1024, 256, 0.5, 8, 2


def seconds(run: Callable[[], None]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = smp.create_model("fpn", encoder_name="resnet50", encoder_weights=None, in_channels=4, classes=6)
    model = model.to(device).eval()
    image = np.random.default_rng(0).standard_normal((4, TILE, TILE)).astype(np.float32)
    windows = window_grid(TILE, TILE, WINDOW, OVERLAP)
    batch = torch.from_numpy(image[:, :WINDOW, :WINDOW]).to(device)[None].repeat(BATCH, 1, 1, 1)

    @torch.no_grad()
    def forward_passes() -> None:
        for first in range(0, len(windows), BATCH):
            n = len(windows[first : first + BATCH])
            torch.softmax(model(batch[:n]), dim=1).cpu()

    def whole_tile() -> None:
        settings = Settings(window=WINDOW, overlap=OVERLAP, batch_size=BATCH, precision="32", device=device)
        predict_probabilities(model, image, settings)

    # Alternate the two and keep each one's fastest round: a noisy machine slows single runs.
    forward_passes()  # warm-up
    forward_only, total = float("inf"), float("inf")
    for _ in range(ROUNDS):
        forward_only = min(forward_only, seconds(forward_passes))
        total = min(total, seconds(whole_tile))
    megapixels = TILE * TILE / 1e6
    record(
        f"inference_{device}",
        {
            "seconds_per_megapixel": {"value": round(total / megapixels, 3), "unit": "s/MP"},
            "forward_only_seconds_per_megapixel": {
                "value": round(forward_only / megapixels, 3),
                "unit": "s/MP",
            },
            "windowing_overhead": {
                "value": round(100 * (total - forward_only) / forward_only, 1),
                "unit": "%",
                "baseline": f"the same {len(windows)} forward passes + softmax, no windowing",
            },
        },
    )


if __name__ == "__main__":
    main()
