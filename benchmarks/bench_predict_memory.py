"""`aerialseg predict` on a large GeoTIFF: peak memory and seconds per megapixel, vs the in-memory path.

Each measurement runs in a fresh process and reports its peak resident memory (VmHWM, reset just
before the prediction starts, so imports and the model are in the baseline but not the peak's
growth). Cases:

- `stream`, a 6000 x 6000 4-band float32 GeoTIFF (a Potsdam tile; 576 MB of pixels), predicted
  by `predict_file` with 256 px windows, overlap 0.5, batch 4, class map + probabilities + PNG
  preview. The network is a 1x1 convolution: on this 2-core CPU a real encoder would need ~30 min
  for the tile, and memory is what is measured. Its seconds per megapixel are the pipeline's own
  cost (reading, normalising, blending, argmax, compressing, writing), on top of the network's.
- `stream` and `in_memory` (read_raster + predict_probabilities + write_raster, as `evaluate`
  does) on a 2000 x 2000 raster, the same network: the baseline the issue asks for.
- `stream` and `in_memory` on a 512 x 512 raster with FPN-ResNet18: seconds per megapixel with a
  real (small) network, and the streaming path's time overhead.

Sizes can be changed: `python bench_predict_memory.py --large 3000` (a quick run).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import torch
from affine import Affine
from common import record
from rasterio.crs import CRS
from rasterio.windows import Window as RasterWindow
from torch import nn

from aerialseg.model import build_model, model_args
from aerialseg.model_card import ModelCard

BANDS, CLASSES, WINDOW, OVERLAP, BATCH = 4, 6, 256, 0.5, 4
LARGE, MEDIUM, REAL = 6000, 2000, 512


def make_raster(path: Path, size: int) -> None:
    """A smooth random 4-band float32 raster, written strip by strip (never whole in memory)."""
    profile = {
        "driver": "GTiff",
        "width": size,
        "height": size,
        "count": BANDS,
        "dtype": "float32",
        "crs": CRS.from_epsg(32633),
        "transform": Affine(0.05, 0, 368_000.0, 0, -0.05, 5_807_000.0),  # Potsdam's 5 cm grid
        "tiled": True,
        "blockxsize": 256,
        "blockysize": 256,
    }
    rng = np.random.default_rng(0)
    with rasterio.open(path, "w", **profile) as dst:
        for top in range(0, size, 512):
            rows = min(512, size - top)
            coarse = rng.uniform(0, 1, (BANDS, rows // 32 + 1, size // 32 + 1)).astype(np.float32)
            strip = coarse.repeat(32, axis=1).repeat(32, axis=2)[:, :rows, :size]
            dst.write(strip, window=RasterWindow(0, top, size, rows))


def network(kind: str) -> tuple[nn.Module, ModelCard]:
    torch.manual_seed(0)
    if kind == "fpn-resnet18":
        args = model_args("fpn", "resnet18", BANDS, CLASSES)
        model = build_model(args)
    else:  # 1x1 convolution
        args = {"arch": "conv1x1"}
        model = nn.Conv2d(BANDS, CLASSES, kernel_size=1)
    card = ModelCard.for_training(
        args, bands=["ir", "r", "g", "dsm"], mean=(0.5,) * BANDS, std=(0.3,) * BANDS, window=WINDOW
    )
    return model.eval(), card


def _status(key: str) -> int:
    """A VmXXX line of /proc/self/status, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def run_case(case: str, raster: Path, kind: str, out: Path) -> dict[str, Any]:
    """One measurement, in this (fresh) process."""
    from aerialseg.inference import Settings, predict_probabilities
    from aerialseg.predict import PredictOptions, predict_file
    from aerialseg.raster import read_raster, write_raster

    model, card = network(kind)
    with torch.no_grad():  # warm-up: first-call allocations belong to the baseline
        model(torch.zeros(BATCH, BANDS, WINDOW, WINDOW))
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _status("VmRSS")
    start = time.perf_counter()
    if case == "stream":
        engine = Settings(window=WINDOW, overlap=OVERLAP, batch_size=BATCH, precision="32")
        options = PredictOptions(engine=engine, probabilities=True, preview=True, progress=False)
        predict_file(model, card, raster, out, options)
    else:
        image, georef = read_raster(raster)
        engine = Settings(window=WINDOW, overlap=OVERLAP, batch_size=BATCH, precision="32")
        probs = predict_probabilities(model, card.normalise(image), engine)
        write_raster(out / "in_memory.tif", probs.argmax(axis=0).astype(np.uint8), georef, colormap=True)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_rss": _status("VmHWM"), "rss_before": before}


