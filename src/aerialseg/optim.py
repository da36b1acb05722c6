"""What `train.optimizer` and `train.scheduler` select: the registries and the builders.

OPTIMIZERS maps a name to its torch.optim class; SCHEDULERS maps a name to a function that gives
Lightning's scheduler config (what to step, how often, on which metric), or None for a constant
rate. torch is imported only where something is built (config reads the keys of both).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aerialseg.registry import Registry

if TYPE_CHECKING:
    import torch


def _torch_optimizer(name: str) -> type[torch.optim.Optimizer]:
    cls: type[torch.optim.Optimizer] = getattr(importlib.import_module("torch.optim"), name)
    return cls


OPTIMIZERS: Registry[type[torch.optim.Optimizer]] = Registry(
    "an optimizer",
    {
        "sgd": "SGD",
        "rmsprop": "RMSprop",
        "adagrad": "Adagrad",
        "adadelta": "Adadelta",
        "adam": "Adam",
        "adamax": "Adamax",
        "adamw": "AdamW",
    },
    load=_torch_optimizer,
)
"""train.optimizer -> its torch.optim class (built by `build_optimizer`)."""
SGD_MOMENTUM = 0.9


def build_optimizer(parameters: Any, name: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """OPTIMIZERS[name] over `parameters`, at rate `lr` with `weight_decay` (SGD with momentum 0.9)."""
    cls = OPTIMIZERS.choose(name)
    kwargs: dict[str, Any] = {"lr": lr, "weight_decay": weight_decay}
    if name == "sgd":
        kwargs["momentum"] = SGD_MOMENTUM
    return cls(parameters, **kwargs)


@dataclass(frozen=True)
class Schedule:
    """What a scheduler needs to know of the training: the peak rate, its length, the metric."""

    lr: float
    max_epochs: Callable[[], int]
    total_steps: Callable[[], int]
    """Optimizer steps over the whole training (asked only by the schedulers that need it:
    Lightning counts them from the loaders)."""
    monitor: str
    """The metric (higher is better) the plateau scheduler watches."""


SchedulerConfig = dict[str, Any]
SchedulerBuilder = Callable[["torch.optim.Optimizer", Schedule], SchedulerConfig | None]


def _constant(optimizer: torch.optim.Optimizer, schedule: Schedule) -> SchedulerConfig | None:
    return None


def _cosine(optimizer: torch.optim.Optimizer, schedule: Schedule) -> SchedulerConfig | None:
    from torch.optim import lr_scheduler

    return {"scheduler": lr_scheduler.CosineAnnealingLR(optimizer, T_max=schedule.max_epochs())}


def _onecycle(optimizer: torch.optim.Optimizer, schedule: Schedule) -> SchedulerConfig | None:
    from torch.optim import lr_scheduler

    # Momentum cycling only where the optimizer has a momentum to cycle.
    defaults = optimizer.defaults
    cycle = "betas" in defaults or defaults.get("momentum", 0) > 0
    onecycle = lr_scheduler.OneCycleLR(
        optimizer, max_lr=schedule.lr, total_steps=schedule.total_steps(), cycle_momentum=cycle
    )
    return {"scheduler": onecycle, "interval": "step"}


def _plateau(optimizer: torch.optim.Optimizer, schedule: Schedule) -> SchedulerConfig | None:
    from torch.optim import lr_scheduler

    # Halve the rate after 2 epochs without a better monitored figure.
    plateau = lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=0.5, patience=2)
    return {"scheduler": plateau, "monitor": schedule.monitor, "interval": "epoch"}


SCHEDULERS: Registry[SchedulerBuilder] = Registry(
    "a scheduler",
    {"none": _constant, "cosine": _cosine, "onecycle": _onecycle, "plateau": _plateau},
)
"""train.scheduler -> (optimizer, Schedule) -> Lightning's lr_scheduler config (None for `none`):
cosine annealing over the epochs, one cycle over the steps, or halving on a plateau of the metric."""


def build_scheduler(
    name: str, optimizer: torch.optim.Optimizer, schedule: Schedule
) -> SchedulerConfig | None:
    """SCHEDULERS[name]'s Lightning config for `optimizer`; None for a constant rate."""
    return SCHEDULERS.choose(name)(optimizer, schedule)
