"""Progress: tqdm's bar on a terminal; plain lines, never carriage returns, anywhere else."""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from tqdm import tqdm

from aerialseg import progress
from aerialseg.inference import Settings, predict_probabilities
from aerialseg.progress import (
    DEFAULT_INTERVAL,
    LineProgress,
    line_interval,
    line_progress_bar,
    progress_bar,
    track,
    training_progress_bar,
)


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _no_progress_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TQDM_MININTERVAL", raising=False)
    monkeypatch.delenv("TQDM_DISABLE", raising=False)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[float]]:
    """A clock the test moves by hand: progress reads time.monotonic() through it."""
    now = [1000.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    yield now


def _lines(stream: io.StringIO) -> list[str]:
    text = stream.getvalue()
    assert "\r" not in text
    assert text == "" or text.endswith("\n")
    return text.splitlines()


def test_not_a_terminal_gives_one_line_per_interval_and_a_final_one(clock: list[float]) -> None:
    stream = io.StringIO()
    for _ in track(range(10), "tiles", unit="tile", stream=stream):
        clock[0] += 10.0  # each item takes 10 s: a line at 30, 60 and 90 s
    lines = _lines(stream)
    assert len(lines) == 4
    assert lines[0].startswith("tiles:  30% 3/10 tile [00:30<01:10")
    assert lines[1].startswith("tiles:  60% 6/10 tile [01:00<00:40")
    assert lines[2].startswith("tiles:  90% 9/10 tile [01:30<00:10")
    assert lines[3].startswith("tiles: 100% 10/10 tile [01:40<00:00")


def test_a_fast_loop_writes_only_the_final_line() -> None:
    stream = io.StringIO()
    assert list(track(["a", "b", "c"], "patches train.h5", unit="tile", stream=stream)) == ["a", "b", "c"]
    (line,) = _lines(stream)
    assert re.match(r"patches train\.h5: 100% 3/3 tile \[00:00<00:00, .*tile/s\]$", line)


def test_the_interval_comes_from_tqdm_mininterval(
    monkeypatch: pytest.MonkeyPatch, clock: list[float]
) -> None:
    assert line_interval() == DEFAULT_INTERVAL == 30.0
    monkeypatch.setenv("TQDM_MININTERVAL", "5")
    assert line_interval() == 5.0
    stream = io.StringIO()
    with progress_bar("predict area7", total=4, unit="window", stream=stream) as bar:
        for _ in range(4):
            clock[0] += 5.0
            bar.update(1)
    assert len(_lines(stream)) == 5  # four intervals and the final line
    monkeypatch.setenv("TQDM_MININTERVAL", "soon")
    assert line_interval() == DEFAULT_INTERVAL


def test_unknown_total_and_generators() -> None:
    stream = io.StringIO()
    assert sum(track((i for i in range(4)), "windows", stream=stream)) == 6
    (line,) = _lines(stream)
    assert line.startswith("windows: 4 it [")


def test_the_final_line_is_written_when_the_loop_stops_early() -> None:
    stream = io.StringIO()
    for item in track(range(10), "tiles", stream=stream):
        if item == 2:
            break
    (line,) = _lines(stream)
    assert line.startswith("tiles:  20% 2/10 it")  # items 0 and 1 done


def test_tqdm_disable_silences_the_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TQDM_DISABLE", "1")
    stream = io.StringIO()
    assert list(track(range(3), "tiles", stream=stream)) == [0, 1, 2]
    assert stream.getvalue() == ""


def test_no_description_means_no_output(capsys: pytest.CaptureFixture[str]) -> None:
    with progress_bar(None, total=3) as bar:
        bar.update(3)
    assert capsys.readouterr().err == ""


def test_a_terminal_gets_the_tqdm_bar() -> None:
    stream = FakeTerminal()
    with progress_bar("tiles", total=3, unit="tile", stream=stream) as bar:
        assert isinstance(bar, tqdm)
        bar.update(3)
    assert "\r" in stream.getvalue() and "3/3" in stream.getvalue()


def test_line_progress_line_without_writing() -> None:
    stream = io.StringIO()
    line = LineProgress("x", total=2, stream=stream, interval=1e9)
    line.update(1)
    assert line.line().startswith("x:  50% 1/2 it [")
    assert stream.getvalue() == ""
    line.close()
    line.close()
    assert len(_lines(stream)) == 1


class _Flat(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(x.shape[0], 6, *x.shape[2:])


def test_whole_tile_inference_reports_its_windows(capsys: pytest.CaptureFixture[str]) -> None:
    image = np.zeros((4, 96, 96), dtype=np.float32)
    predict_probabilities(
        _Flat(), image, Settings(window=64, overlap=0.5, batch_size=2), progress="predict area7"
    )
    err = capsys.readouterr().err
    assert "\r" not in err
    assert re.match(r"predict area7: 100% 4/4 window \[", err)
    predict_probabilities(_Flat(), image, Settings(window=64, overlap=0.5))  # no progress asked: silent
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------- Lightning


def _fit(bar: Any, epochs: int = 2) -> None:
    import lightning as L
    from lightning.pytorch.demos.boring_classes import BoringModel

    class Logged(BoringModel):
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            out = super().training_step(batch, batch_idx)
            self.log("train_loss", out["loss"], on_step=False, on_epoch=True, prog_bar=True)
            return out

        def validation_step(self, batch: Any, batch_idx: int) -> Any:
            out = super().validation_step(batch, batch_idx)
            self.log("val_loss", out["x"], prog_bar=True)
            return out

    trainer = L.Trainer(
        max_epochs=epochs,
        limit_train_batches=3,
        limit_val_batches=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[bar],
    )
    trainer.fit(Logged())


def test_lightning_line_bar_prints_one_line_per_epoch() -> None:
    stream = io.StringIO()
    _fit(line_progress_bar(stream=stream, interval=1e9))
    lines = _lines(stream)
    assert len(lines) == 2
    for epoch, line in enumerate(lines, start=1):
        assert re.match(rf"epoch {epoch}/2 done in \d+s: train_loss [-\d.e]+, val_loss [-\d.e]+$", line), line


def test_lightning_line_bar_prints_within_an_epoch_every_interval() -> None:
    stream = io.StringIO()
    _fit(line_progress_bar(stream=stream, interval=0.0), epochs=1)
    lines = _lines(stream)
    assert [line.split(" [")[0] for line in lines[:-1]] == [
        "epoch 1/1 train:  33% 1/3 batch",
        "epoch 1/1 train:  67% 2/3 batch",
        "epoch 1/1 train: 100% 3/3 batch",
        "epoch 1/1 validation:  50% 1/2 batch",
        "epoch 1/1 validation: 100% 2/2 batch",
    ]
    assert lines[-1].startswith("epoch 1/1 done in")


def test_training_progress_bar_is_lightnings_own_on_a_terminal() -> None:
    from lightning.pytorch.callbacks import ProgressBar, RichProgressBar, TQDMProgressBar

    on_terminal = training_progress_bar(stream=FakeTerminal())
    assert isinstance(on_terminal, RichProgressBar | TQDMProgressBar)
    in_a_log = training_progress_bar(stream=io.StringIO())
    assert isinstance(in_a_log, ProgressBar) and type(in_a_log).__name__ == "LineProgressBar"
