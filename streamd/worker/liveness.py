"""Which consumers are alive, as a fact in Redis: each worker keeps a key with a TTL.

A worker's consumers are `<instance_id>:<pid>:<task>` (instance_id: one per serve, chosen at
start, common/instances.py). The worker sets `streamd:live:<group>:<instance_id>:<pid>` with a
TTL of liveness_ttl_s and renews it every TTL/5; it deletes it when it exits cleanly. A reaper
anywhere reads the key of each consumer it sees: no key, and the consumer's worker is dead (killed,
crashed, its host gone, its event loop stalled longer than the TTL), so its pending entries are
taken over at once, without waiting claim_min_idle_ms. Nothing here trusts a hostname or a pid:
two hosts may share a hostname, and containers reuse pids.

A stalled but live worker whose key expired loses its batch to a reaper: the batch is then
written twice and stored once (the unique key), and both XACKs are harmless. Consumer names of
streamd before instance ids (`<host>:<pid>:<task>`) have no key: they are taken for dead, so
upgrade every serve of a group together (stopping one acks what it held first).
"""

from __future__ import annotations

import asyncio
import os
import socket
import time

import redis.asyncio as aioredis

from streamd.backends.faults import TRANSIENT_ERRORS
from streamd.common.aio import wait_event
from streamd.common.instances import new_instance_id
from streamd.config.settings import Settings
from streamd.observability.log import get_logger
from streamd.pipeline.retry import log_fault

KEY_PREFIX = "streamd:live:"
ALIVE_CACHE_S = 0.5  # a reaper round asks about the same consumers for many streams


def worker_prefix(settings: Settings) -> str:
    """`<instance_id>:<pid>`, the start of this worker's consumer names."""
    return f"{settings.instance_id or new_instance_id()}:{os.getpid()}"


def owner_of(consumer: str) -> str:
    """The worker part of a consumer name (`<instance_id>:<pid>`), the task cut off."""
    return consumer.rsplit(":", 1)[0]


def liveness_key(group: str, prefix: str) -> str:
    return f"{KEY_PREFIX}{group}:{prefix}"


class Liveness:
    """This worker's key (`run` renews it) and the view of everyone else's (`alive`)."""

    def __init__(self, settings: Settings, client: aioredis.Redis, prefix: str) -> None:
        self.settings = settings
        self.client = client
        self.prefix = prefix
        self.key = liveness_key(settings.group, prefix)
        self.interval_s = settings.liveness_ttl_s / 5
        self.log = get_logger()
        self._stopping = asyncio.Event()
        self._seen: dict[str, tuple[float, bool]] = {}  # prefix -> (when asked, alive)

    def _value(self) -> str:
        return f"host={socket.gethostname()} pid={os.getpid()}"

    async def renew(self) -> None:
        await self.client.set(self.key, self._value(), px=int(self.settings.liveness_ttl_s * 1000))

    async def run(self) -> None:
        while not self._stopping.is_set():
            try:
                await self.renew()
            except TRANSIENT_ERRORS as exc:
                log_fault(self.log, "liveness", exc, retry_in_s=self.interval_s)
            await wait_event(self._stopping, self.interval_s)

    def stop(self) -> None:
        self._stopping.set()

    async def release(self) -> None:
        """At a clean exit: the key goes now, not a TTL later."""
        await self.client.delete(self.key)

    async def alive(self, consumer: str) -> bool:
        """Whether the worker of this consumer holds its liveness key (asked at most every
        ALIVE_CACHE_S per worker)."""
        prefix = owner_of(consumer)
        if prefix == self.prefix:
            return True
        now = time.monotonic()
        seen = self._seen.get(prefix)
        if seen is not None and now - seen[0] < ALIVE_CACHE_S:
            return seen[1]
        found = bool(await self.client.exists(liveness_key(self.settings.group, prefix)))
        if len(self._seen) > 10_000:
            self._seen.clear()
        self._seen[prefix] = (now, found)
        return found
