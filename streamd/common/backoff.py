"""Capped exponential backoff: every wait between attempts in streamd is one of these.

Delays are initial * 2**n, capped. With jitter (the default), "equal jitter": half of each delay
is fixed and half random, so processes that met the same outage do not retry in step. Without it
the sequence is exact, for loops that poll one thing against a deadline (a service still booting,
a backlog draining).
"""

from __future__ import annotations

import random
import time


class Backoff:
    """The delays of one retry sequence. `healthy_after_s`: a fault that comes longer than this
    after the previous one starts the sequence over (None: never)."""

    def __init__(
        self,
        initial_s: float,
        cap_s: float,
        healthy_after_s: float | None = 30.0,
        *,
        jitter: bool = True,
    ) -> None:
        self.initial_s = initial_s
        self.cap_s = cap_s
        self.healthy_after_s = healthy_after_s
        self.jitter = jitter
        self.failures = 0
        self._last_failure = 0.0

    def next_delay(self) -> float:
        if self.healthy_after_s is not None:
            now = time.monotonic()
            # A long healthy stretch since the last fault starts the sequence over.
            if self.failures and now - self._last_failure > self.healthy_after_s:
                self.failures = 0
            self._last_failure = now
        base = min(self.cap_s, self.initial_s * (2 ** min(self.failures, 32)))
        self.failures += 1
        if not self.jitter:
            return float(base)
        return float(base / 2 + random.uniform(0, base / 2))

    def reset(self) -> None:
        self.failures = 0
