"""How a pipeline stage runs: one line on an error, cleanup on SIGTERM, no stage outliving its caller.

Every `pipeline/*.py` script runs its `main()` through `run_stage`:

- **Errors.** The library's errors already name the file, key or value and what was expected; a
  traceback of ten library frames above them only hides that line in `dvc repro`'s output.
  `AERIALSEG_TRACEBACK=1` shows it again.
- **SIGTERM cleans up as Ctrl-C does.** It is raised in the main thread as `Terminated` (a
  KeyboardInterrupt), so every `finally` runs: `files.atomic_path` removes its temporary file,
  temporary folders go, Lightning shuts down as on Ctrl-C. The stage then exits with 143.
- **A stage stops when the process that started it is gone.** SIGTERM to `dvc` alone (what
  `timeout dvc repro` and many schedulers send) ends DVC and releases its lock; a stage that went
  on would write `models/` and an MLflow run nobody waits for. A watchdog thread sends the stage
  SIGTERM within 0.2 s of its parent's end (or of the end of DVC above a `sh -c` wrapper),
  and SIGKILL if it is still running a minute later. Not under `nohup` (SIGHUP ignored): that
  asks to outlive the caller.
- **The params a stage ran with are the params DVC records.** DVC writes a stage's params into
  `dvc.lock` when the stage ends, reading `params.yaml` again; a second `dvc exp run` started
  meanwhile writes its `-S` values into that file first, and the first run would be recorded with
  values it never trained with. A stage whose `params.yaml` changed while it ran fails instead, so
  DVC records nothing.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import multiprocessing.util
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

import yaml

from aerialseg.files import clean_leftovers, temp_name
from aerialseg.processes import proc_stat, start_time

TRACEBACK_ENV = "AERIALSEG_TRACEBACK"
"""Set to 1 to see the full traceback of a stage's error."""

PARENT_POLL_SECONDS = 0.2
"""How often the watchdog checks that the stage's parent is still there."""

ORPHAN_GRACE_SECONDS = 60.0
"""How long a stage whose parent is gone may clean up after its SIGTERM before SIGKILL."""

TERMINATED_STATUS = 128 + signal.SIGTERM
"""The exit status of a stage stopped by SIGTERM, as a shell reports a process killed by it."""

SHELLS = frozenset({"sh", "dash", "bash", "zsh", "ksh", "mksh", "fish", "busybox"})
"""Shells that may stand between DVC and the stage (`$SHELL -c <cmd>`, when they do not exec it)."""


PARAMS_FILE = Path("params.yaml")


class ParamsChangedError(RuntimeError):
    """params.yaml changed while a stage ran: its outputs belong to the old values."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread: code that cleans up after Ctrl-C cleans up after it too."""


_terminating = False


def run_stage(main: Callable[[], None]) -> None:
    """Call `main()`; on an error print `<stage>: <message>` to stderr and exit with status 1.

    KeyboardInterrupt and SystemExit pass through untouched (DVC reports an interrupted stage),
    except after SIGTERM: then the stage exits with 143 once everything is cleaned up.
    Errors that are not the library's own (a bug) keep their type in the line.
    """
    stage = Path(sys.argv[0]).stem
    _handle_sigterm()
    _watch_parent(stage)
    clean_project_leftovers()
    try:
        before = _params_digest()
        main()
        if _params_digest() != before:
            raise ParamsChangedError(
                f"{PARAMS_FILE} changed while this stage ran (another `dvc exp run`, or an edit?): its "
                "outputs were made with the old values, and DVC would record the new ones; run "
                "`dvc repro` again. Run experiments in parallel with `dvc exp run --queue` and "
                "`dvc queue start`, or in separate git worktrees"
            )
    except BaseException as err:
        if _terminating:
            print(f"{stage}: stopped by SIGTERM", file=sys.stderr)
            raise SystemExit(TERMINATED_STATUS) from None
        if isinstance(err, KeyboardInterrupt | SystemExit):
            raise
        if not isinstance(err, Exception) or os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
            raise
        ours = ValueError | OSError | KeyError | ParamsChangedError
        kind = "" if isinstance(err, ours) else f"{type(err).__name__}: "
        message = _worker_message(str(err).strip()) or type(err).__name__
        print(f"{stage}: {kind}{message}", file=sys.stderr)
        print(f"({TRACEBACK_ENV}=1 shows the traceback)", file=sys.stderr)
        sys.exit(1)


