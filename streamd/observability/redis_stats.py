"""The Redis figures of the pipeline, read in one round trip by `streamd monitor` and by the
metrics child at every scrape: XLEN of the stream and of the dead stream, and the group's entry
in XINFO GROUPS (pending, lag, consumers, entries read)."""

from __future__ import annotations

from dataclasses import dataclass

import redis.asyncio as aioredis
import redis.exceptions

from streamd.backends.redis_acl import Need, database_needs
from streamd.common.entry_ids import id_ms, next_id
from streamd.common.text import as_text
from streamd.config.settings import Settings


@dataclass(slots=True)
class RedisStats:
    stream_length: int = 0
    dlq_length: int | None = 0  # None: Redis refused XLEN on it (only with dead_stream_optional)
    pending: int | None = None  # None: the group does not exist
    lag: int | None = None  # None: no group, or Redis cannot tell (before 7.0, after XDEL)
    consumers: int = 0
    entries_read: int | None = None
    last_delivered_id: str | None = None  # the group's; None: no group


@dataclass(slots=True)
class BacklogAges:
    """How old, in seconds of Redis' clock, the oldest entries still to do are: read from their
    entry IDs (`<ms>-<seq>`), so they mean the same at any event rate. 0 when there is none."""

    lag_s: float  # the oldest entry not yet delivered to the group
    pending_age_s: float  # the oldest entry delivered but not acknowledged


async def read_redis_stats(
    client: aioredis.Redis, settings: Settings, *, dead_stream_optional: bool = False
) -> RedisStats:
    """The figures of settings.stream, its dead stream and settings.group.

    A stream that does not exist yet has length 0 and no group. An error reply about the stream
    (a key of another type) is raised; so is one about the dead stream, unless
    dead_stream_optional (a scrape keeps the other figures and leaves dlq_length None).
    """
    async with client.pipeline(transaction=False) as pipe:
        pipe.xlen(settings.stream)
        pipe.xlen(settings.dead_stream)
        pipe.xinfo_groups(settings.stream)
        length, dead, groups = await pipe.execute(raise_on_error=False)
    if isinstance(length, Exception):
        raise length
    if isinstance(dead, Exception) and not dead_stream_optional:
        raise dead
    stats = RedisStats(
        stream_length=int(length), dlq_length=None if isinstance(dead, Exception) else int(dead)
    )
    if isinstance(groups, redis.exceptions.ResponseError):
        return stats  # no such stream yet
    if isinstance(groups, Exception):
        raise groups
    for group in groups:
        if as_text(group.get("name")) == settings.group:
            stats.pending = int(group.get("pending") or 0)
            lag = group.get("lag")
            stats.lag = None if lag is None else int(lag)
            stats.consumers = int(group.get("consumers") or 0)
            read = group.get("entries-read")
            stats.entries_read = None if read is None else int(read)
            stats.last_delivered_id = as_text(group.get("last-delivered-id") or "0-0")
    return stats


async def read_backlog_ages(
    client: aioredis.Redis, settings: Settings, stats: RedisStats
) -> BacklogAges | None:
    """The ages of the group's oldest undelivered and oldest pending entries (one round trip,
    after read_redis_stats gave the group's last delivered ID); None when there is no group.

    Ages are measured on Redis' own clock (TIME), the clock that made the IDs, so a skew between
    this host and Redis' does not show up as lag."""
    if stats.last_delivered_id is None:
        return None
    async with client.pipeline(transaction=False) as pipe:
        pipe.time()
        # The first entry after the last delivered one: the oldest that no consumer has seen.
        pipe.xrange(settings.stream, min=next_id(stats.last_delivered_id), count=1)
        pipe.xpending(settings.stream, settings.group)
        now, undelivered, pending = await pipe.execute()
    now_ms = int(now[0]) * 1000 + int(now[1]) // 1000
    lag_s = _age_s(now_ms, undelivered[0][0]) if undelivered else 0.0
    oldest = pending.get("min") if pending.get("pending") else None
    return BacklogAges(lag_s=lag_s, pending_age_s=_age_s(now_ms, oldest) if oldest else 0.0)


def _age_s(now_ms: int, entry_id: bytes | str) -> float:
    # An ID from a producer clock ahead of Redis' (explicit IDs) is 0 s old, not negative.
    return max(0.0, (now_ms - id_ms(as_text(entry_id))) / 1000)


def monitor_needs(settings: Settings) -> list[Need]:
    """What `streamd monitor` (and the monitor API) runs in Redis, for its minimal ACL."""
    return [
        *database_needs(settings),
        Need("client|setname"),
        Need("xlen", settings.stream),
        Need("xlen", settings.dead_stream),
        Need("xinfo|groups", settings.stream),
    ]
