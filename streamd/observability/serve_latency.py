"""End-to-end latency as serve's workers measured it: the `streamd_end_to_end_latency_seconds`
histogram they write (producer time to COMMIT, per event), read by the monitor straight from the
serve's prometheus_client files in `state_dir/metrics-<pid>/` (so only with metrics on, and only
on this host), with the `streamd_write_retries` counter beside it. The percentiles of an interval
come from the change of the buckets between two refreshes; a percentile is known to its bucket:
"p99 <= 25 ms"."""

from __future__ import annotations

import math
from pathlib import Path

from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector

from streamd.observability.snapshot import ServeLatency

HISTOGRAM = "streamd_end_to_end_latency_seconds"
RETRIES = "streamd_write_retries"

Buckets = dict[float, float]  # upper bound (s; inf last) -> cumulative count


def metrics_dir(state_dir: Path, supervisor_pid: int) -> Path:
    return state_dir / f"metrics-{supervisor_pid}"


def read_serve(directory: Path) -> tuple[Buckets, float] | None:
    """The latency histogram and the write retries' count of one serve, summed over its
    processes; None: no such files (metrics off, or nothing observed yet)."""
    if not directory.is_dir():
        return None
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))  # type: ignore[no-untyped-call]
    buckets: Buckets = {}
    retries = 0.0
    try:
        families = list(registry.collect())
    except (OSError, ValueError):
        return None  # a file went away, or was half-written, while we read
    for family in families:
        for sample in family.samples:
            if sample.name == f"{HISTOGRAM}_bucket":
                bound = float(sample.labels["le"])
                buckets[bound] = buckets.get(bound, 0.0) + sample.value
            elif sample.name == f"{RETRIES}_total":
                retries += sample.value
    return (buckets, retries) if buckets else None


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
        self._last: dict[int, tuple[Buckets, float]] = {}  # serve pid -> its figures, last read

    def read(self, pids: list[int]) -> ServeLatency | None:
        """p50/p99 and write retries over the last interval when every serve was read before,
        else since they started; None with metrics off (no histogram files)."""
        total: Buckets = {}
        retries = 0.0
        fresh = False
        for pid in pids:
            now = read_serve(metrics_dir(self.state_dir, pid))
            if now is None:
                continue
            before = self._last.get(pid)
            fresh = fresh or before is None
            self._last[pid] = now
            for bound, count in difference(now[0], before[0] if before else None).items():
                total[bound] = total.get(bound, 0.0) + count
            retries += max(0.0, now[1] - (before[1] if before else 0.0))
        for pid in set(self._last) - set(pids):
            del self._last[pid]
        if not total:
            return None
        window = "since start" if fresh else "last interval"
        return ServeLatency(
            quantile_ms(total, 0.5), quantile_ms(total, 0.99), window, write_retries=int(retries)
        )
