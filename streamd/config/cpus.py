"""How many CPU cores this process may use: the number of workers `--procs auto` starts."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
SELF_CGROUP = Path("/proc/self/cgroup")


def available_cpus(root: Path = CGROUP_ROOT, self_cgroup: Path = SELF_CGROUP) -> int:
    """The cores of this process's affinity mask (taskset, systemd's CPUAffinity=), capped by a
    cgroup CPU quota (docker --cpus, systemd's CPUQuota=) rounded up; at least 1.

    Without the quota, a container allowed 2 CPUs on a 32-core host would start 32 workers that
    take turns on 2 cores, each holding its own Postgres connections."""
    cores = len(os.sched_getaffinity(0))
    limit = cgroup_cpu_limit(root, self_cgroup)
    if limit is not None:
        cores = min(cores, math.ceil(limit))
    return max(1, cores)


def cgroup_cpu_limit(root: Path = CGROUP_ROOT, self_cgroup: Path = SELF_CGROUP) -> float | None:
    """The tightest CPU quota, in cores, on this process's cgroup or any ancestor (cgroup v2 or
    v1); None when there is none or it cannot be read."""
    try:
        lines = self_cgroup.read_text().splitlines()
    except OSError:
        return None
    limits: list[float] = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        read: Callable[[Path], float | None]
        if controllers == "":
            base, read = root, _v2_limit
        elif "cpu" in controllers.split(","):
            base, read = root / controllers, _v1_limit  # mounted as e.g. cpu,cpuacct
            if not base.is_dir():
                base = root / "cpu"
        else:
            continue
        for directory in _self_and_ancestors(base, path):
            limit = read(directory)
            if limit is not None:
                limits.append(limit)
    return min(limits) if limits else None


def _self_and_ancestors(base: Path, path: str) -> list[Path]:
    # Inside a container the path may name the host's hierarchy while the container's own
    # cgroup is mounted at the root: the walk up to the root looks at both.
    relative = Path(path.lstrip("/"))
    candidates = [base / relative, *(base / parent for parent in relative.parents)]
    return [d for d in dict.fromkeys(candidates) if d.is_dir()]


def _v2_limit(directory: Path) -> float | None:
    try:
        quota, period = (directory / "cpu.max").read_text().split()
        if quota == "max":
            return None
        cores = int(quota) / int(period)
    except (OSError, ValueError, ZeroDivisionError):
        return None
    return cores if cores > 0 else None


def _v1_limit(directory: Path) -> float | None:
    try:
        quota = int((directory / "cpu.cfs_quota_us").read_text())
        period = int((directory / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None  # -1: no quota
