"""Progress of long steps: a tqdm bar on a terminal, plain lines in logs (Slurm, CI, files).

On a terminal (the stream, stderr by default, is a TTY) `track` and `progress_bar` show tqdm's
bar. Elsewhere a bar redrawn with carriage returns turns a log into one enormous line, so they
write one plain line every TQDM_MININTERVAL seconds (default 30) and a final one when the loop
ends. TQDM_DISABLE=1 silences both. `training_progress_bar` does the same for Lightning.

Lightning is imported only when a Lightning bar is asked for: the data stages that use `track`
would otherwise spend seconds importing it.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sized
from contextlib import contextmanager
from typing import IO, TYPE_CHECKING, Any, Protocol, TypeVar

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

if TYPE_CHECKING:
    import lightning as L
    from lightning.pytorch.callbacks import ProgressBar

T = TypeVar("T")

INTERVAL_ENV = "TQDM_MININTERVAL"
DISABLE_ENV = "TQDM_DISABLE"
DEFAULT_INTERVAL = 30.0
"""Seconds between two lines when the stream is not a terminal."""

_WITH_TOTAL = "{desc}: {percentage:3.0f}% {n_fmt}/{total_fmt} {unit} [{elapsed}<{remaining}, {rate_fmt}]"
_WITHOUT_TOTAL = "{desc}: {n_fmt} {unit} [{elapsed}, {rate_fmt}]"


class Bar(Protocol):
    """What `progress_bar` yields: tqdm's bar or a LineProgress."""

    def update(self, n: int = 1) -> Any: ...


def is_terminal(stream: IO[str] | None = None) -> bool:
    stream = sys.stderr if stream is None else stream
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def line_interval() -> float:
    """TQDM_MININTERVAL in seconds (tqdm's own variable), DEFAULT_INTERVAL if unset or not a number."""
    try:
        interval = float(os.environ[INTERVAL_ENV])
    except (KeyError, ValueError):
        return DEFAULT_INTERVAL
    return interval if interval >= 0 else DEFAULT_INTERVAL


