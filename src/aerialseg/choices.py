"""Every choice params.yaml makes, checked against the registry that builds it.

A choice (`model.arch`, `train.loss`, `evaluate.blend`, ...) is defined once: as a key of the
registry beside the code that implements it (aerialseg.registry, smp's pattern: one registry per
choice, whose error lists the options). `config.py` types these params as plain strings, because
reading the registries there would make every stage (scenes, tiles, ...) a DVC dependant of the
model, loss and inference code (a stage depends on all the code it imports); instead the `params`
stage checks them all up front (`check_choices`), `train` and `evaluate` check them again before
they start, and the code that uses a choice raises the same message (`Registry.choose`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aerialseg.config import ConfigError, Params
from aerialseg.registry import Registry, not_one_of


def registries() -> Mapping[str, Registry[Any]]:
    """params.yaml key -> the registry its value must be a key of."""
    from aerialseg.inference import BLENDS, TTA
    from aerialseg.losses import LOSSES
    from aerialseg.model import ARCHITECTURES
    from aerialseg.optim import OPTIMIZERS, SCHEDULERS

    return {
        "model.arch": ARCHITECTURES,
        "train.optimizer": OPTIMIZERS,
        "train.scheduler": SCHEDULERS,
        "train.loss": LOSSES,
        "evaluate.tta": TTA,
        "evaluate.blend": BLENDS,
    }


def check_choices(params: Params, source: str = "params.yaml") -> None:
    """Every choice against its registry, then what depends on two choices (class weights and the
    loss, the patch size and the architecture, the encoder and the architecture): ConfigError naming
    `source`, the key and, for a name, the options."""
    from aerialseg.devices import INFERENCE_PRECISIONS
    from aerialseg.losses import class_weights_problem
    from aerialseg.model import check_input_size, encoder_problem

    for key, registry in registries().items():
        value = _get(params, key)
        if value not in registry:
            raise ConfigError(f"{source}: {key}: {registry.unknown(value)}")
    if params.evaluate.precision not in INFERENCE_PRECISIONS:
        wrong = not_one_of(params.evaluate.precision, "a precision", INFERENCE_PRECISIONS)
        raise ConfigError(f"{source}: evaluate.precision: {wrong}")
    weights = class_weights_problem(params.train.loss, params.train.class_weights)
    if weights:
        raise ConfigError(f"{source}: {weights}")
    try:
        check_input_size(params.patches.size_px, params.patches.size_px, params.model.arch)
    except ValueError as err:
        raise ConfigError(f"{source}: patches.size_px: {err}") from None
    encoder = encoder_problem(params.model.arch, params.model.encoder)
    if encoder:
        raise ConfigError(f"{source}: model.encoder: {encoder}")


def _get(params: Params, key: str) -> Any:
    value: Any = params
    for part in key.split("."):
        value = getattr(value, part)
    return value
