"""Registries of named choices (architectures, losses, optimizers, schedulers), smp-style.

Each registry sits beside the code that builds its entries (`model.ARCHITECTURES`,
`losses.LOSSES`, `optim.OPTIMIZERS`, `optim.SCHEDULERS`); the configuration validates
params.yaml against its keys, and asking for another name is an error that lists the options,
as segmentation_models_pytorch's `create_model` does. The registry modules import torch and
smp only inside their builders, so reading a registry's keys (every stage loads params.yaml)
costs no import of them.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Registry(Mapping[str, T], Generic[T]):
    """name -> entry; `choose(name)` raises a ValueError that lists the options for any other name.

    `load`, when given, turns a stored value into the entry on lookup (e.g. the name of a
    torch.optim class into the class), so that the module defining the registry need not import
    what the entries are made of.
    """

    def __init__(self, kind: str, entries: Mapping[str, Any], load: Callable[[Any], T] | None = None) -> None:
        self.kind = kind
        """What one entry is, with its article, for messages: `an architecture`, `a loss`."""
        self._entries = dict(entries)
        self._load = load

    def __getitem__(self, name: str) -> T:
        value = self._entries[name]
        return value if self._load is None else self._load(value)

    def __contains__(self, name: object) -> bool:
        return name in self._entries  # Mapping's own would load the entry

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def choose(self, name: str) -> T:
        if name not in self._entries:
            raise ValueError(self.unknown(name))
        return self[name]

    def unknown(self, name: object) -> str:
        """`'fpnn' is not an architecture; choose one of: deeplabv3, ..., upernet`."""
        return not_one_of(name, self.kind, self)


def not_one_of(name: object, kind: str, options: Iterable[str], *, close_only: bool = False) -> str:
    """The message for a name that is not one of `options`: all of them, sorted, or, with
    `close_only` (for long lists such as smp's encoders), the close matches difflib finds."""
    options = sorted(options)
    if close_only:
        close = difflib.get_close_matches(str(name), options, n=6, cutoff=0.6)
        hint = f"did you mean one of: {', '.join(close)}?" if close else "no similar name"
        return f"{name!r} is not {kind}; {hint}"
    return f"{name!r} is not {kind}; choose one of: {', '.join(options)}"
