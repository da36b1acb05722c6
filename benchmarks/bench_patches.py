"""Patch extraction: MB/s of a Potsdam-sized tile turned into overlapping HDF5 patches, and peak RSS.

Baseline in the same run: reading the same tile and writing it to HDF5 whole, without windows.
Each measurement runs in a fresh child process, so its peak resident memory is its own.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from common import record

from aerialseg.datasets.synthetic import area_georeference
from aerialseg.patches import BandStats, write_patches
from aerialseg.raster import read_raster, write_raster

SIDE = int(os.environ.get("BENCH_TILE_SIDE", "6000"))  # a Potsdam tile is 6000 x 6000
BANDS = ["ir", "r", "g", "dsm"]
SIZE, OVERLAP = 256, 0.5
ROWS_PER_WRITE = 500


def make_tile(root: Path) -> None:
    """A random 4-band float32 tile and its label, written in row blocks to keep this process small."""
    import rasterio
    from rasterio.windows import Window

    georef = area_georeference(1, SIDE)
    rng = np.random.default_rng(0)
    # A first small write fixes the file layout (profile, band names); then fill it by blocks.
    write_raster(root / "tile.tif", np.zeros((len(BANDS), SIDE, SIDE), np.float32), georef, band_names=BANDS)
    write_raster(root / "label.tif", np.zeros((1, SIDE, SIDE), np.uint8), georef)
    with rasterio.open(root / "tile.tif", "r+") as image, rasterio.open(root / "label.tif", "r+") as label:
        for row in range(0, SIDE, ROWS_PER_WRITE):
            rows = min(ROWS_PER_WRITE, SIDE - row)
            window = Window(0, row, SIDE, rows)
            image.write(rng.random((len(BANDS), rows, SIDE), dtype=np.float32), window=window)
            label.write(rng.integers(0, 6, (1, rows, SIDE), dtype=np.uint8), window=window)


def extract(root: Path) -> None:
    tiles = pd.DataFrame([{"tile": "bench", "image": "tile.tif", "label": "label.tif"}])
    stats = BandStats(tuple([0.5] * len(BANDS)), tuple([0.3] * len(BANDS)))
    write_patches(tiles, root, root / "patches.h5", size=SIZE, overlap=OVERLAP, stats=stats, bands=BANDS)


def whole(root: Path) -> None:
    import h5py

    image, _ = read_raster(root / "tile.tif")
    label, _ = read_raster(root / "label.tif")
    with h5py.File(root / "whole.h5", "w") as h5:
        h5.create_dataset("image", data=image)
        h5.create_dataset("label", data=label)


def child(task: str, root: Path) -> dict[str, float]:
    """Run `task` in a fresh interpreter: its seconds, and its peak RSS (MiB) above the
    interpreter with the libraries imported (torch and friends: several hundred MiB)."""
    out = subprocess.run([sys.executable, __file__, task, str(root)], check=True, capture_output=True)
    seconds, before_kib, after_kib = (float(v) for v in out.stdout.split()[-3:])
    return {"seconds": seconds, "peak_rss_mib": (after_kib - before_kib) / 1024}


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_tile(root)
        tile_mib = (len(BANDS) * 4 + 1) * SIDE * SIDE / 2**20
        baseline = child("whole", root)
        patches = child("extract", root)
        written_mib = (root / "patches.h5").stat().st_size / 2**20
    record(
        "patch_extraction",
        {
            "tile": {"value": f"{SIDE} x {SIDE}", "unit": "px", "bands": len(BANDS), "float32": True},
            "extraction_mb_per_s": {
                "value": round(tile_mib / patches["seconds"], 1),
                "unit": "MiB of tile/s",
                "hdf5_written_mib": round(written_mib),
                "patch": f"{SIZE} px, overlap {OVERLAP}",
            },
            "whole_tile_to_hdf5_mb_per_s": {
                "value": round(tile_mib / baseline["seconds"], 1),
                "unit": "MiB of tile/s",
                "baseline": "read the tile, write it whole",
            },
            "extraction_peak_rss_mib": {
                "value": round(patches["peak_rss_mib"]),
                "unit": "MiB",
                "baseline": f"the tile in memory: {round(tile_mib)} MiB; writing it whole: "
                f"{round(baseline['peak_rss_mib'])} MiB",
                "bound": "one tile + one batch of patches (patches.WRITE_BATCH)",
            },
        },
    )


if __name__ == "__main__":
    if len(sys.argv) == 3:
        # The resident size now (not the high-water mark, which import-time peaks may have set).
        before = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024
        start = time.perf_counter()
        {"extract": extract, "whole": whole}[sys.argv[1]](Path(sys.argv[2]))
        seconds = time.perf_counter() - start
        print(seconds, before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # KiB on Linux
    else:
        main()
