"""The data side of training: loaders sharded over DDP ranks, and random streams that make
a resumed run repeat an uninterrupted one, whatever the number of loader workers."""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator, Sized
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, Sampler

from aerialseg.config import TrainConfig
from aerialseg.data import PatchDataset, ValidationTiles, derived_seed
from aerialseg.patches import PatchFileInfo, TileFileInfo

PREFETCH = 2
"""Batches each loader worker prepares ahead (torch's default prefetch_factor)."""


class PatchData(L.LightningDataModule):
    """Train patches and whole val tiles, both sharded over the DDP ranks.

    Built here rather than by Lightning (use_distributed_sampler=False) for two reasons: the
    val tiles are dealt out whole, each to one rank, so that each val pixel counts once; and
    the train batches must depend only on (seed, epoch) - their order (EpochShards) and each
    sample's augmentation (PatchDataset, from (seed, epoch, patch)) - so that a resumed run,
    or one with another `train.num_workers`, sees the same batches as an uninterrupted one.
    """

    def __init__(self, train: PatchFileInfo, val: TileFileInfo, cfg: TrainConfig) -> None:
        super().__init__()
        self.train_info, self.val_info, self.cfg = train, val, cfg

    def train_dataloader(self) -> DataLoader[Any]:
        # With workers, each writes its batches into a ring of reused shared blocks (SharedRing):
        # longer than the batches a worker can have in flight (PREFETCH) plus the two Lightning
        # holds (the current one and the one fetched ahead), with two to spare.
        buffers = PREFETCH + 4 if self.cfg.num_workers else 0
        dataset = PatchDataset(
            self.train_info.path, augment=self.cfg.augment, seed=self.cfg.seed, buffers=buffers
        )
        shards = EpochShards(dataset, self._world(), self._rank(), seed=self.cfg.seed)
        # Lightning builds the loader's first iterator (and, with workers, draws its first
        # indices) before it calls set_epoch: a resumed run would replay epoch 0's order.
        epoch = self._next_epoch()
        shards.set_epoch(epoch)
        batches = EpochBatches(shards, self.cfg.batch_size, skip={epoch: self._trained_batches()})
        return self._loader(dataset, batches)

    def val_dataloader(self) -> DataLoader[Any]:
        # One whole tile per step, read in this process: a tile is too large to hand over
        # between processes cheaply, and predicting it costs far more than reading it.
        dataset = ValidationTiles(self.val_info.path)
        sampler = TileShards(len(dataset), self._world(), self._rank())
        return DataLoader(dataset, batch_size=None, sampler=sampler, collate_fn=_as_is)  # type: ignore[arg-type]

    def _loader(self, dataset: PatchDataset, batches: EpochBatches) -> DataLoader[Any]:
        workers = self.cfg.num_workers
        # batch_size=None: each list of indices goes to the dataset whole, which writes the batch
        # into shared memory itself (PatchDataset); default_collate would copy every patch again.
        return DataLoader(
            dataset,
            batch_size=None,
            sampler=batches,  # lists of indices, each read as one batch
            num_workers=workers,
            prefetch_factor=PREFETCH if workers else None,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def _world(self) -> int:
        return self.trainer.world_size if self.trainer is not None else 1

    def _rank(self) -> int:
        return self.trainer.global_rank if self.trainer is not None else 0

    def _next_epoch(self) -> int:
        """The epoch that training starts with: 0, or the one after a resumed checkpoint's.

        What Lightning itself passes to set_epoch at each epoch's start (`trainer.current_epoch`
        still says the checkpoint's epoch while the loaders are built).
        """
        if self.trainer is None:
            return 0
        progress = self.trainer.fit_loop.epoch_progress.current
        return int(getattr(progress, "processed", self.trainer.current_epoch))

    def _trained_batches(self) -> int:
        """The batches of that epoch already trained: those before a checkpoint saved mid-epoch
        (a preempted Slurm job, preemption.Preemption), which Lightning counts as trained and the
        resumed epoch must not read again. 0 for a fresh run or an epoch's checkpoint."""
        if self.trainer is None:
            return 0
        loop = self.trainer.fit_loop
        epochs = loop.epoch_progress.current
        if getattr(epochs, "started", 0) <= getattr(epochs, "processed", 0):
            return 0  # the checkpoint's epoch was finished (or nothing was trained)
        return int(getattr(loop.epoch_loop.batch_progress.current, "processed", 0))


class EpochShards(Sampler[tuple[int, int]]):
    """This rank's share of the training patches, shuffled from (seed, epoch), as `(epoch, patch)`
    pairs: the epoch travels with each index to the worker that reads it (PatchDataset draws
    the sample's augmentation from seed, epoch and patch).

    The order is DistributedSampler's (every rank the same number of patches, a few repeated
    when they do not divide evenly). `started` is the epoch of the latest iteration, which
    RandomStreams checks against the trainer's.
    """

    def __init__(self, dataset: Sized, world: int, rank: int, *, seed: int) -> None:
        self._order: DistributedSampler[Any] = DistributedSampler(
            dataset,  # type: ignore[arg-type]  # only its length is used
            num_replicas=world,
            rank=rank,
            shuffle=True,
            seed=seed,
        )
        self.epoch = 0
        self.started: int | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.started = self.epoch
        self._order.set_epoch(epoch)
        return iter([(epoch, int(i)) for i in self._order])

    def __len__(self) -> int:
        return len(self._order)


class EpochBatches(BatchSampler):
    """EpochShards' (epoch, patch) pairs in lists of `batch_size` (the last one shorter, as a
    DataLoader's batches): PatchDataset reads each list as one batch, in one worker call.
    `set_epoch` and `started` are the shards'. `skip` {epoch: n}: that epoch leaves out its first
    n batches (trained before a mid-epoch checkpoint), by epoch rather than for the first
    iteration only, since a DataLoader with workers iterates its sampler twice as it starts. The
    length stays the epoch's, as Lightning counts those batches in."""

    def __init__(self, shards: EpochShards, batch_size: int, skip: dict[int, int] | None = None) -> None:
        super().__init__(shards, batch_size, drop_last=False)  # type: ignore[arg-type]  # (epoch, patch) pairs
        self.shards, self.skip = shards, dict(skip or {})

    def __iter__(self) -> Iterator[list[int]]:
        return itertools.islice(super().__iter__(), self.skip.get(self.shards.epoch, 0), None)

    def set_epoch(self, epoch: int) -> None:
        self.shards.set_epoch(epoch)

    @property
    def started(self) -> int | None:
        return self.shards.started


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

    Each batch's photometric jitter and dropout then depend on where training is, not on how
    many random numbers earlier epochs, validation or the DataLoader drew; with the samples'
    own augmentation seeds (PatchDataset) and EpochShards' order, a run resumed from an epoch's
    checkpoint repeats the uninterrupted run exactly, with any number of loader workers. Ranks
    get different streams.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reseed(trainer.current_epoch, trainer.global_rank)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx == 0:
            _check_order(trainer)
        # Lightning creates the epoch's DataLoader iterator (which draws a seed from torch's
        # generator) at different points in fresh and resumed runs: reseed after it, per batch.
        # (batch_idx + 1: a trailing 0 would give the epoch's own seed, SeedSequence pads with zeros.)
        self._reseed(trainer.current_epoch, trainer.global_rank, batch_idx + 1)

    def _reseed(self, *where: int) -> int:
        seed = derived_seed(self.seed, *where)
        random.seed(seed)
        np.random.seed(seed)  # noqa: NPY002 - the global generator that libraries draw from
        torch.manual_seed(seed)
        return seed


def _check_order(trainer: L.Trainer) -> None:
    """The epoch's batches come in that epoch's order (a Lightning that built the iterator at
    another point than 2.6 does could feed a resumed run another epoch's order, silently)."""
    sampler = getattr(trainer.train_dataloader, "sampler", None)
    if isinstance(sampler, EpochShards | EpochBatches) and sampler.started != trainer.current_epoch:
        raise RuntimeError(
            f"epoch {trainer.current_epoch} is reading the training patches in epoch "
            f"{sampler.started}'s order; a resumed run would not repeat an uninterrupted one"
        )
