"""Torch datasets over the HDF5 files of the `patches` stage: training patches (compact, with
D4 augmentation) and whole validation tiles; `Decode` and `SpectralJitter`, which finish a training
batch on the training device."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import h5py
import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, get_worker_info

from aerialseg.config import SPECTRAL_BANDS
from aerialseg.patches import (
    STORED_DATASETS,
    BandCoding,
    PatchFileInfo,
    h5_dataset,
    h5_read_error,
    open_h5_file,
    read_patch_info,
    read_tile_file_info,
    read_validation_tile,
)

SYMMETRIES = 8
"""The flips and right-angle rotations of a square (the dihedral group D4)."""
SYMMETRY_STREAM = 2**40 + 0xD4
"""derived_seed(seed, epoch, SYMMETRY_STREAM) draws an epoch's symmetries: a position no
`datamodule.RandomStreams` stream (epoch, rank[, batch]) takes."""


def d4(array: np.ndarray, symmetry: int) -> np.ndarray:
    """Symmetry `symmetry` (0-7) of the square on the last two axes: a rotation by `symmetry % 4`
    right angles counterclockwise (np.rot90), then, for 4-7, a left-right flip. A view; 0 is the
    identity. Pixels move exactly: no interpolation touches heights or labels."""
    turned = np.rot90(array, symmetry % 4, axes=(-2, -1))
    return turned[..., ::-1] if symmetry >= 4 else turned


_CV2_ROTATIONS = {1: cv2.ROTATE_90_COUNTERCLOCKWISE, 2: cv2.ROTATE_180, 3: cv2.ROTATE_90_CLOCKWISE}


def d4_into(array: np.ndarray, symmetry: int, out: np.ndarray) -> None:
    """`out[...] = d4(array, symmetry)` for (..., H, W) arrays (out C-contiguous), plane by plane
    with OpenCV: a strided numpy copy of a rotated uint8 patch took ~0.5 ms, OpenCV's ~0.04 ms,
    and albumentations' D4 adds a Compose call and channels-last copies on top (measured for
    `benchmarks/bench_loader.py`)."""
    if symmetry == 0:
        np.copyto(out, array)
        return
    planes = array.reshape(-1, *array.shape[-2:])
    targets = out.reshape(-1, *out.shape[-2:])
    for plane, target in zip(planes, targets, strict=True):
        if symmetry < 4:
            cv2.rotate(plane, _CV2_ROTATIONS[symmetry], dst=target)
        elif symmetry == 4:
            cv2.flip(plane, 1, dst=target)  # left-right
        elif symmetry == 5:
            cv2.flip(cv2.transpose(plane), -1, dst=target)  # the anti-diagonal
        elif symmetry == 6:
            cv2.flip(plane, 0, dst=target)  # up-down
        else:
            cv2.transpose(plane, dst=target)


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


@dataclass(frozen=True)
class PatchLayout:
    """Where a patch's arrays lie in one row of a packed batch (`PatchDataset` with a list of
    indices): `image` (S, size, size) uint8, `height` (Hc, size, size) int16, `mask` (size, size)
    uint8, one after the other, each at a multiple of ALIGN bytes.

    One block of bytes per batch because a DataLoader worker hands each tensor over through its
    own file descriptor, a round trip between the processes that cost ~1-3 ms on this 2-core
    machine: three tensors a batch cost more than reading the batch."""

    image: int
    height: int
    size: int

    ALIGN = 64

    @classmethod
    def of(cls, codings: Sequence[BandCoding], size: int) -> PatchLayout:
        image, height = (sum(c.dataset == name for c in codings) for name in STORED_DATASETS)
        return cls(image, height, size)

    def parts(self) -> list[tuple[str, torch.dtype, tuple[int, ...], int, int]]:
        """(key, dtype, shape of one patch, byte offset in the row, bytes) of each array."""
        side = (self.size, self.size)
        arrays: list[tuple[str, torch.dtype, tuple[int, ...]]] = [
            ("image", torch.uint8, (self.image, *side)),
            ("height", torch.int16, (self.height, *side)),
            ("mask", torch.uint8, side),
        ]
        parts, offset = [], 0
        for key, dtype, shape in arrays:
            nbytes = math.prod(shape) * dtype.itemsize
            parts.append((key, dtype, shape, offset, nbytes))
            offset += -(-nbytes // self.ALIGN) * self.ALIGN
        return parts

    @property
    def row_bytes(self) -> int:
        *_, offset, nbytes = self.parts()[-1]
        return offset + -(-nbytes // self.ALIGN) * self.ALIGN

    def unpack(self, packed: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, row_bytes) uint8 -> `{"image": (B, S, H, W) uint8, "height": (B, Hc, H, W) int16,
        "mask": (B, H, W) uint8}`, views of `packed` (on whatever device it is)."""
        n = packed.shape[0]
        return {
            key: packed[:, offset : offset + nbytes].view(dtype).view(n, *shape)
            for key, dtype, shape, offset, nbytes in self.parts()
        }


