"""A torch Dataset over the HDF5 patches, with albumentations for training."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import albumentations as A
import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from aerialseg.config import SPECTRAL_BANDS
from aerialseg.patches import read_patch_info


def build_augmentation() -> A.Compose:
    """Flips and 90-degree rotations for all bands; photometric jitter for the spectral bands only.

    Height bands travel as the `heights` target, which albumentations treats like a mask:
    geometric transforms move it, pixel-level ones leave it alone (a brighter day does not
    make a building taller). Flips and right-angle rotations are exact, so no interpolation
    touches the heights.
    """
    return A.Compose(
        [
            A.HorizontalFlip(p=0.5),
            A.VerticalFlip(p=0.5),
            A.RandomRotate90(p=1.0),
            A.RandomBrightnessContrast(brightness_limit=0.1, contrast_limit=0.1, p=0.5),
            A.RandomGamma(gamma_limit=(85, 115), p=0.3),
        ],
        additional_targets={"heights": "mask"},
        # The spectral bands are reflectances in [0, 1], not 8-bit images.
        strict=False,
    )


class PatchDataset(Dataset[dict[str, torch.Tensor]]):
    """Patches of one HDF5 file as `{"image": (C, H, W) float32, "mask": (H, W) int64}` samples.

    The file is opened lazily in each worker process: h5py handles must not cross a fork.
    """

    def __init__(self, path: Path, *, augment: bool = False) -> None:
        self.path = Path(path)
        info = read_patch_info(self.path)
        self.length = info.length
        self.bands = info.bands
        self.mean = np.asarray(info.stats.mean, dtype=np.float32)[:, None, None]
        self.std = np.asarray(info.stats.std, dtype=np.float32)[:, None, None]
        self.spectral = [i for i, b in enumerate(self.bands) if b in SPECTRAL_BANDS]
        self.heights = [i for i, b in enumerate(self.bands) if b not in SPECTRAL_BANDS]
        self.augment = build_augmentation() if augment else None
        self._h5: h5py.File | None = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if self._pid != os.getpid():
            self._start_in_this_process()
        assert self._h5 is not None
        image = self._h5["image"][index]
        mask = self._h5["mask"][index]
        if self.augment is not None:
            image, mask = self._augment(image, mask)
        image = (image - self.mean) / self.std
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image)),
            "mask": torch.from_numpy(mask.astype(np.int64)),
        }

    def _start_in_this_process(self) -> None:
        """Open the file and seed the augmentation in each process that reads samples.

        A forked DataLoader worker inherits the parent's h5py handle (unsafe to share) and a copy
        of albumentations' random generator, so every worker would draw the same flips. torch
        gives each worker its own seed derived from the run's seed: use it.
        """
        self._h5 = h5py.File(self.path, "r")
        self._pid = os.getpid()
        if self.augment is not None:
            self.augment.set_random_seed(torch.initial_seed() % 2**32)

    def _augment(self, image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        assert self.augment is not None
        sample: dict[str, Any] = {"mask": mask}
        # albumentations wants channels last; an empty band group becomes a dummy that is dropped.
        spectral = (
            np.moveaxis(image[self.spectral], 0, -1)
            if self.spectral
            else np.zeros((*mask.shape, 1), np.float32)
        )
        sample["image"] = np.ascontiguousarray(spectral)
        heights = (
            np.moveaxis(image[self.heights], 0, -1)
            if self.heights
            else np.zeros((*mask.shape, 1), np.float32)
        )
        sample["heights"] = np.ascontiguousarray(heights)
        out = self.augment(**sample)
        result = np.empty(image.shape, dtype=np.float32)
        if self.spectral:
            result[self.spectral] = np.moveaxis(out["image"], -1, 0)
        if self.heights:
            result[self.heights] = np.moveaxis(out["heights"], -1, 0)
        return result, out["mask"]

    def __getstate__(self) -> dict[str, Any]:
        # Never pickle an open HDF5 handle into a DataLoader worker.
        state = self.__dict__.copy()
        state["_h5"] = None
        state["_pid"] = None
        return state
