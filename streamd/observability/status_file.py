"""The supervisor's status file, `<state_dir>/serve-<pid>.json`, read by `monitor` and `/readyz`.

It is replaced atomically (write a temp file, then rename), so a reader never sees half of it:
  {"pid", "started_at", "stream", "group", "procs", "ready", "state", "restarts",
   "children": [{"index", "pid", "started_at", "ready", "last_heartbeat"}], "updated_at"}
Times are epoch seconds. A file whose pid is no longer alive is left over from a crash; the next
serve that uses the same state_dir deletes it (remove_stale).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import psutil

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
        if status is not None and _serve_alive(status):
            out.append(status)
    return out


_STATE_NAME = re.compile(r"\.?(serve-(\d+)\.json(\.tmp)?|metrics-(\d+))")


def _serve_alive(status: dict[str, Any]) -> bool:
    """The supervisor that wrote `status` still runs: its pid is alive and that process began
    before the status says serve started (else the pid was reused by a later process)."""
    try:
        pid = int(status.get("pid", 0))
        started_at = float(status.get("started_at", 0))
    except (TypeError, ValueError):
        return False
    if not pid_alive(pid):
        return False
    try:
        return bool(psutil.Process(pid).create_time() <= started_at + 1.0)
    except psutil.Error:
        return False


def remove_stale(state_dir: Path, own_pid: int) -> list[str]:
    """Delete what serves on this host that are gone left in state_dir: `serve-<pid>.json`
    (a kill -9 leaves it, and monitor would show it until the pid is reused), its temp file, and
    `metrics-<pid>/`. Returns the names removed. Another running serve's files stay."""
    statuses: dict[int, dict[str, Any]] = {}
    for path in state_dir.glob("serve-*.json"):
        status = read_status(path)
        found = _STATE_NAME.fullmatch(path.name)
        if status is not None and found is not None and found.group(2):
            statuses[int(found.group(2))] = status
    removed: list[str] = []
    for path in state_dir.iterdir():
        found = _STATE_NAME.fullmatch(path.name)
        if found is None:
            continue
        pid = int(found.group(2) or found.group(4))
        if pid == own_pid:
            continue
        status = statuses.get(pid)
        alive = _serve_alive(status) if status is not None else pid_alive(pid)
        if alive:
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        removed.append(path.name)
    return sorted(removed)
