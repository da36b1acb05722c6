"""Half-written files and leftovers (issue 12), through the real stage scripts and `dvc repro`.

- Lightning's checkpoints are written beside their final name and renamed when complete, whatever
  `$TMPDIR` is: a kill or a full disk during a save leaves the previous `last.ckpt`, and resume works.
- SIGTERM cleans up as Ctrl-C does: the temporary output goes, the old output stays as it was.
- The next run removes the temporary files of dead processes, never those of live ones; the
  temporary names are git-ignored.
- A stage stops when the process that started it is gone (`dvc` killed alone).
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from project_copy import TINY, copy_project, project_env, run

from aerialseg.checkpoint_io import AtomicCheckpointIO
from aerialseg.config import Params
from aerialseg.files import host_tag, temp_name

HOST = host_tag()
SLOW_TILES: dict[str, dict[str, Any]] = {
    **TINY,
    # Eight 1024 px areas with the derived nDSM band: `tiles` writes for a few seconds even on a
    # quiet, fast machine (0.3 s an area here), well above the watchdog's 0.2 s poll. Patches
    # without overlap keep `patches` small (16 MB an area).
    "synthetic": {"tiles": 8, "size_px": 1024},
    "data": {**TINY["data"], "bands": ["ir", "r", "g", "dsm", "ndsm"]},
    "patches": {"size_px": 256, "overlap": 0.0},
}


@pytest.fixture(scope="module")
def tiled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project copy whose scenes and tiles are built (by the stage scripts, not DVC)."""
    project = copy_project(tmp_path_factory.mktemp("faults") / "project", SLOW_TILES)
    run(project, "python", "pipeline/scenes.py")
    run(project, "python", "pipeline/tiles.py")
    return project


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def _temp_tiles(project: Path) -> list[Path]:
    return sorted((project / "data").glob(".tiles.tmp-*"))


def _start(project: Path, args: list[str], log: Path) -> subprocess.Popen[bytes]:
    """Start `args` in the project, its output (and its children's) into `log`."""
    with log.open("wb") as out:
        return subprocess.Popen(
            args,
            cwd=project,
            env=project_env(project),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a signal to this test's process group never reaches it
        )


