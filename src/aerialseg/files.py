"""Write outputs atomically: a crash never leaves a valid-looking half file, nor a leftover for long.

An output is written under a hidden temporary sibling, `.<stem>.tmp-<pid>-<host><suffix>`, and
renamed onto its final name when complete. A process that is killed (SIGKILL, a power cut) cannot
remove its temporary file; the next `atomic_path` in the same directory removes it, once the
process that wrote it is gone.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from aerialseg.processes import pid_exists

_STARTED = time.time()
"""When this process imported the module (about when the stage started)."""

TEMP_PATTERN = re.compile(
    r"^\.(?P<stem>.+)\.tmp-(?P<pid>\d+)(?:-(?P<host>[A-Za-z0-9-]+))?(?P<suffix>(?:\.[^.]*)?)$"
)
"""A temporary name of `atomic_path`; without a host: one written before hosts were recorded."""


def host_tag() -> str:
    """This machine's short host name in file-name characters: a pid means something on its host only
    (several nodes of a cluster may write to one shared project directory)."""
    name = socket.gethostname().split(".")[0]
    return re.sub(r"[^A-Za-z0-9-]", "-", name)[:40] or "localhost"


def temp_name(final: Path, pid: int | None = None) -> Path:
    """The temporary sibling that `atomic_path` writes `final` to in process `pid` (this one)."""
    pid = os.getpid() if pid is None else pid
    return final.with_name(f".{final.stem}.tmp-{pid}-{host_tag()}{final.suffix}")


@contextlib.contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path to write to; rename it onto `final` only on success.

    Works for files and directories. The temporary name keeps the suffix so that libraries
    which pick a format from the extension (rasterio, matplotlib) still do the right thing.
    Leftovers of dead processes in the same directory are removed first (`clean_leftovers`).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(final.parent)
    tmp = temp_name(final)
    _remove(tmp)
    try:
        yield tmp
        if final.is_dir() and not final.is_symlink():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        _remove(tmp)


def clean_leftovers(directory: Path) -> list[Path]:
    """Remove the temporary files and folders of `atomic_path` in `directory` (not below it) that
    a dead process left behind; returns them.

    Removed only when all of these hold, so that a live writer's file is never touched: the name
    records this host (or no host: the older format), the process of the recorded pid does not
    exist, and the file was last modified before this process started. A pid reused by another
    process keeps its leftover until that process ends too.
    """
    host = host_tag()
    removed: list[Path] = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        match = TEMP_PATTERN.match(entry.name)
        if match is None or match["host"] not in (None, host):
            continue
        pid = int(match["pid"])
        if pid == os.getpid() or pid_exists(pid):
            continue
        path = Path(entry.path)
        try:
            if path.lstat().st_mtime >= _STARTED:
                continue
            _remove(path)
        except OSError:
            continue  # gone meanwhile, or not ours to remove
        removed.append(path)
    return removed


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