def _worker_message(text: str) -> str:
    """The error itself, without the worker's traceback that torch's DataLoader puts into the
    message of an error re-raised from a loader worker ("Caught ValueError in DataLoader worker
    process 0.\nOriginal Traceback (most recent call last): ...")."""
    if "\nOriginal Traceback (most recent call last):" not in text:
        return text
    lines = text.splitlines()
    last_frame = max(i for i, line in enumerate(lines) if line.startswith(" "))
    error = "\n".join(lines[last_frame + 1 :])
    kind, _, message = error.partition(": ")
    return message.strip() if kind.replace(".", "").replace("_", "").isalnum() and message else error


def clean_project_leftovers() -> None:
    """Remove what killed processes left: `files.atomic_path` temporaries in every folder that
    holds a stage's output (from dvc.lock), and their private `$TMPDIR` folders; then give this
    process its own `$TMPDIR` folder (MLflow's and Lightning's temporary copies), removed at exit.

    A stage restored from DVC's run cache does not run, so the folders of outputs that only it
    writes would keep a SIGKILLed run's temporary file; any stage's next run removes them.
    """
    folders: set[Path] = set()
    try:
        lock = yaml.safe_load(Path("dvc.lock").read_text()) or {}
    except (OSError, yaml.YAMLError):
        lock = {}
    for entry in (lock.get("stages") or {}).values():
        for out in (entry or {}).get("outs") or []:
            path = Path(str(out.get("path", "")))
            folders.update((path.parent, path) if path.parts else ())
    for folder in sorted(folders):
        if folder.is_dir() and not folder.is_symlink():
            clean_leftovers(folder)
    base = Path(tempfile.gettempdir())
    if base.name == temp_name(base.parent / "aerialseg").name:
        return  # this process has its folder already (a stage called in-process again): no nesting
    clean_leftovers(base)
    # multiprocessing's own folder (the sockets through which loader workers hand over tensors)
    # stays in the base: AF_UNIX paths are limited to 107 bytes, and a socket that cannot be
    # bound loses the batch silently (the loader then waits forever).
    multiprocessing.util.get_temp_dir()
    own = temp_name(base / "aerialseg")
    own.mkdir(exist_ok=True)
    os.environ["TMPDIR"] = tempfile.tempdir = str(own)  # worker and DDP processes inherit it
    atexit.register(shutil.rmtree, own, ignore_errors=True)


def _params_digest() -> str | None:
    """sha256 of the values in params.yaml of the working directory (the stage's project root), as
    DVC compares them: comments and layout do not count. None without a readable file."""
    try:
        values = yaml.safe_load(PARAMS_FILE.read_text())
    except (OSError, yaml.YAMLError):
        return None
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    global _terminating
    if _terminating:
        return  # already unwinding: let the cleanup finish
    _terminating = True
    raise Terminated(signal.Signals(signum).name)


def _handle_sigterm() -> None:
    """SIGTERM raises `Terminated`, unless the stage was started with SIGTERM ignored."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _on_sigterm)


def _watch_parent(stage: str) -> None:
    """Start the watchdog that stops the stage when the process that started it ends."""
    if signal.getsignal(signal.SIGHUP) == signal.SIG_IGN:
        return  # nohup: the caller asked this process to outlive it
    parent = os.getppid()
    # DVC runs `$SHELL -c <cmd>`; bash and zsh exec the command, dash and fish stay between.
    grandparent = _ppid(parent) if _is_shell_wrapper(parent) else None
    threading.Thread(
        target=_watch, args=(stage, parent, grandparent), name="aerialseg-parent-watch", daemon=True
    ).start()


def _watch(stage: str, parent: int, grandparent: int | None) -> None:
    # A parent always starts before its child: one that started later adopted this process,
    # whose own parent ended before the watchdog began.
    gone = _started_after(parent, os.getpid()) or (
        grandparent is not None and _started_after(grandparent, parent)
    )
    while not gone:
        time.sleep(PARENT_POLL_SECONDS)
        gone = os.getppid() != parent or (grandparent is not None and _ppid(parent) != grandparent)
    who = parent if grandparent is None else grandparent
    print(f"{stage}: the process that started it (pid {who}) is gone; stopping", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(ORPHAN_GRACE_SECONDS)
    os.kill(os.getpid(), signal.SIGKILL)


def _ppid(pid: int) -> int | None:
    fields = proc_stat(pid)
    return int(fields[1]) if fields else None


def _started_after(pid: int, child: int) -> bool:
    """Whether process `pid` started after process `child` (so it cannot be its parent)."""
    mine, theirs = start_time(child), start_time(pid)
    if mine is None or theirs is None:
        return False
    return int(theirs) > int(mine)


def _is_shell_wrapper(pid: int) -> bool:
    """Whether `pid` is a non-interactive shell running a command string (`sh -c ...`)."""
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return comm in SHELLS and b"-c" in args
