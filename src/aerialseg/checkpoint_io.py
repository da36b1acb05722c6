"""Lightning's checkpoints (`models/checkpoints/last.ckpt`, `best.ckpt`) written like every output.

Lightning's own `TorchCheckpointIO` writes a checkpoint to a temporary file in `$TMPDIR` and moves
it to its final name: across file systems (a node-local `/tmp` on clusters) that move is a copy
into the final name, so a kill or a full disk during it leaves a truncated `last.ckpt` that resume
cannot read. Here the checkpoint is written next to its final name and renamed when complete
(`files.atomic_path`), whatever `$TMPDIR` is; a leftover of a killed process is removed by the
next save in that folder.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.fabric.utilities.types import _PATH

from aerialseg.files import atomic_path


class AtomicCheckpointIO(TorchCheckpointIO):
    """`TorchCheckpointIO` whose local checkpoints are never half-written under their final name."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        if "://" in str(path):  # remote storage (s3://, ...): Lightning's own transaction
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options for a local checkpoint ({path})")
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)
