"""Every choice params.yaml makes, checked against the registry that builds it.

A choice (`evaluate.tta`, `evaluate.blend`, ...) is defined once: as a key of the registry beside
the code that implements it (smp's pattern: one dict per choice, whose error lists the options).
`config.py` types these params as plain strings, because importing the registries there would
make every stage (scenes, tiles, ...) depend on the inference and model code; instead the `params`
stage checks them all up front (`check_choices`), and the code that uses a choice checks it again
with the same message (`choice`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from aerialseg.config import ConfigError, Params


class ChoiceError(ValueError):
    """A value that is not a key of its registry; the message lists the options."""


def choice(value: Any, registry: Iterable[str], what: str) -> str:
    """`value` when it is a key of `registry`; ChoiceError listing the options otherwise."""
    options = list(registry)
    if value not in options:
        raise ChoiceError(f"{value!r} is not a {what}; choose one of: {', '.join(options)}")
    return str(value)


def registries() -> Mapping[str, tuple[Iterable[str], str]]:
    """params.yaml key -> (its registry, what a value names)."""
    from aerialseg.devices import INFERENCE_PRECISIONS
    from aerialseg.inference import BLENDS, TTA

    return {
        "evaluate.tta": (TTA, "test-time augmentation"),
        "evaluate.blend": (BLENDS, "window blending"),
        "evaluate.precision": (INFERENCE_PRECISIONS, "precision"),
    }


def check_choices(params: Params, source: str = "params.yaml") -> None:
    """ConfigError naming `source`, the key and the options for the first choice not in its registry."""
    for key, (registry, what) in registries().items():
        try:
            choice(_get(params, key), registry, what)
        except ChoiceError as err:
            raise ConfigError(f"{source}: {key}: {err}") from None
    # The encoder: only smp knows its list (the other model and train choices: config.py).
    from aerialseg.model import encoder_problem

    problem = encoder_problem(params.model.arch, params.model.encoder)
    if problem:
        raise ConfigError(f"{source}: model.encoder: {problem}")


def _get(params: Params, key: str) -> Any:
    value: Any = params
    for part in key.split("."):
        value = getattr(value, part)
    return value
