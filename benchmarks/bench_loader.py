"""Data loading: patches/s of the training loader (compact HDF5 patches, D4 augmentation, 0, 1 and
2 workers) beside the same arrays from memory, and the bytes a patch takes (compact vs float32).

The patches are the default pipeline's: 8 synthetic tiles of 512 px (`scenes`, `tiles`), 256 px
windows with overlap 0.5 (`patches`); for the loader the 5 training tiles are cut 6 times over
(270 patches), so that an epoch is long enough to time. The loader is the one training uses
(`datamodule.PatchData.train_dataloader`); the network's float input is made on the training
device by `data.Decode`, timed separately.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
import torch
from common import record
from torch.utils.data import DataLoader, TensorDataset

from aerialseg.config import DataConfig, SyntheticConfig, TrainConfig
from aerialseg.data import Decode, PatchDataset
from aerialseg.datamodule import PatchData
from aerialseg.datasets.isprs import build_tiles
from aerialseg.datasets.synthetic import write_vaihingen_layout
from aerialseg.datasets.tiles_table import read_tiles_table
from aerialseg.patches import (
    band_statistics,
    build_patches,
    read_patch_info,
    read_tile_file_info,
    write_patches,
)
from aerialseg.raster import read_raster
from aerialseg.windows import window_grid

SIZE, OVERLAP, BATCH, BANDS = 256, 0.5, 8, ["ir", "r", "g", "dsm"]
REPEAT = 6
"""The training tiles cut this many times over for the loader's file."""
EPOCHS = int(os.environ.get("BENCH_LOADER_EPOCHS", "3"))
"""Timed epochs, after one that starts the workers."""


def default_tiles(root: Path) -> Path:
    """The default pipeline's tiles (params.yaml: 8 synthetic areas of 512 px, val 6, test 7 and 8)."""
    write_vaihingen_layout(root / "raw", SyntheticConfig(tiles=8, size_px=512, seed=0))
    build_tiles(
        root / "raw", root / "tiles", DataConfig(bands=tuple(BANDS), val_tiles=("6",), test_tiles=("7", "8"))
    )  # type: ignore[arg-type]
    return root / "tiles"


def old_float32_bytes(tiles_dir: Path, out: Path) -> int:
    """The same windows in the format before the compact one (float32 bands, uncompressed, one
    patch a chunk, as `write_patches` wrote them until format_version 2): the file's bytes."""
    tiles = read_tiles_table(tiles_dir, "train")
    with h5py.File(out, "w") as h5:
        images, masks = [], []
        for row in tiles.itertuples():
            image, _ = read_raster(tiles_dir / str(row.image))
            label, _ = read_raster(tiles_dir / str(row.label))
            for w in window_grid(image.shape[1], image.shape[2], SIZE, OVERLAP):
                images.append(image[(slice(None), *w.slices)])
                masks.append(label[0][w.slices])
        h5.create_dataset("image", data=np.stack(images), chunks=(1, len(BANDS), SIZE, SIZE))
        h5.create_dataset("mask", data=np.stack(masks), chunks=(1, SIZE, SIZE))
    return out.stat().st_size


def patches_per_second(loader: DataLoader[Any], epochs: int = EPOCHS) -> float:
    """Patches/s over `epochs` passes, after one pass that starts the workers and warms the cache."""
    sampler = loader.sampler

    def one_pass(epoch: int) -> int:
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        return sum(
            len(next(iter(batch.values())) if isinstance(batch, dict) else batch[0]) for batch in loader
        )

    one_pass(0)
    start = time.perf_counter()
    seen = sum(one_pass(epoch) for epoch in range(1, epochs + 1))
    return seen / (time.perf_counter() - start)


