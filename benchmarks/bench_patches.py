"""Patch extraction at Potsdam size: a 6000 x 6000, 5-band tile (ir r g dsm ndsm) turned into
overlapping 512 px patches (overlap 0.5, the benchmark-potsdam preset's): MB/s, peak RSS, and the
bytes of the compact format against the same windows in float32; then what each HDF5 filter
costs to read (the choice of `patches.COMPRESSION`).

Baseline in the same run: reading the same tile and writing it to HDF5 whole, without windows.
Each extraction runs in a fresh child process, so its peak resident memory is its own.

The tile is image-like, so that compression means something: a 1000 px synthetic scene
(`datasets.synthetic`, as the `tiles` stage stores it: reflectance v / 255, the DSM above its 1st
percentile in metres) repeated 6 x 6 with flips; the ndsm band is a stand-in with the DSM's texture
(height above its 10th percentile, clipped at 0), not the ground filter's output.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import hdf5plugin
import numpy as np
import pandas as pd
from common import record

from aerialseg.datasets.synthetic import area_georeference, generate_scene
from aerialseg.patches import BandStats, write_patches
from aerialseg.raster import read_raster, write_raster
from aerialseg.windows import window_grid

SIDE = int(os.environ.get("BENCH_TILE_SIDE", "6000"))  # a Potsdam tile is 6000 x 6000
SCENE = 1000
BANDS = ["ir", "r", "g", "dsm", "ndsm"]
SIZE, OVERLAP = 512, 0.5
FILTER_PATCHES = 48
"""Patches written with each filter to compare their read speed."""

FILTERS = {
    "none": {},
    "gzip level 1 + shuffle": {"compression": "gzip", "compression_opts": 1, "shuffle": True},
    "lzf + shuffle": {"compression": "lzf", "shuffle": True},
    "blosc lz4 5 + byte shuffle (chosen)": dict(hdf5plugin.Blosc("lz4", 5, hdf5plugin.Blosc.SHUFFLE)),
    "blosc zstd 1 + byte shuffle": dict(hdf5plugin.Blosc("zstd", 1, hdf5plugin.Blosc.SHUFFLE)),
}


def scene_bands() -> tuple[np.ndarray, np.ndarray]:
    """(5, SCENE, SCENE) float32 tile values and the (SCENE, SCENE) uint8 label of one scene."""
    scene = generate_scene(SCENE, np.random.default_rng([0, 1]))
    dsm = scene.dsm - np.percentile(scene.dsm, 1.0)
    ndsm = np.maximum(scene.dsm - np.percentile(scene.dsm, 10.0), 0.0)
    image = np.concatenate([scene.irrg.astype(np.float32) / 255.0, dsm[None], ndsm[None]]).astype(np.float32)
    return image, scene.label


def make_tile(root: Path) -> None:
    """The SIDE x SIDE tile, a mosaic of one scene and its flips, written in row blocks."""
    import rasterio
    from rasterio.windows import Window

    image, label = scene_bands()
    georef = area_georeference(1, SIDE)
    # A first small write fixes the file layout (profile, band names); then fill it by blocks.
    write_raster(root / "tile.tif", np.zeros((len(BANDS), SIDE, SIDE), np.float32), georef, band_names=BANDS)
    write_raster(root / "label.tif", np.zeros((1, SIDE, SIDE), np.uint8), georef)
    with rasterio.open(root / "tile.tif", "r+") as tile, rasterio.open(root / "label.tif", "r+") as labels:
        for i, row in enumerate(range(0, SIDE, SCENE)):
            for j, col in enumerate(range(0, SIDE, SCENE)):
                rows, cols = min(SCENE, SIDE - row), min(SCENE, SIDE - col)
                flip = (slice(None, None, -1 if i % 2 else 1), slice(None, None, -1 if j % 2 else 1))
                window = Window(col, row, cols, rows)
                tile.write(image[(slice(None), *flip)][:, :rows, :cols], window=window)
                labels.write(label[flip][None, :rows, :cols], window=window)


def extract(root: Path) -> None:
    tiles = pd.DataFrame([{"tile": "bench", "image": "tile.tif", "label": "label.tif"}])
    stats = BandStats(tuple([0.5] * len(BANDS)), tuple([0.3] * len(BANDS)))
    write_patches(tiles, root, root / "patches.h5", size=SIZE, overlap=OVERLAP, stats=stats, bands=BANDS)


def whole(root: Path) -> None:
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


def filter_costs(root: Path) -> dict[str, dict[str, float]]:
    """Bytes (against float32) and random-order read time of FILTER_PATCHES compact patches of the
    tile (image uint8, height int16, mask uint8 as `write_patches` stores them), per filter."""
    with h5py.File(root / "patches.h5", "r") as h5:
        picks = np.linspace(0, h5["mask"].shape[0] - 1, FILTER_PATCHES).round().astype(int)
        arrays = {name: h5[name][np.unique(picks)] for name in ("image", "height", "mask")}
    count = len(arrays["mask"])
    float32 = count * (len(BANDS) * 4 + 1) * SIZE * SIZE
    order = np.random.default_rng(0).permutation(count)
    costs = {}
    for name, options in FILTERS.items():
        path = root / "filter.h5"
        with h5py.File(path, "w") as h5:
            for key, values in arrays.items():
                h5.create_dataset(key, data=values, chunks=(1, *values.shape[1:]), **options)
        size = path.stat().st_size
        with h5py.File(path, "r") as h5:
            datasets = [h5[key] for key in arrays]
            for ds in datasets:  # warm: the page cache, HDF5's metadata
                ds[0]
            start = time.perf_counter()
            for _ in range(3):
                for i in order:
                    for ds in datasets:
                        ds[i]
            seconds = (time.perf_counter() - start) / (3 * count)
        costs[name] = {"bytes_ratio": round(size / float32, 3), "read_ms_per_patch": round(seconds * 1e3, 3)}
        path.unlink()
    return costs


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_tile(root)
        tile_mib = (len(BANDS) * 4 + 1) * SIDE * SIDE / 2**20
        baseline = child("whole", root)
        patches = child("extract", root)
        written = (root / "patches.h5").stat().st_size
        with h5py.File(root / "patches.h5", "r") as h5:
            count = int(h5["mask"].shape[0])
        assert count == len(window_grid(SIDE, SIDE, SIZE, OVERLAP))
        float32 = count * (len(BANDS) * 4 + 1) * SIZE * SIZE
        filters = filter_costs(root)
    record(
        "patch_extraction",
        {
            "tile": {
                "value": f"{SIDE} x {SIDE}",
                "unit": "px",
                "bands": ",".join(BANDS),
                "content": f"a {SCENE} px synthetic scene, mosaicked",
            },
            "extraction_mb_per_s": {
                "value": round(tile_mib / patches["seconds"], 1),
                "unit": "MiB of float32 tile/s",
                "hdf5_written_mib": round(written / 2**20),
                "patch": f"{SIZE} px, overlap {OVERLAP}, {count} patches",
            },
            "whole_tile_to_hdf5_mb_per_s": {
                "value": round(tile_mib / baseline["seconds"], 1),
                "unit": "MiB of tile/s",
                "baseline": "read the tile, write it whole (float32, uncompressed)",
            },
            "extraction_peak_rss_mib": {
                "value": round(patches["peak_rss_mib"]),
                "unit": "MiB",
                "baseline": f"the tile in memory: {round(tile_mib)} MiB; writing it whole: "
                f"{round(baseline['peak_rss_mib'])} MiB",
                "bound": "one float32 tile + its compact copy + one batch of patches (patches.WRITE_BATCH)",
            },
            "patch_bytes_ratio": {
                "value": round(written / float32, 3),
                "unit": "x",
                "baseline": f"the same {count} windows in float32 (the format before): "
                f"{round(float32 / 2**20)} MiB",
                "goal": "<= 0.25 (issue 11)",
            },
            "filters": {
                "value": filters["blosc lz4 5 + byte shuffle (chosen)"]["read_ms_per_patch"],
                "unit": "ms to read a compact patch (chosen filter)",
                "baseline": filters,
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
