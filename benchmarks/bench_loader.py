"""Data loading: patches/s from the HDF5 file with augmentation and 2 workers, vs an in-memory array."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch
from common import record
from torch.utils.data import DataLoader, TensorDataset

from aerialseg.classes import legend
from aerialseg.data import PatchDataset

COUNT, SIZE, BANDS, BATCH, WORKERS = 256, 256, 4, 8, 2


def write_patch_file(path: Path) -> np.ndarray:
    rng = np.random.default_rng(0)
    images = rng.random((COUNT, BANDS, SIZE, SIZE), dtype=np.float32)
    with h5py.File(path, "w") as h5:
        h5.create_dataset("image", data=images, chunks=(1, BANDS, SIZE, SIZE))
        h5.create_dataset(
            "mask",
            data=rng.integers(0, 6, (COUNT, SIZE, SIZE), dtype=np.uint8),
            chunks=(1, SIZE, SIZE),
        )
        h5.create_dataset("tile", data=np.zeros(COUNT, np.int32))
        h5.create_dataset("offset", data=np.zeros((COUNT, 2), np.int32))
        h5.attrs.update(
            size=SIZE,
            overlap=0.5,
            stride=SIZE // 2,
            bands='["ir", "r", "g", "dsm"]',
            classes=str(legend()),
            ignore_index=255,
            mean=np.full(BANDS, 0.5),
            std=np.full(BANDS, 0.3),
            tiles='["bench"]',
        )
    return images


def patches_per_second(loader: DataLoader) -> float:
    for _ in loader:  # first pass starts the workers and warms the page cache
        break
    start = time.perf_counter()
    seen = sum(len(batch["image"] if isinstance(batch, dict) else batch[0]) for batch in loader)
    return seen / (time.perf_counter() - start)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.h5"
        images = write_patch_file(path)
        hdf5 = DataLoader(
            PatchDataset(path, augment=True),
            batch_size=BATCH,
            shuffle=True,
            num_workers=WORKERS,
            persistent_workers=True,
        )
        memory = DataLoader(
            TensorDataset(torch.from_numpy(images)), batch_size=BATCH, shuffle=True, num_workers=0
        )
        # The ceiling that worker processes put on any dataset here: handing batches from the
        # workers to the training process (shared memory), measured on the in-memory array.
        memory_workers = DataLoader(
            TensorDataset(torch.from_numpy(images)),
            batch_size=BATCH,
            shuffle=True,
            num_workers=WORKERS,
            persistent_workers=True,
        )
        from_hdf5 = patches_per_second(hdf5)
        from_memory = patches_per_second(memory)
        from_memory_workers = patches_per_second(memory_workers)
    record(
        "data_loading",
        {
            "hdf5_augmented_patches_per_s": {
                "value": round(from_hdf5, 1),
                "unit": "patches/s",
                "workers": WORKERS,
            },
            "in_memory_patches_per_s": {"value": round(from_memory, 1), "unit": "patches/s"},
            "in_memory_2_workers_patches_per_s": {
                "value": round(from_memory_workers, 1),
                "unit": "patches/s",
                "baseline": "the same array through 2 worker processes: the transfer ceiling",
            },
            "ratio": {"value": round(from_hdf5 / from_memory, 3), "unit": "x", "baseline": "in-memory array"},
        },
    )


if __name__ == "__main__":
    main()
