"""predict's GIS outputs on a Potsdam-sized class map: `--vector` (polygons in a GeoPackage) and
`--cog` (Cloud Optimized GeoTIFF), seconds and peak memory, against baselines in the same run.

The class map is 6000 x 6000 px (a Potsdam tile at 5 cm): a generated scene's label map tiled,
written as predict writes it (palette, nodata 255, 256 px tiles). Each case runs in a fresh
process and reports its peak resident memory (VmHWM, reset just before the case starts):

- `read`: the class map read whole (36 MB of uint8): the memory baseline for `vector`;
- `vector`: vectors.write_class_polygons, the class map as polygons;
- `plain`: the class map written once more by raster.write_raster: the time baseline for `cog`;
- `cog`: raster.to_cog of the written class map.

`python bench_gis_outputs.py --size 3000` is a quick run.
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
from affine import Affine
from common import record
from rasterio.crs import CRS

SIZE = 6000
CASES = ("read", "vector", "plain", "cog")


def _status(key: str) -> int:
    """A VmXXX line of /proc/self/status, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def make_class_map(path: Path, size: int) -> None:
    from aerialseg.classes import CLASS_NAMES, IGNORE_INDEX
    from aerialseg.datasets.synthetic import generate_scene
    from aerialseg.raster import GeoReference, write_raster

    label = generate_scene(512, np.random.default_rng(0)).label.astype(np.uint8)
    reps = -(-size // 512)
    classes = np.tile(label, (reps, reps))[:size, :size].copy()
    classes[:64] = IGNORE_INDEX  # a nodata strip, as an input's edge gives
    assert int(classes[64:].max()) < len(CLASS_NAMES)
    georef = GeoReference(CRS.from_epsg(32633), Affine(0.05, 0, 368_000.0, 0, -0.05, 5_807_000.0))
    write_raster(path, classes, georef, colormap=True, nodata=IGNORE_INDEX)


def run_case(case: str, class_map: Path, out: Path) -> dict[str, Any]:
    """One measurement, in this (fresh) process."""
    import rasterio

    from aerialseg.classes import CLASS_NAMES
    from aerialseg.raster import GeoReference, to_cog, write_raster
    from aerialseg.vectors import write_class_polygons

    figures: dict[str, Any] = {}
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _status("VmRSS")
    start = time.perf_counter()
    if case == "read":
        with rasterio.open(class_map) as src:
            src.read(1)
    elif case == "vector":
        counts = write_class_polygons(class_map, out / "map.gpkg", CLASS_NAMES)
        figures["polygons"] = sum(counts.values())
    elif case == "plain":
        with rasterio.open(class_map) as src:
            classes, georef = src.read(1), GeoReference.of(src)
        start = time.perf_counter()  # the write alone
        write_raster(out / "plain.tif", classes, georef, colormap=True, nodata=255)
    else:
        to_cog(class_map, out / "cog.tif", overview_resampling="mode")
    figures.update(seconds=time.perf_counter() - start, peak_rss=_status("VmHWM"), rss_before=before)
    return figures


def measure(case: str, class_map: Path, tmp: Path) -> dict[str, Any]:
    out = tmp / f"out-{case}"
    out.mkdir()
    args = [sys.executable, __file__, "--case", case, "--class-map", str(class_map), "--out", str(out)]
    proc = subprocess.run(args, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"{case}: failed\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    result["growth_mb"] = (result["peak_rss"] - result["rss_before"]) / 2**20
    print(f"{case:7s}: {result['seconds']:6.1f} s, peak RSS +{result['growth_mb']:.0f} MB", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=SIZE)
    parser.add_argument("--case", choices=CASES)
    parser.add_argument("--class-map", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.case:  # a child process: one measurement, as JSON on the last line
        print(json.dumps(run_case(args.case, args.class_map, args.out)))
        return
    with tempfile.TemporaryDirectory(prefix="bench-gis-") as name:
        tmp = Path(name)
        class_map = tmp / "map.tif"
        make_class_map(class_map, args.size)
        r = {case: measure(case, class_map, tmp) for case in CASES}
    px = f"{args.size}px"
    record(
        "gis_outputs",
        {
            f"vector_peak_rss_growth_{px}": {
                "value": round(r["vector"]["growth_mb"]),
                "unit": "MB",
                "baseline": f"reading the class map whole: {r['read']['growth_mb']:.0f} MB "
                f"({r['vector']['polygons']} polygons)",
            },
            f"vector_seconds_{px}": {
                "value": round(r["vector"]["seconds"], 2),
                "unit": "s",
                "baseline": f"writing the class map: {r['plain']['seconds']:.2f} s",
            },
            f"cog_seconds_{px}": {
                "value": round(r["cog"]["seconds"], 2),
                "unit": "s",
                "baseline": f"writing the class map: {r['plain']['seconds']:.2f} s",
            },
            f"cog_peak_rss_growth_{px}": {
                "value": round(r["cog"]["growth_mb"]),
                "unit": "MB",
                "baseline": f"reading the class map whole: {r['read']['growth_mb']:.0f} MB",
            },
        },
    )


if __name__ == "__main__":
    main()