def main() -> None:
    # One intra-op thread here, as in each loader worker (torch sets that): copying a batch is
    # single-threaded work, and OpenMP threads waiting on a shared 2-core machine made the
    # in-process figures swing fivefold between runs.
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tiles_dir = default_tiles(root)
        # Bytes: the default pipeline's train.h5 and val.h5, compact and as float32 before.
        summary = build_patches(tiles_dir, root / "patches", size=SIZE, overlap=OVERLAP, bands=BANDS)
        compact_bytes = summary.train_path.stat().st_size
        float32_bytes = old_float32_bytes(tiles_dir, root / "float32.h5")
        val_bytes = summary.val_path.stat().st_size
        val_float32 = sum(
            (len(BANDS) * 4 + 1) * int(t.height) * int(t.width)
            for t in read_tiles_table(tiles_dir, "val").itertuples()
        )

        # The loader's file: the training tiles cut REPEAT times over.
        train_tiles = read_tiles_table(tiles_dir, "train")
        stats = band_statistics([tiles_dir / name for name in train_tiles["image"]])
        loader_file = root / "loader" / "train.h5"
        write_patches(
            pd.concat([train_tiles] * REPEAT, ignore_index=True),
            tiles_dir,
            loader_file,
            size=SIZE,
            overlap=OVERLAP,
            stats=stats,
            bands=BANDS,
        )
        info = read_patch_info(loader_file)
        val_info = read_tile_file_info(summary.val_path)

        load_before = os.getloadavg()[0]
        rates: dict[int, float] = {}
        for workers in (0, 1, 2):
            cfg = TrainConfig(batch_size=BATCH, num_workers=workers, augment=True)
            loader = PatchData(info, val_info, cfg).train_dataloader()
            rates[workers] = patches_per_second(loader)
            del loader  # stops its workers

        # The same patches from memory, as packed rows (what a batch of the loader holds): no
        # HDF5, no augmentation. Through 2 workers: the ceiling that handing batches from worker
        # processes to the training process puts on any dataset here.
        packed = PatchDataset(loader_file)[list(range(info.length))]["packed"]
        memory = patches_per_second(DataLoader(TensorDataset(packed), batch_size=BATCH, shuffle=True))
        memory_workers = patches_per_second(
            DataLoader(
                TensorDataset(packed), batch_size=BATCH, shuffle=True, num_workers=2, persistent_workers=True
            )
        )

        # What the training device does per batch instead: float, scale, normalise (here the CPU).
        decode = Decode.from_info(info)
        batch = PatchDataset(loader_file, augment=True)[list(range(BATCH))]
        decode(batch)
        start, repeats = time.perf_counter(), 20
        for _ in range(repeats):
            decode(batch)
        decode_rate = BATCH * repeats / (time.perf_counter() - start)
        patch_bytes = int(batch["packed"].shape[1])

    record(
        "data_loading",
        {
            "hdf5_augmented_patches_per_s": {
                "value": round(rates[2], 1),
                "unit": "patches/s",
                "workers": 2,
                "goal": ">= 2000 (issue 11)",
                "patch": f"{SIZE} px, {len(BANDS)} bands, batch {BATCH}, D4 in the workers",
            },
            "load_average": {
                "value": round(max(load_before, os.getloadavg()[0]), 2),
                "unit": "runnable processes (1 min, the larger of before and after the loader runs)",
                "cores": os.cpu_count(),
                "why": "other processes on the cores slow every figure here",
            },
            "hdf5_augmented_1_worker_patches_per_s": {"value": round(rates[1], 1), "unit": "patches/s"},
            "hdf5_augmented_0_workers_patches_per_s": {
                "value": round(rates[0], 1),
                "unit": "patches/s",
                "baseline": "read in the training process",
            },
            "in_memory_patches_per_s": {"value": round(memory, 1), "unit": "patches/s"},
            "in_memory_2_workers_patches_per_s": {
                "value": round(memory_workers, 1),
                "unit": "patches/s",
                "baseline": "the same packed rows through 2 worker processes: the transfer ceiling",
            },
            "ratio": {"value": round(rates[2] / memory, 3), "unit": "x", "baseline": "in-memory packed rows"},
            "decode_on_device_patches_per_s": {
                "value": round(decode_rate, 1),
                "unit": "patches/s",
                "device": "cpu, 1 thread",
                "what": "data.Decode: compact batch -> normalised float32",
            },
            "handed_over_bytes_per_patch": {
                "value": patch_bytes,
                "unit": "B",
                "baseline": f"float32 image + int64 mask before: {SIZE * SIZE * (4 * len(BANDS) + 8)} B",
                "what": "one row of a packed batch (data.PatchLayout): image uint8, height int16, mask uint8",
            },
            "train_h5_bytes_per_patch": {
                "value": round(compact_bytes / summary.train_patches),
                "unit": "B",
                "baseline": f"float32 format: {round(float32_bytes / summary.train_patches)} B",
                "patches": summary.train_patches,
                "default pipeline": "8 synthetic tiles of 512 px, 256 px patches, overlap 0.5",
            },
            "train_h5_bytes_ratio": {
                "value": round(compact_bytes / float32_bytes, 3),
                "unit": "x",
                "baseline": "the same windows as float32 (the format before)",
                "goal": "<= 0.25",
            },
            "val_h5_bytes_ratio": {
                "value": round(val_bytes / val_float32, 3),
                "unit": "x",
                "baseline": "the val tile as float32 bands + uint8 reference",
            },
        },
    )


if __name__ == "__main__":
    main()
