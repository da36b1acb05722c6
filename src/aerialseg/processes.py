"""What this machine says about another process: whether its pid exists, and /proc/<pid>/stat.

One place for the three jobs that ask: removing a dead writer's temporary files (files), stopping
a stage whose caller is gone (stage), and ending MLflow runs whose training process is gone
(tracking).
"""

from __future__ import annotations

import os
from pathlib import Path


def pid_exists(pid: int) -> bool:
    """Whether a process `pid` exists on this machine (another user's included; a zombie too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    except OverflowError:
        return False
    return True


def proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name: [0] the state (`Z` zombie, `X` dead),
    [1] the parent's pid, [19] the start time in clock ticks after boot. None where there is no such
    process, or no /proc (not Linux)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, UnicodeDecodeError):
        return None
    end = text.rfind(")")  # the command name may itself hold spaces and parentheses
    return text[end + 2 :].split() if end >= 0 else None


def start_time(pid: int) -> str | None:
    """When process `pid` started (clock ticks after boot, as text); None where /proc cannot tell.
    With the pid, it names a process even after the pid is reused."""
    fields = proc_stat(pid)
    return fields[19] if fields and len(fields) > 19 else None
