"""The supervisor's status file, `<state_dir>/serve-<pid>.json`, read by `monitor` and `/readyz`.

It is replaced atomically (write a temp file, then rename), so a reader never sees half of it:
  {"pid", "started_at", "stream", "group", "procs", "ready", "state", "restarts",
   "children": [{"index", "pid", "started_at", "ready", "last_heartbeat"}], "updated_at"}
Times are epoch seconds. A file whose pid is no longer alive is left over from a crash.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from streamd.common.procs import pid_alive


def status_path(state_dir: Path, supervisor_pid: int) -> Path:
    return state_dir / f"serve-{supervisor_pid}.json"


def write_status(path: Path, status: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(status, separators=(",", ":")), encoding="utf-8")
    os.replace(tmp, path)


def remove_status(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def read_status(path: Path) -> dict[str, Any] | None:
    """One status file; None when it is missing, or is not a status (removed while we looked, or
    not ours)."""
    try:
        status = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return status if isinstance(status, dict) else None


def read_status_files(state_dir: Path) -> list[dict[str, Any]]:
    """The status of every running supervisor that uses state_dir (files of dead ones skipped)."""
    out: list[dict[str, Any]] = []
    for path in sorted(state_dir.glob("serve-*.json")):
        status = read_status(path)
        if status is not None and pid_alive(int(status.get("pid", 0))):
            out.append(status)
    return out
