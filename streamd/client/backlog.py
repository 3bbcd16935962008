"""Backpressure for the producer: a call waits while the consumer group's backlog is at or above
max_backlog, and raises BacklogFull once it has waited backlog_timeout_s."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import redis.asyncio as aioredis
import redis.exceptions

from streamd.client.errors import BacklogFull
from streamd.common.backoff import Backoff

# A call held by backpressure measures the backlog again after 5 ms, 10 ms, ... 0.5 s.
BACKLOG_POLL_INITIAL_S = 0.005
BACKLOG_POLL_MAX_S = 0.5


@dataclasses.dataclass(slots=True)
class BacklogGate:
    """Admits calls while the backlog is below max_backlog, measuring it only when needed."""

    client: aioredis.Redis
    stream: str
    group: str | None
    max_backlog: int
    timeout_s: float
    check_interval_s: float
    _estimate: int = 0
    _checked_at: float = float("-inf")
    _lock: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)

    async def admit(self, count: int) -> None:
        fresh = time.monotonic() - self._checked_at < self.check_interval_s
        if fresh and self._estimate < self.max_backlog:
            self._estimate += count  # what this producer adds; others show at the next check
            return
        async with self._lock:
            deadline = time.monotonic() + self.timeout_s
            backoff = Backoff(
                BACKLOG_POLL_INITIAL_S, BACKLOG_POLL_MAX_S, healthy_after_s=None, jitter=False
            )
            while True:
                backlog = await measure_backlog(self.client, self.stream, self.group)
                self._checked_at = time.monotonic()
                if backlog < self.max_backlog:
                    self._estimate = backlog + count
                    return
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise BacklogFull(
                        f"stream {self.stream!r}: backlog {backlog} stayed at or above "
                        f"max_backlog {self.max_backlog} for {self.timeout_s:g}s; nothing was "
                        "written (is streamd serve running and keeping up?)",
                        backlog,
                    )
                # The last check is at the deadline.
                await asyncio.sleep(min(backoff.next_delay(), remaining))


async def measure_backlog(client: aioredis.Redis, stream: str, group: str | None) -> int:
    """Entries the group has not committed yet: lag + pending (Redis >= 7), else XLEN."""
    if group is not None:
        try:
            groups = await client.xinfo_groups(stream)
        except redis.exceptions.ResponseError as exc:
            if "no such key" in str(exc).lower():
                return 0
            raise
        for info in groups:
            name = info.get("name")
            if name in (group, group.encode()) and info.get("lag") is not None:
                return int(info["lag"]) + int(info.get("pending") or 0)
    return int(await client.xlen(stream))