class Decode(nn.Module):
    """A compact training batch (`PatchDataset`) -> the network's input: `(B, C, H, W)` float32,
    bands in the file's order, normalised with the file's statistics.

    Per band: (stored * scale + offset - mean) / std, i.e. one multiply-add, stored * gain + bias,
    on the training device (so that the loader hands over 1-2 bytes a value instead of 4, and the
    workers do no arithmetic). `scale`/`offset` are the band's storage (`patches.BandCoding`),
    `mean`/`std` the training tiles' statistics in tile units (`patches.band_statistics`).
    """

    def __init__(
        self,
        codings: Sequence[BandCoding],
        mean: Sequence[float],
        std: Sequence[float],
        layout: PatchLayout | None = None,
    ) -> None:
        super().__init__()
        self.layout = layout
        counts = [sum(c.dataset == name for c in codings) for name in STORED_DATASETS]
        first = dict(zip(STORED_DATASETS, np.cumsum([0, *counts[:-1]]).tolist(), strict=True))
        # Channel of each band in the batch's datasets concatenated (image first, then height).
        order = [first[c.dataset] + c.channel for c in codings]
        shape = (1, len(codings), 1, 1)
        gain = [c.scale / s for c, s in zip(codings, std, strict=True)]
        bias = [(c.offset - m) / s for c, m, s in zip(codings, mean, std, strict=True)]
        self.datasets = [name for name in STORED_DATASETS if any(c.dataset == name for c in codings)]
        self.reorder = order != list(range(len(order)))
        # Not persistent: they come from the patch file, not from training.
        self.order: torch.Tensor
        self.gain: torch.Tensor
        self.bias: torch.Tensor
        self.register_buffer("order", torch.tensor(order), False)
        self.register_buffer("gain", torch.tensor(gain, dtype=torch.float32).view(shape), False)
        self.register_buffer("bias", torch.tensor(bias, dtype=torch.float32).view(shape), False)

    @classmethod
    def from_info(cls, info: PatchFileInfo) -> Decode:
        return cls(info.codings, info.stats.mean, info.stats.std, PatchLayout.of(info.codings, info.size))

    @torch.no_grad()
    def forward(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """`batch`: the dict of compact arrays, or `{"packed": (B, row_bytes) uint8}` (a batch as
        `PatchDataset` hands it over, unpacked with `layout`). Returns the normalised float32
        (B, C, H, W) image and the (B, H, W) int64 mask."""
        arrays = batch
        if "packed" in batch:
            assert self.layout is not None, "a packed batch needs the PatchLayout"
            arrays = self.layout.unpack(batch["packed"])
        stored = torch.cat([arrays[name].float() for name in self.datasets], dim=1)
        if self.reorder:
            stored = stored.index_select(1, self.order)
        image, mask = torch.addcmul(self.bias, stored, self.gain), arrays["mask"].long()
        if "generation" in batch:  # read from a worker's SharedRing: still the batch it sent?
            SharedRing.check(batch["packed"], int(batch["generation"]))
        return image, mask


def derived_seed(seed: int, *where: int) -> int:
    """A seed that depends only on the run's `seed` and a position in training: (epoch, patch) for
    a patch's augmentation, (epoch, rank[, batch]) for `datamodule.RandomStreams`."""
    return int(np.random.SeedSequence([seed, *where]).generate_state(1)[0])


Index = int | tuple[int, int]
"""A patch number, or an (epoch, patch) pair (`datamodule.EpochShards`)."""


class PatchDataset(Dataset[dict[str, torch.Tensor]]):
    """Patches of one HDF5 file as they are stored, compact: `{"image": (S, H, W) uint8 spectral
    bands, "height": (Hc, H, W) int16 heights, "mask": (H, W) uint8}` tensors (`patches.BandCoding`
    says what the values mean; a kind of band the file lacks has 0 channels). `Decode` makes
    the network's normalised float input of a batch, on the training device.

    With `augment`, each sample is one of the eight flips/right-angle rotations (`d4`) of all its
    bands and mask. An index is a patch number, or an `(epoch, patch)` pair (what
    `datamodule.EpochShards` yields): a pair's symmetry is drawn from (seed, epoch, patch) alone,
    so a sample is the same whichever worker reads it, however long that worker has lived, and in
    a resumed run. A plain number draws from the process's own stream (seeded per worker).

    A list of indices reads a whole batch as `{"packed": (B, row_bytes) uint8}`, one block that
    the worker writes straight into shared memory, so that handing it to the training process
    copies nothing and passes one file descriptor (a DataLoader with `batch_size=None` and
    `datamodule.EpochBatches`); `layout.unpack` gives the dict of arrays back, as views.

    The file is opened lazily in each process: h5py handles must not cross a fork.
    """

    def __init__(self, path: Path, *, augment: bool = False, seed: int = 0, buffers: int = 0) -> None:
        self.path = Path(path)
        self.seed = seed
        self.buffers = buffers
        """In a worker, write batches into a ring of this many shared blocks, reused (SharedRing);
        0: a new block for each batch."""
        info = read_patch_info(self.path)
        self.length = info.length
        self.bands = info.bands
        self.size = info.size
        self.layout = PatchLayout.of(info.codings, info.size)
        self.augment = augment
        self._h5: h5py.File | None = None
        self._pid: int | None = None
        self._datasets: dict[str, h5py.Dataset] = {}
        self._rng = np.random.default_rng(seed)
        self._epoch_symmetries: tuple[int | None, np.ndarray] = (None, np.zeros(0, dtype=np.int8))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: Index | list[Index]) -> dict[str, Any]:
        if isinstance(index, list):
            if self.buffers and get_worker_info() is not None:
                block, generation = _RING.take(len(index) * self.layout.row_bytes, self.buffers)
                packed = block.view(len(index), self.layout.row_bytes)
                return {"packed": self._batch(index, into=packed), "generation": generation}
            return {"packed": self._batch(index)}
        return {
            key: value[0] for key, value in self.layout.unpack(self._batch([index], shared=False)).items()
        }

    def _batch(
        self, indices: Sequence[Index], *, shared: bool = True, into: torch.Tensor | None = None
    ) -> torch.Tensor:
        if self._pid != os.getpid():
            self._start_in_this_process()
        shape = (len(indices), self.layout.row_bytes)
        packed = _empty(shape, torch.uint8, shared) if into is None else into
        out = {key: value.numpy() for key, value in self.layout.unpack(packed).items()}
        read = {key: self._datasets[key] for key, value in out.items() if value.size}
        for row, index in enumerate(indices):
            epoch, patch = index if isinstance(index, tuple) else (None, index)
            symmetry = self._symmetry(epoch, patch)
            for key, ds in read.items():
                try:
                    stored = ds[patch]
                except OSError as err:
                    raise h5_read_error(self.path, err, f"patch {patch}") from err
                d4_into(stored, symmetry, out[key][row])
        return packed

    def _symmetry(self, epoch: int | None, patch: int) -> int:
        if not self.augment:
            return 0
        if epoch is None:
            return int(self._rng.integers(SYMMETRIES))
        if self._epoch_symmetries[0] != epoch:
            # Every patch's symmetry for the epoch at once: one SeedSequence per epoch instead of
            # one per patch (~10% of a worker's time per patch), still from (seed, epoch) alone.
            rng = np.random.default_rng(derived_seed(self.seed, epoch, SYMMETRY_STREAM))
            self._epoch_symmetries = (epoch, rng.integers(SYMMETRIES, size=self.length, dtype=np.int8))
        return int(self._epoch_symmetries[1][patch])

    def _start_in_this_process(self) -> None:
        """Open the file and seed the augmentation in each process that reads samples.

        A forked DataLoader worker inherits the parent's h5py handle (unsafe to share) and a copy
        of the parent's random generator, so every worker would draw the same flips. torch gives
        each worker its own seed derived from the run's seed: use it.
        """
        self._h5 = open_h5_file(self.path)
        self._pid = os.getpid()
        # Looked up once: a lookup costs about as much as reading a patch's mask.
        self._datasets = {
            key: h5_dataset(self._h5, key) for key in ("mask", *STORED_DATASETS) if key in self._h5
        }
        self._rng = np.random.default_rng(torch.initial_seed() % 2**32)

    def __getstate__(self) -> dict[str, Any]:
        # Never pickle an open HDF5 handle into a DataLoader worker.
        state = self.__dict__.copy()
        state["_h5"] = None
        state["_pid"] = None
        state["_datasets"] = {}
        return state