def measure(case: str, raster: Path, kind: str, size: int, tmp: Path) -> dict[str, Any]:
    out = tmp / f"out-{case}-{kind}-{size}"
    out.mkdir()
    proc = subprocess.run(
        [
            sys.executable,
            __file__,
            "--case",
            case,
            "--raster",
            str(raster),
            "--kind",
            kind,
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode:
        raise RuntimeError(f"{case} {kind} {size}: failed\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    result["megapixels"] = size * size / 1e6
    mb = 1024 * 1024
    peak, before = result["peak_rss"] / mb, result["rss_before"] / mb
    print(
        f"{case:9s} {kind:13s} {size:5d} px: {result['seconds']:7.1f} s, "
        f"{result['seconds'] / result['megapixels']:6.2f} s/MP, "
        f"peak RSS {peak:7.0f} MB (+{peak - before:.0f} MB over {before:.0f} MB)",
        flush=True,
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--large", type=int, default=LARGE)
    parser.add_argument("--case", choices=["stream", "in_memory"])
    parser.add_argument("--raster", type=Path)
    parser.add_argument("--kind", default="conv1x1")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.case:  # a child process: one measurement, as JSON on the last line
        print(json.dumps(run_case(args.case, args.raster, args.kind, args.out)))
        return

    mb = 1024 * 1024
    with tempfile.TemporaryDirectory(prefix="bench-predict-") as name:
        tmp = Path(name)
        rasters = {}
        for size in (args.large, MEDIUM, REAL):
            rasters[size] = tmp / f"{size}.tif"
            make_raster(rasters[size], size)
        large = measure("stream", rasters[args.large], "conv1x1", args.large, tmp)
        medium = measure("stream", rasters[MEDIUM], "conv1x1", MEDIUM, tmp)
        medium_mem = measure("in_memory", rasters[MEDIUM], "conv1x1", MEDIUM, tmp)
        real = measure("stream", rasters[REAL], "fpn-resnet18", REAL, tmp)
        real_mem = measure("in_memory", rasters[REAL], "fpn-resnet18", REAL, tmp)

    def growth(result: dict[str, Any]) -> float:
        return (result["peak_rss"] - result["rss_before"]) / mb

    # The in-memory path grows with the pixel count; extrapolated to the large raster from MEDIUM.
    per_pixel = growth(medium_mem) * mb / (MEDIUM * MEDIUM)
    extrapolated = per_pixel * args.large * args.large / mb
    record(
        f"predict_memory_{'cuda' if torch.cuda.is_available() else 'cpu'}",
        {
            f"peak_rss_growth_stream_{args.large}px": {
                "value": round(growth(large)),
                "unit": "MB",
                "baseline": f"in-memory path, extrapolated from {MEDIUM} px: {extrapolated:.0f} MB "
                f"({per_pixel:.0f} bytes/px); input {BANDS * 4 * args.large**2 / mb:.0f} MB float32",
            },
            f"peak_rss_stream_{args.large}px": {
                "value": round(large["peak_rss"] / mb),
                "unit": "MB",
                "baseline": f"{large['rss_before'] / mb:.0f} MB before predicting (imports, model)",
            },
            f"peak_rss_growth_stream_{MEDIUM}px": {
                "value": round(growth(medium)),
                "unit": "MB",
                "baseline": f"in-memory path (read_raster + predict_probabilities): "
                f"{growth(medium_mem):.0f} MB",
            },
            f"seconds_per_megapixel_stream_{args.large}px_conv1x1": {
                "value": round(large["seconds"] / large["megapixels"], 3),
                "unit": "s/MP",
                "baseline": f"in-memory path at {MEDIUM} px: "
                f"{medium_mem['seconds'] / medium_mem['megapixels']:.3f} s/MP (1x1 conv: pipeline cost)",
            },
            f"seconds_per_megapixel_stream_{REAL}px_fpn_resnet18": {
                "value": round(real["seconds"] / real["megapixels"], 2),
                "unit": "s/MP",
                "baseline": f"in-memory path: {real_mem['seconds'] / real_mem['megapixels']:.2f} s/MP",
            },
        },
    )


if __name__ == "__main__":
    main()
