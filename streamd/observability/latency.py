"""End-to-end latency of a batch, bucketed without a Python step per event: the producer times
are sorted (they arrive nearly sorted, so this is linear, and in C) and each bucket's count is
one bisection. Shared by the Prometheus histogram and the ingest_progress line's percentiles."""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

from streamd.pipeline.envelope import PG_EPOCH_MS

_PG_EPOCH_US = PG_EPOCH_MS * 1000


def cumulative_counts(
    produced_us: list[int], committed_at: float, bounds_s: Sequence[float]
) -> tuple[list[int], float]:
    """For a batch committed at `committed_at` (time.time()) whose rows were produced at
    `produced_us` (microseconds since 2000-01-01, the envelope's clock): per bound, how many rows
    took at most that long, and the sum of their latencies in seconds.

    latency <= bound  <=>  produced >= committed - bound. A producer clock ahead of ours gives a
    negative latency, which counts as 0."""
    committed = committed_at * 1e6 - _PG_EPOCH_US
    produced = sorted(produced_us)
    n = len(produced)
    past = bisect.bisect_right(produced, committed)
    total_s = (committed * past - sum(produced[:past])) / 1e6
    at_most = [n - bisect.bisect_left(produced, committed - b * 1e6) for b in bounds_s]
    return at_most, total_s


# x1.25 steps from 0.1 ms to about an hour: a quantile is known within 25 %.
DIGEST_BOUNDS_S = tuple(0.0001 * 1.25**i for i in range(78))


class LatencyDigest:
    """The latencies of an interval, for its percentiles: counts in geometric buckets."""

    def __init__(self, bounds_s: Sequence[float] = DIGEST_BOUNDS_S) -> None:
        self.bounds_s = tuple(bounds_s)
        self.counts = [0] * (len(self.bounds_s) + 1)  # the last one: above every bound
        self.total = 0

    def add(self, produced_us: list[int], committed_at: float) -> None:
        if not produced_us:
            return
        at_most, _ = cumulative_counts(produced_us, committed_at, self.bounds_s)
        below = 0
        for i, upto in enumerate(at_most):
            self.counts[i] += upto - below
            below = upto
        self.counts[-1] += len(produced_us) - below
        self.total += len(produced_us)

    def quantile(self, q: float) -> float | None:
        """The bucket bound below which a fraction q of the latencies fall (None: no data)."""
        if not self.total:
            return None
        rank = max(1, math.ceil(q * self.total))
        seen = 0
        for i, count in enumerate(self.counts):
            seen += count
            if seen >= rank:
                return self.bounds_s[min(i, len(self.bounds_s) - 1)]
        return self.bounds_s[-1]
