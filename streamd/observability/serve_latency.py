"""End-to-end latency as serve's workers measured it: the `streamd_end_to_end_latency_seconds`
histogram they write (producer time to COMMIT, per event), read by the monitor straight from the
serve's prometheus_client files in `state_dir/metrics-<pid>/` (so only with metrics on, and only
on this host). The percentiles of an interval come from the change of the buckets between two
refreshes; a percentile is known to its bucket: "p99 <= 25 ms"."""

from __future__ import annotations

import math
from pathlib import Path

from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector

from streamd.observability.snapshot import ServeLatency

HISTOGRAM = "streamd_end_to_end_latency_seconds"

Buckets = dict[float, float]  # upper bound (s; inf last) -> cumulative count


def metrics_dir(state_dir: Path, supervisor_pid: int) -> Path:
    return state_dir / f"metrics-{supervisor_pid}"


def read_buckets(directory: Path) -> Buckets | None:
    """The histogram summed over every process (and label) of one serve; None: no such files
    (metrics off, or nothing observed yet)."""
    if not directory.is_dir():
        return None
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))  # type: ignore[no-untyped-call]
    buckets: Buckets = {}
    try:
        families = list(registry.collect())
    except (OSError, ValueError):
        return None  # a file went away, or was half-written, while we read
    for family in families:
        if family.name != HISTOGRAM:
            continue
        for sample in family.samples:
            if sample.name == f"{HISTOGRAM}_bucket":
                bound = float(sample.labels["le"])
                buckets[bound] = buckets.get(bound, 0.0) + sample.value
    return buckets or None


def difference(now: Buckets, before: Buckets | None) -> Buckets:
    if before is None:
        return now
    return {bound: max(0.0, count - before.get(bound, 0.0)) for bound, count in now.items()}


def quantile_ms(buckets: Buckets, q: float) -> float | None:
    """The upper bound (ms) of the bucket holding the q-th latency; None: no events; inf: above
    the last finite bound."""
    bounds = sorted(buckets)
    total = buckets[bounds[-1]] if bounds else 0.0
    if total <= 0:
        return None
    rank = max(1.0, math.ceil(q * total))
    for bound in bounds:
        if buckets[bound] >= rank:
            return bound * 1000
    return math.inf


class LatencyWatch:
    """The serves' histograms from one refresh to the next, for the percentiles of an interval."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self._last: dict[int, Buckets] = {}  # serve pid -> its histogram, last read

    def read(self, pids: list[int]) -> ServeLatency | None:
        """p50/p99 over the last interval when every serve was read before, else since they
        started; None with metrics off (no histogram files)."""
        total: Buckets = {}
        fresh = False
        for pid in pids:
            now = read_buckets(metrics_dir(self.state_dir, pid))
            if now is None:
                continue
            before = self._last.get(pid)
            fresh = fresh or before is None
            self._last[pid] = now
            for bound, count in difference(now, before).items():
                total[bound] = total.get(bound, 0.0) + count
        for pid in set(self._last) - set(pids):
            del self._last[pid]
        if not total:
            return None
        window = "since start" if fresh else "last interval"
        return ServeLatency(quantile_ms(total, 0.5), quantile_ms(total, 0.99), window)