def _disabled() -> bool:
    return os.environ.get(DISABLE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


class LineProgress:
    """tqdm's `update`/`close` without the bar: one line per `interval` seconds, and a final line.

    The line is tqdm's text without the bar: ``patches:  40% 2/5 tile [01:02<01:33, 31.0s/tile]``.
    """

    def __init__(
        self,
        desc: str,
        *,
        total: int | None = None,
        unit: str = "it",
        stream: IO[str] | None = None,
        interval: float | None = None,
        disable: bool = False,
    ) -> None:
        self.desc, self.total, self.unit = desc, total, unit
        self.stream = stream
        self.interval = line_interval() if interval is None else interval
        self.disable = disable
        self.n = 0
        self.started = self._last = time.monotonic()
        self.closed = False

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._write(now)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._write(time.monotonic())

    def line(self, now: float | None = None) -> str:
        elapsed = (time.monotonic() if now is None else now) - self.started
        known = self.total is not None
        return str(
            tqdm.format_meter(
                self.n,
                self.total if known else None,
                elapsed,
                prefix=self.desc,
                unit=self.unit,
                bar_format=_WITH_TOTAL if known else _WITHOUT_TOTAL,
            )
        )

    def _write(self, now: float) -> None:
        self._last = now
        if self.disable:
            return
        stream = sys.stderr if self.stream is None else self.stream
        stream.write(self.line(now) + "\n")
        stream.flush()


@contextmanager
def progress_bar(
    desc: str | None, *, total: int | None = None, unit: str = "it", stream: IO[str] | None = None
) -> Iterator[Bar]:
    """A bar to `update(n)` by hand, closed (final line written) when the block ends.

    `desc` None gives a silent bar, for callers whose progress is optional. On a terminal, log
    records sent to the console while the bar is up are printed above it instead of through it.
    """
    if desc is None:
        yield LineProgress("", disable=True)
        return
    if is_terminal(stream):
        with (
            logging_redirect_tqdm(loggers=[logging.root]),
            tqdm(desc=desc, total=total, unit=unit, file=stream, dynamic_ncols=True) as bar,
        ):
            yield bar
        return
    line = LineProgress(desc, total=total, unit=unit, stream=stream, disable=_disabled())
    try:
        yield line
    finally:
        line.close()


def track(
    iterable: Iterable[T],
    desc: str,
    *,
    total: int | None = None,
    unit: str = "it",
    stream: IO[str] | None = None,
) -> Iterator[T]:
    """Iterate with progress; an item counts as done when the loop comes back for the next one.

    `total` defaults to len(iterable) where it has one.
    """
    if total is None and isinstance(iterable, Sized):
        total = len(iterable)
    with progress_bar(desc, total=total, unit=unit, stream=stream) as bar:
        for item in iterable:
            yield item
            bar.update(1)


# ---------------------------------------------------------------- Lightning


def training_progress_bar(stream: IO[str] | None = None, interval: float | None = None) -> ProgressBar:
    """The progress bar callback for the Lightning Trainer.

    On a terminal, Lightning's own (RichProgressBar where rich is installed, else TQDMProgressBar,
    as Lightning picks by default). Elsewhere a LineProgressBar: one line per epoch with its
    metrics, and one per `interval` seconds (TQDM_MININTERVAL, default 30) within an epoch.
    Pass it in `callbacks`: Lightning then adds no bar of its own.
    """
    if is_terminal(stream):
        from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
        from lightning.pytorch.callbacks.progress.rich_progress import _RICH_AVAILABLE

        return RichProgressBar() if _RICH_AVAILABLE else TQDMProgressBar()
    return line_progress_bar(stream, interval)


_LINE_PROGRESS_BAR: Callable[..., ProgressBar] | None = None


def line_progress_bar(stream: IO[str] | None = None, interval: float | None = None) -> ProgressBar:
    """A LineProgressBar, whatever the stream (training_progress_bar picks by the stream).

    The class subclasses Lightning's ProgressBar, so it is defined on first use (see the module doc).
    """
    global _LINE_PROGRESS_BAR
    if _LINE_PROGRESS_BAR is None:
        _LINE_PROGRESS_BAR = _define_line_progress_bar()
    return _LINE_PROGRESS_BAR(stream=stream, interval=interval)


def _define_line_progress_bar() -> Callable[..., ProgressBar]:
    from lightning.pytorch.callbacks import ProgressBar

    class LineProgressBar(ProgressBar):
        """Plain lines for logs: ``epoch 3/12 train:  44% 20/45 batch [00:30<00:38, 1.5s/batch]``
        every `interval` seconds within an epoch (its validation likewise), and at the end of each
        epoch ``epoch 3/12 done in 68s: train_loss 0.41, val_loss 0.52, val_mean_f1 0.71`` (the
        metrics logged with prog_bar=True). Only global rank 0 writes: Lightning disables the others."""

        def __init__(self, stream: IO[str] | None = None, interval: float | None = None) -> None:
            super().__init__()
            self.stream = stream
            self.interval = interval
            self.enabled = not _disabled()
            self._line: LineProgress | None = None
            self._epoch_started = 0.0

        def disable(self) -> None:
            self.enabled = False

        def enable(self) -> None:
            self.enabled = True

        def print(self, *args: Any, **kwargs: Any) -> None:
            if self.enabled:
                print(*args, file=self._stream(), flush=True, **kwargs)

        def _stream(self) -> IO[str]:
            return sys.stderr if self.stream is None else self.stream

        def _epoch(self, trainer: L.Trainer) -> str:
            epochs = trainer.max_epochs
            return f"epoch {trainer.current_epoch + 1}" + (f"/{epochs}" if epochs and epochs > 0 else "")

        def _start(self, desc: str, total: float | int) -> None:
            # Interval lines only: the final line of a part of an epoch would be noise; the epoch
            # line says it all.
            known = int(total) if math.isfinite(total) else None
            self._line = LineProgress(
                desc, total=known, unit="batch", stream=self._stream(), interval=self.interval
            )
            self._line.disable = not self.enabled

        def _step(self) -> None:
            if self._line is not None:
                self._line.update(1)

        def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            # An epoch resumed mid-way (a requeued Slurm job) gets no on_train_epoch_start.
            self._epoch_started = time.monotonic()

        def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            self._epoch_started = time.monotonic()
            self._start(f"{self._epoch(trainer)} train", self.total_train_batches)

        def on_train_batch_end(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
            self._step()

        def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            if not trainer.sanity_checking:
                self._start(f"{self._epoch(trainer)} validation", self.total_val_batches)

        def on_validation_batch_end(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
            if not trainer.sanity_checking:
                self._step()

        def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            # Lightning 2 calls this after the epoch's validation: its metrics are in.
            self._line = None
            seconds = time.monotonic() - self._epoch_started
            metrics = self.get_metrics(trainer, pl_module)
            # Sorted: train_* before val_*, whatever order they were logged in.
            shown = ", ".join(
                f"{k} {v:.4g}"
                for k, v in sorted(metrics.items())
                if k != "v_num" and isinstance(v, int | float)
            )
            self.print(f"{self._epoch(trainer)} done in {seconds:.0f}s" + (f": {shown}" if shown else ""))

    return LineProgressBar
