"""Training-step throughput: fp32 NCHW (naive) vs bf16 autocast + channels_last, and fp32 channels_last
to tell the two effects apart.

FPN-ResNet50, 256 px, batch 8, 4 bands, AdamW; forward, loss, backward and optimizer step.
"""

from __future__ import annotations

import os

import segmentation_models_pytorch as smp
import torch
from common import rate, record

SIZE, BATCH, BANDS, CLASSES = 256, 8, 4, 6
REPEATS = int(os.environ.get("BENCH_REPEATS", "2"))


def throughput(device: str, *, bf16: bool, channels_last: bool) -> float:
    torch.manual_seed(0)
    model = smp.create_model(
        "fpn", encoder_name="resnet50", encoder_weights=None, in_channels=BANDS, classes=CLASSES
    )
    model = model.to(device)
    x = torch.randn(BATCH, BANDS, SIZE, SIZE, device=device)
    y = torch.randint(0, CLASSES, (BATCH, SIZE, SIZE), device=device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters())

    def step() -> None:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return rate(step, BATCH, repeats=REPEATS)


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    naive = throughput(device, bf16=False, channels_last=False)
    fp32_cl = throughput(device, bf16=False, channels_last=True)
    fast = throughput(device, bf16=True, channels_last=True)
    record(
        f"training_step_{device}",
        {
            "fp32_nchw_patches_per_s": {"value": round(naive, 2), "unit": "patches/s"},
            "fp32_channels_last_patches_per_s": {"value": round(fp32_cl, 2), "unit": "patches/s"},
            "bf16_channels_last_patches_per_s": {"value": round(fast, 2), "unit": "patches/s"},
            "speedup": {"value": round(fast / naive, 2), "unit": "x", "baseline": "fp32 NCHW"},
        },
    )


if __name__ == "__main__":
    main()
