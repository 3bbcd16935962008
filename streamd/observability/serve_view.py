"""The serve processes `streamd monitor` shows: the supervisors' status files of this stream
configuration and group, with CPU and memory per process (psutil)."""

from __future__ import annotations

import time
from typing import Any

import psutil

from streamd.config.settings import Settings
from streamd.observability.snapshot import ProcessStats, ServeStats
from streamd.observability.status_file import read_status_files


class ProcessSampler:
    """CPU percentages need two readings: keep psutil handles from one snapshot to the next."""

    def __init__(self) -> None:
        self._procs: dict[int, psutil.Process] = {}

    def prime(self, pids: list[int]) -> None:
        for pid in pids:
            if pid not in self._procs:
                try:
                    proc = psutil.Process(pid)
                    proc.cpu_percent(None)
                except psutil.Error:
                    continue
                self._procs[pid] = proc

    def sample(self, pid: int, role: str) -> ProcessStats:
        proc = self._procs.get(pid)
        if proc is None:
            return ProcessStats(pid, role, None, None)
        try:
            with proc.oneshot():
                return ProcessStats(pid, role, proc.cpu_percent(None), proc.memory_info().rss)
        except psutil.Error:
            self._procs.pop(pid, None)
            return ProcessStats(pid, role, None, None)

    def forget_except(self, pids: set[int]) -> None:
        for pid in set(self._procs) - pids:
            del self._procs[pid]


def serve_statuses(settings: Settings) -> list[dict[str, Any]]:
    """The running serves of this group that consume what settings name (a serve's status says
    `streams` when it consumes several, `stream` when one)."""
    names = list(settings.stream_names)

    def ours(status: dict[str, Any]) -> bool:
        if status.get("group") != settings.group:
            return False
        if "streams" in status:
            return bool(status["streams"] == names)
        return bool(status.get("stream") == settings.stream)

    return [s for s in read_status_files(settings.resolved_state_dir()) if ours(s)]


def roles(status: dict[str, Any]) -> list[tuple[int, str]]:
    out = [(int(status["pid"]), "supervisor")]
    for child in status.get("children") or []:
        out.append((int(child["pid"]), f"worker {child.get('index', '?')}"))
    if status.get("metrics_pid"):
        out.append((int(status["metrics_pid"]), "metrics"))
    return out


def serve_stats(status: dict[str, Any], sampler: ProcessSampler) -> ServeStats:
    return ServeStats(
        pid=int(status["pid"]),
        state=str(status.get("state", "")),
        ready=bool(status.get("ready")),
        restarts=int(status.get("restarts") or 0),
        uptime_s=round(max(0.0, time.time() - float(status.get("started_at") or 0)), 1),
        processes=[sampler.sample(pid, role) for pid, role in roles(status)],
    )
