"""Torch datasets over the HDF5 files of the `patches` stage: training patches (with
albumentations) and whole validation tiles."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import albumentations as A
import h5py
import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from aerialseg.config import SPECTRAL_BANDS
from aerialseg.patches import (
    h5_dataset,
    h5_read_error,
    open_h5,
    open_h5_file,
    read_patch_info,
    read_tile_file_info,
)


def build_augmentation() -> A.Compose:
    """One of the eight flips/right-angle rotations (D4) for all bands and the mask, per sample.

    D4 moves pixels exactly, so no interpolation touches heights or labels. Photometric jitter is
    not done here but on the batch, on the device (SpectralJitter): on float images it costs
    albumentations ~3 ms a patch, more than reading the patch, and the loader must keep up with
    a GPU.
    """
    return A.Compose([A.D4(p=1.0)], strict=False)


class SpectralJitter(nn.Module):
    """Per-sample brightness/contrast and gamma jitter of the spectral bands of a normalised batch.

    The albumentations recipe (RandomBrightnessContrast 0.1/0.1 with p=0.5, RandomGamma 0.85-1.15
    with p=0.3) applied to reflectances, i.e. after undoing the normalisation, on the whole batch
    at once. Height bands are left alone: a brighter day does not make a building taller. Draws
    from torch's generator of the batch's device.
    """

    def __init__(
        self,
        bands: list[str],
        mean: tuple[float, ...],
        std: tuple[float, ...],
        *,
        brightness: float = 0.1,
        contrast: float = 0.1,
        p_brightness_contrast: float = 0.5,
        gamma: tuple[float, float] = (0.85, 1.15),
        p_gamma: float = 0.3,
    ) -> None:
        super().__init__()
        self.spectral = [i for i, b in enumerate(bands) if b in SPECTRAL_BANDS]
        shape = (1, len(self.spectral), 1, 1)
        # Not persistent: they come from the patch file, not from training.
        self.mean: torch.Tensor
        self.std: torch.Tensor
        self.register_buffer("mean", torch.tensor([mean[i] for i in self.spectral]).view(shape), False)
        self.register_buffer("std", torch.tensor([std[i] for i in self.spectral]).view(shape), False)
        self.brightness, self.contrast, self.p_bc = brightness, contrast, p_brightness_contrast
        self.gamma, self.p_gamma = gamma, p_gamma

    @torch.no_grad()
    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if not self.spectral:
            return image
        n = image.shape[0]

        def uniform(low: float, high: float) -> torch.Tensor:
            return low + (high - low) * torch.rand(n, 1, 1, 1, device=image.device)

        def chosen(p: float) -> torch.Tensor:
            return torch.rand(n, 1, 1, 1, device=image.device) < p

        spectral = image[:, self.spectral].float() * self.std + self.mean
        jittered = spectral * uniform(1 - self.contrast, 1 + self.contrast) + uniform(
            -self.brightness, self.brightness
        )
        spectral = torch.where(chosen(self.p_bc), jittered, spectral)
        gamma = spectral.clamp_min(0) ** uniform(*self.gamma)
        spectral = torch.where(chosen(self.p_gamma), gamma, spectral)
        out = image.clone()
        out[:, self.spectral] = ((spectral - self.mean) / self.std).to(image.dtype)
        return out


def derived_seed(seed: int, *where: int) -> int:
    """A seed that depends only on the run's `seed` and a position in training: (epoch, patch) for
    a patch's augmentation, (epoch, rank[, batch]) for `datamodule.RandomStreams`."""
    return int(np.random.SeedSequence([seed, *where]).generate_state(1)[0])


class PatchDataset(Dataset[dict[str, torch.Tensor]]):
    """Patches of one HDF5 file as `{"image": (C, H, W) float32, "mask": (H, W) int64}` samples.

    The file is opened lazily in each worker process: h5py handles must not cross a fork.

    An index is a patch number, or an `(epoch, patch)` pair (what `datamodule.EpochShards`
    yields): a pair's augmentation is drawn from (seed, epoch, patch) alone, so a sample is the
    same whichever worker reads it, however long that worker has lived, and in a resumed run. A
    plain number draws from the process's own stream (seeded per worker).
    """

    def __init__(self, path: Path, *, augment: bool = False, seed: int = 0) -> None:
        self.path = Path(path)
        self.seed = seed
        info = read_patch_info(self.path)
        self.length = info.length
        self.bands = info.bands
        self.mean = np.asarray(info.stats.mean, dtype=np.float32)[:, None, None]
        self.std = np.asarray(info.stats.std, dtype=np.float32)[:, None, None]
        self.augment = build_augmentation() if augment else None
        self._h5: h5py.File | None = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        epoch, index = index if isinstance(index, tuple) else (None, index)
        if self._pid != os.getpid():
            self._start_in_this_process()
        assert self._h5 is not None
        try:
            image = h5_dataset(self._h5, "image")[index]
            mask = h5_dataset(self._h5, "mask")[index]
        except OSError as err:
            raise h5_read_error(self.path, err, f"patch {index}") from err
        if self.augment is not None:
            if epoch is not None:
                self.augment.set_random_seed(derived_seed(self.seed, epoch, index))
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
        self._h5 = open_h5_file(self.path)
        self._pid = os.getpid()
        if self.augment is not None:
            self.augment.set_random_seed(torch.initial_seed() % 2**32)

    def _augment(self, image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        assert self.augment is not None
        # albumentations wants channels last.
        out = self.augment(image=np.ascontiguousarray(np.moveaxis(image, 0, -1)), mask=mask)
        return np.moveaxis(out["image"], -1, 0), out["mask"]

    def __getstate__(self) -> dict[str, Any]:
        # Never pickle an open HDF5 handle into a DataLoader worker.
        state = self.__dict__.copy()
        state["_h5"] = None
        state["_pid"] = None
        return state


class ValidationTiles(Dataset[dict[str, Any]]):
    """The whole validation tiles of a `val.h5`: `{"tile": id, "image": (C, H, W) float32
    normalised, "reference": (H, W) uint8 eroded reference, 255 not scored}` as numpy arrays.

    Index -1 is an empty item (`{"tile": None}`): `TileShards` gives it to a DDP rank that has
    no tile left, so that every rank runs the same number of validation steps.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        info = read_tile_file_info(self.path)
        self.tiles = info.tiles
        self.mean = np.asarray(info.stats.mean, dtype=np.float32)[:, None, None]
        self.std = np.asarray(info.stats.std, dtype=np.float32)[:, None, None]

    def __len__(self) -> int:
        return len(self.tiles)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index < 0:
            return {"tile": None}
        tile = self.tiles[index]
        # Opened per item: a handful of whole tiles per epoch, never shared across processes.
        with open_h5(self.path) as h5:
            image = h5_dataset(h5, f"tiles/{tile}/image")[:]
            reference = h5_dataset(h5, f"tiles/{tile}/reference")[:]
        return {"tile": tile, "image": (image - self.mean) / self.std, "reference": reference}
