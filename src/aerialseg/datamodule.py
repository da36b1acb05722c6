"""The data side of training: loaders sharded over DDP ranks, and random streams that make
a resumed run repeat an uninterrupted one."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from aerialseg.config import TrainConfig
from aerialseg.data import PatchDataset, ValidationTiles
from aerialseg.patches import PatchFileInfo, TileFileInfo


class PatchData(L.LightningDataModule):
    """Train patches and whole val tiles, both sharded over the DDP ranks.

    Built here rather than by Lightning (use_distributed_sampler=False) for two reasons: the
    val tiles are dealt out whole, each to one rank, so that each val pixel counts once; and
    the train order must depend only on (seed, epoch), so that a resumed run sees the same
    batches as an uninterrupted one.
    """

    def __init__(self, train: PatchFileInfo, val: TileFileInfo, cfg: TrainConfig) -> None:
        super().__init__()
        self.train_info, self.val_info, self.cfg = train, val, cfg

    def train_dataloader(self) -> DataLoader[Any]:
        dataset = PatchDataset(self.train_info.path, augment=self.cfg.augment)
        sampler: DistributedSampler[Any] = DistributedSampler(
            dataset, num_replicas=self._world(), rank=self._rank(), shuffle=True, seed=self.cfg.seed
        )
        return self._loader(dataset, sampler)

    def val_dataloader(self) -> DataLoader[Any]:
        # One whole tile per step, read in this process: a tile is too large to hand over
        # between processes cheaply, and predicting it costs far more than reading it.
        dataset = ValidationTiles(self.val_info.path)
        sampler = TileShards(len(dataset), self._world(), self._rank())
        return DataLoader(dataset, batch_size=None, sampler=sampler, collate_fn=_as_is)  # type: ignore[arg-type]

    def _loader(self, dataset: PatchDataset, sampler: DistributedSampler[Any]) -> DataLoader[Any]:
        workers = self.cfg.num_workers
        return DataLoader(
            dataset,
            batch_size=self.cfg.batch_size,
            sampler=sampler,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def _world(self) -> int:
        return self.trainer.world_size if self.trainer is not None else 1

    def _rank(self) -> int:
        return self.trainer.global_rank if self.trainer is not None else 0


class TileShards(Sampler[int]):
    """Tiles rank, rank + world, ... for one DDP rank, padded with -1 (an empty item) so that every
    rank takes the same number of steps: a rank without any step would skip validation and leave
    the others waiting in the confusion matrix's all-reduce."""

    def __init__(self, tiles: int, world: int, rank: int) -> None:
        self.indices = list(range(rank, tiles, world))
        self.indices += [-1] * (-(-tiles // world) - len(self.indices))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def _as_is(item: dict[str, Any]) -> dict[str, Any]:
    """Numpy arrays stay numpy (and on the CPU): the sliding window moves one batch of windows at a time."""
    return item


class RandomStreams(Callback):
    """Reseed the random generators from (seed, epoch[, batch], rank) as training goes.

    Each epoch's augmentation and each batch's dropout then depend on where training is, not
    on how many random numbers earlier epochs, validation or the DataLoader drew; so a run
    resumed from an epoch's checkpoint repeats the uninterrupted run exactly (with
    num_workers 0: persistent DataLoader workers keep their own streams). Ranks get different
    streams.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch_seed = self._reseed(trainer.current_epoch, trainer.global_rank)
        # With num_workers 0 the augmentation runs in this process; PatchDataset seeds it from
        # torch.initial_seed() when it first reads, which _reseed just made epoch_seed too.
        dataset = getattr(trainer.train_dataloader, "dataset", None)
        augment = getattr(dataset, "augment", None)
        if augment is not None:
            augment.set_random_seed(epoch_seed)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # Lightning creates the epoch's DataLoader iterator (which draws a seed from torch's
        # generator) at different points in fresh and resumed runs: reseed after it, per batch.
        # (batch_idx + 1: a trailing 0 would give the epoch's own seed, SeedSequence pads with zeros.)
        self._reseed(trainer.current_epoch, trainer.global_rank, batch_idx + 1)

    def _reseed(self, *where: int) -> int:
        seed = int(np.random.SeedSequence([self.seed, *where]).generate_state(1)[0])
        random.seed(seed)
        np.random.seed(seed)  # noqa: NPY002 - the global generator that libraries draw from
        torch.manual_seed(seed)
        return seed
