"""Whether a process is alive, by pid: status files, the metrics server, the reaper, dev servers."""

from __future__ import annotations

import os
from pathlib import Path


def process_state(pid: int) -> str | None:
    """The process state letter from /proc (Linux), or None if no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rpartition(")")[2].split()[0]


def pid_alive(pid: int) -> bool:
    """True while the process exists and has not exited: a zombie (exited, not yet reaped) is
    dead. A pid of someone else's counts as alive (kill answers EPERM)."""
    if pid <= 0:
        return False  # kill(0) would signal our own process group
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return process_state(pid) not in ("Z", "X")