def _empty(shape: tuple[int, ...], dtype: torch.dtype, shared: bool) -> torch.Tensor:
    """An uninitialised tensor; in a DataLoader worker (when `shared`), in shared memory, as torch's
    default_collate allocates its batches: the training process then maps it instead of copying."""
    if not shared or get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    nbytes = int(np.prod(shape)) * torch.empty(0, dtype=dtype).element_size()
    storage = torch.UntypedStorage._new_shared(max(nbytes, 1))
    return torch.empty(0, dtype=dtype).set_(storage)[: int(np.prod(shape))].view(shape)


class SharedRing:
    """Shared-memory blocks a DataLoader worker writes its batches into, reused in turn.

    A new shared block per batch costs its allocation and page faults in the worker and a new
    mapping in the training process: on this 2-core machine that capped two workers at ~1,550
    patches/s, against ~3,100 with blocks reused (`make bench`). A block is reused `size` batches
    later; the DataLoader keeps at most `prefetch_factor` batches of a worker in flight and
    Lightning holds two more (the current one and the one fetched ahead), so a ring longer than
    that is never written while its batch is in use. Each block starts with a generation number,
    written before the batch; `check` compares it with the one the batch was sent with, so a
    block overwritten while in use is an error, never silently other data.
    """

    HEADER = 8
    """Bytes of the generation number before the batch (int64; keeps the batch 8-byte aligned)."""

    def __init__(self) -> None:
        self.pid = 0
        self.blocks: dict[int, list[torch.UntypedStorage]] = {}
        self.next: dict[int, int] = {}
        self.generation = 0

    def take(self, nbytes: int, size: int) -> tuple[torch.Tensor, int]:
        """The next block of `nbytes` (a uint8 view after the header) and its new generation."""
        if self.pid != os.getpid():  # a fresh worker: nothing inherited is ours
            self.pid, self.blocks, self.next, self.generation = os.getpid(), {}, {}, 0
        ring = self.blocks.setdefault(nbytes, [])
        self.generation += 1
        if len(ring) < size:  # filled first, then reused oldest first
            ring.append(torch.UntypedStorage._new_shared(self.HEADER + nbytes))
            self.next[nbytes] = 0
            storage = ring[-1]
        else:
            storage = ring[self.next[nbytes]]
            self.next[nbytes] = (self.next[nbytes] + 1) % size
        header = torch.empty(0, dtype=torch.int64).set_(storage, 0, (1,), (1,))
        header[0] = self.generation  # before the batch: a batch read after this is stale
        return torch.empty(0, dtype=torch.uint8).set_(storage, self.HEADER, (nbytes,), (1,)), self.generation

    @classmethod
    def check(cls, packed: torch.Tensor, generation: int) -> None:
        """RuntimeError if the block `packed` lies in was written again since it was sent with
        `generation` (only where the header is still in front of it: not for a pinned or device copy)."""
        if packed.device.type != "cpu" or packed.storage_offset() != cls.HEADER:
            return
        header = torch.empty(0, dtype=torch.int64).set_(packed.untyped_storage(), 0, (1,), (1,))
        if int(header[0]) != generation:
            raise RuntimeError(
                f"a training batch was overwritten by its loader worker while in use (generation "
                f"{generation}, now {int(header[0])}): the ring of shared blocks is too short for "
                "what holds batches here; set train.num_workers: 0 and report it"
            )


_RING = SharedRing()
"""This process's ring (a DataLoader worker's; the training process never takes from it)."""


class ValidationTiles(Dataset[dict[str, Any]]):
    """The whole validation tiles of a `val.h5`: `{"tile": id, "image": (C, H, W) float32
    normalised, "reference": (H, W) uint8 eroded reference, 255 not scored}` as numpy arrays.

    Index -1 is an empty item (`{"tile": None}`): `TileShards` gives it to a DDP rank that has
    no tile left, so that every rank runs the same number of validation steps.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.info = read_tile_file_info(self.path)
        self.tiles = self.info.tiles
        self.mean = np.asarray(self.info.stats.mean, dtype=np.float32)[:, None, None]
        self.std = np.asarray(self.info.stats.std, dtype=np.float32)[:, None, None]

    def __len__(self) -> int:
        return len(self.tiles)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index < 0:
            return {"tile": None}
        tile = self.tiles[index]
        # Opened per item: a handful of whole tiles per epoch, never shared across processes.
        image, reference = read_validation_tile(self.info, tile)
        image -= self.mean
        image /= self.std
        return {"tile": tile, "image": image, "reference": reference}
