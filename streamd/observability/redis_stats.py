"""The Redis figures of the pipeline, read in one round trip by `streamd monitor` and by the
metrics child at every scrape: XLEN of the stream and of the dead stream, and the group's entry
in XINFO GROUPS (pending, lag, consumers, entries read)."""

from __future__ import annotations

from dataclasses import dataclass

import redis.asyncio as aioredis
import redis.exceptions

from streamd.backends.redis_acl import Need, database_needs
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
    return stats


def monitor_needs(settings: Settings) -> list[Need]:
    """What `streamd monitor` (and the monitor API) runs in Redis, for its minimal ACL."""
    return [
        *database_needs(settings),
        Need("client|setname"),
        Need("xlen", settings.stream),
        Need("xlen", settings.dead_stream),
        Need("xinfo|groups", settings.stream),
    ]