def _wait_for_writing(project: Path, proc: subprocess.Popen[bytes], log: Path, timeout: float = 120) -> Path:
    """The temporary tiles folder, once the stage has written a file into it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for tmp in _temp_tiles(project):
            if any(tmp.iterdir()):
                return tmp
        if proc.poll() is not None:
            pytest.fail(f"ended ({proc.returncode}) before writing:\n{log.read_text()[-3000:]}")
        time.sleep(0.02)
    proc.kill()
    pytest.fail("the stage never started writing")


def _stage_pid(tmp: Path) -> int:
    return int(tmp.name.split(".tmp-")[1].split("-")[0])


def _gone(pid: int) -> bool:
    """No such process, or only its zombie (an orphan's reaper may be slow)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] == "Z"


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _gone(pid):
            return True
        time.sleep(0.05)
    return False


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# --- SIGTERM ------------------------------------------------------------------------------------


def test_sigterm_mid_write_removes_the_temporary_output_and_keeps_the_old_one(
    tiled: Path, tmp_path: Path
) -> None:
    before = _snapshot(tiled / "data" / "tiles")
    log = tmp_path / "tiles.log"
    proc = _start(tiled, [sys.executable, "pipeline/tiles.py"], log)
    tmp = _wait_for_writing(tiled, proc, log)
    assert tmp.name == f".tiles.tmp-{proc.pid}-{HOST}"
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    output = log.read_text()

    assert proc.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert "tiles: stopped by SIGTERM" in output
    assert _temp_tiles(tiled) == []
    assert _snapshot(tiled / "data" / "tiles") == before


# --- leftovers of dead processes ----------------------------------------------------------------


def test_the_next_run_removes_leftovers_of_dead_processes_only(tiled: Path) -> None:
    patches = tiled / "data" / "patches"
    patches.mkdir(parents=True, exist_ok=True)
    dead, live = _dead_pid(), os.getpid()
    removed = [
        temp_name(patches / "train.h5", dead),  # a killed `patches`
        patches / f".val.tmp-{dead}.h5",  # the name before hosts were recorded
        temp_name(patches / "tiles", dead),  # a folder
    ]
    kept = [
        temp_name(patches / "train.h5", live),  # a live process is writing it
        patches / f".train.tmp-{dead}-another-node.h5",  # a pid of another host means nothing here
        patches / ".notes.txt",
    ]
    for path in removed + kept:
        if path.suffix:
            path.write_bytes(b"half")
        else:
            path.mkdir()
            (path / "part.bin").write_bytes(b"half")

    # Git never sees them.
    status = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all", "data"],
        cwd=tiled,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert ".tmp-" not in status and ".notes.txt" in status

    run(tiled, "python", "pipeline/patches.py")

    assert [p for p in removed if p.exists()] == []
    assert [p for p in kept if not p.exists()] == []
    assert (patches / "train.h5").exists() and (patches / "val.h5").exists()
    for path in kept:
        path.unlink()


# --- a stage stops when the process that started it is gone --------------------------------------


@pytest.mark.parametrize(
    "command",
    [
        # `$SHELL -c`: bash execs the stage, so its parent is the caller itself.
        "subprocess.run([sys.executable, 'pipeline/tiles.py'])",
        # dash (/bin/sh on Debian) and fish stay between: the stage's parent is a shell that lives on.
        "subprocess.run(['/bin/sh', '-c', sys.executable + ' pipeline/tiles.py; true'])",
    ],
    ids=["exec", "sh-c"],
)
def test_a_stage_stops_when_its_caller_is_killed(tiled: Path, tmp_path: Path, command: str) -> None:
    before = _snapshot(tiled / "data" / "tiles")
    log = tmp_path / "caller.log"
    caller = _start(tiled, [sys.executable, "-c", f"import subprocess, sys; {command}"], log)
    tmp = _wait_for_writing(tiled, caller, log)
    stage = _stage_pid(tmp)
    caller.send_signal(signal.SIGTERM)  # the caller alone, as `timeout` or a scheduler may do
    caller.wait(timeout=10)

    assert _wait_gone(stage, timeout=15), "the stage went on after its caller ended"
    output = log.read_text()
    assert "tiles: the process that started it" in output and "tiles: stopped by SIGTERM" in output
    assert _temp_tiles(tiled) == []
    assert _snapshot(tiled / "data" / "tiles") == before


@pytest.mark.slow
def test_sigterm_to_dvc_alone_stops_the_stage_and_leaves_no_temporary_output(
    tmp_path: Path,
) -> None:
    project = copy_project(tmp_path / "project", SLOW_TILES)
    log = tmp_path / "dvc.log"
    dvc = _start(project, ["dvc", "repro", "tiles"], log)
    tmp = _wait_for_writing(project, dvc, log, timeout=240)
    stage = _stage_pid(tmp)
    dvc.send_signal(signal.SIGTERM)
    dvc.wait(timeout=30)

    assert _wait_gone(stage, timeout=15), f"the stage went on after dvc ended:\n{log.read_text()[-3000:]}"
    assert _temp_tiles(project) == []
    assert not (project / "data" / "tiles").exists()  # DVC removed the old output; nothing new
    # The next `dvc repro` recovers.
    run(project, "dvc", "repro", "tiles", timeout=600)
    assert (project / "data" / "tiles" / "tiles.csv").exists()


# --- checkpoints --------------------------------------------------------------------------------


def test_a_failed_checkpoint_save_leaves_the_previous_one_and_nothing_else(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt_dir, elsewhere = tmp_path / "checkpoints", tmp_path / "tmpdir"
    elsewhere.mkdir()
    monkeypatch.setenv("TMPDIR", str(elsewhere))
    monkeypatch.setattr("tempfile.tempdir", None)
    io = AtomicCheckpointIO()
    last = ckpt_dir / "last.ckpt"
    io.save_checkpoint({"epoch": 0, "w": torch.ones(1000)}, last)
    complete = last.read_bytes()
    real_save = torch.save

    def disk_full(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        Path(f).write_bytes(complete[: len(complete) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"epoch": 1, "w": torch.zeros(1000)}, last)
    assert last.read_bytes() == complete
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["last.ckpt"]
    with pytest.raises(OSError):
        io.save_checkpoint({"epoch": 0}, ckpt_dir / "best.ckpt")
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["last.ckpt"]

    monkeypatch.setattr(torch, "save", real_save)
    io.save_checkpoint({"epoch": 2, "w": torch.zeros(1000)}, last)
    assert io.load_checkpoint(last)["epoch"] == 2
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["last.ckpt"]
    assert list(elsewhere.iterdir()) == []


FIT = """
import os, signal, sys
import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from aerialseg.checkpoint_io import AtomicCheckpointIO

class Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
    def training_step(self, batch, index):
        return self.layer(batch[0]).pow(2).mean()
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)
    def train_dataloader(self):
        data = torch.utils.data.TensorDataset(torch.randn(8, 4))
        return torch.utils.data.DataLoader(data, batch_size=4)

out, epochs, kill_at = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
real_save = torch.save
def save(obj, f, *args, **kwargs):
    if obj.get("epoch") == kill_at:  # killed halfway through writing this epoch's checkpoint
        with open(f, "wb") as half:
            half.write(b"PK\\x03\\x04" + bytes(4096))
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *args, **kwargs)
torch.save = save
last = os.path.join(out, "last.ckpt")
trainer = L.Trainer(
    max_epochs=epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
    enable_model_summary=False, plugins=[AtomicCheckpointIO()],
    callbacks=[ModelCheckpoint(dirpath=out, filename="last", save_on_train_epoch_end=True)],
)
trainer.fit(Tiny(), ckpt_path=last if os.path.exists(last) else None)
"""


@pytest.mark.slow
def test_lightning_killed_during_a_checkpoint_save_resumes_from_the_previous_one(tmp_path: Path) -> None:
    ckpt_dir, elsewhere = tmp_path / "checkpoints", tmp_path / "tmpdir"
    elsewhere.mkdir()
    env = {**os.environ, "TMPDIR": str(elsewhere)}

    def fit(epochs: int, kill_at: int = -1) -> subprocess.CompletedProcess[str]:
        args = [sys.executable, "-c", FIT, str(ckpt_dir), str(epochs), str(kill_at)]
        return subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)

    def epoch_of(path: Path) -> int:
        return int(torch.load(path, weights_only=False)["epoch"])

    first = fit(1)
    assert first.returncode == 0, first.stderr[-3000:]
    assert epoch_of(ckpt_dir / "last.ckpt") == 0

    killed = fit(3, kill_at=1)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    # The complete checkpoint of epoch 0 is still there; the half one only under a temporary name.
    assert epoch_of(ckpt_dir / "last.ckpt") == 0
    leftovers = sorted(p.name for p in ckpt_dir.iterdir() if p.name != "last.ckpt")
    assert len(leftovers) == 1 and leftovers[0].startswith(".last.tmp-"), leftovers
    assert list(elsewhere.iterdir()) == []

    resumed = fit(3)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert epoch_of(ckpt_dir / "last.ckpt") == 2
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["last.ckpt"]  # the leftover is gone
    assert list(elsewhere.iterdir()) == []


def test_train_gives_the_trainer_the_atomic_checkpoint_io(
    patches_dir: Path, small_params: Callable[..., Params], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import lightning

    from aerialseg.training import train

    built: dict[str, Any] = {}

    class Built(Exception):
        pass

    def trainer(**kwargs: Any) -> None:
        built.update(kwargs)
        raise Built

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(lightning, "Trainer", trainer)
    params = small_params(tmp_path, {"paths.patches": patches_dir})
    with pytest.raises(Built):
        train(params)
    assert [type(p) for p in built["plugins"]] == [AtomicCheckpointIO]


# --- the params a stage ran with are the ones DVC records ----------------------------------------


def test_a_stage_whose_params_change_while_it_runs_fails(tiled: Path, tmp_path: Path) -> None:
    """As when a second `dvc exp run` writes its -S values into params.yaml under a running stage."""
    params = tiled / "params.yaml"
    original = params.read_text()
    log = tmp_path / "tiles.log"
    stage = _start(tiled, [sys.executable, "pipeline/tiles.py"], log)
    try:
        _wait_for_writing(tiled, stage, log)
        params.write_text(original + "# a comment changes no value\n")
        time.sleep(0.2)
        params.write_text(original.replace("seed: 0", "seed: 7", 1))
        assert stage.wait(timeout=240) == 1
    finally:
        params.write_text(original)
    lines = log.read_text().strip().splitlines()
    assert lines[-2].startswith("tiles: params.yaml changed while this stage ran (another `dvc exp run`")
    assert "dvc exp run --queue" in lines[-2]


def test_only_values_count_as_a_change_of_params(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from aerialseg.stage import _params_digest

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("train:\n  seed: 0\n")
    before = _params_digest()
    (tmp_path / "params.yaml").write_text("# comments and layout are not values\ntrain: {seed: 0}\n")
    assert _params_digest() == before
    (tmp_path / "params.yaml").write_text("train:\n  seed: 1\n")
    assert _params_digest() != before
