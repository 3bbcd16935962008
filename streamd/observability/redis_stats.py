"""The Redis figures of the pipeline, read in one round trip by `streamd monitor` and by the
metrics child at every scrape: XLEN of each stream and of its dead stream, and the group's entry
in XINFO GROUPS (pending, lag, consumers, entries read).

`read_streams_stats` reads every configured stream (names, and patterns resolved with SCAN, at
most MAX_STREAMS) in one pipelined round trip; `read_redis_stats` is the one-stream form."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions

from streamd.backends.discovery import Resolved, resolve_streams
from streamd.backends.redis_acl import Need, database_needs
from streamd.common.entry_ids import id_ms, next_id
from streamd.common.text import as_text
from streamd.config.settings import Settings
from streamd.config.tables import is_pattern


@dataclass(slots=True)
class RedisStats:
    stream_length: int = 0
    dlq_length: int | None = 0  # None: Redis refused XLEN on it (only with dead_stream_optional)
    pending: int | None = None  # None: the group does not exist
    lag: int | None = None  # None: no group, or Redis cannot tell (before 7.0, after XDEL)
    consumers: int = 0
    entries_read: int | None = None
    last_delivered_id: str | None = None  # the group's; None: no group
    exists: bool = True  # False: no such key (XLEN 0, no group)
    error: str | None = None  # read_streams_stats: why this stream has no figures (wrong type)

    @property
    def done(self) -> int | None:
        """Entries the group has read and acknowledged (a rate is its change): None if unknown."""
        if self.entries_read is None or self.pending is None:
            return None
        return max(0, self.entries_read - self.pending)


@dataclass(slots=True)
class BacklogAges:
    """How old, in seconds of Redis' clock, the oldest entries still to do are: read from their
    entry IDs (`<ms>-<seq>`), so they mean the same at any event rate. 0 when there is none."""

    lag_s: float  # the oldest entry not yet delivered to the group
    pending_age_s: float  # the oldest entry delivered but not acknowledged


def dead_stream_of(settings: Settings, stream: str) -> str:
    """The dead stream of one consumed stream, as serve writes it (Settings.dead_stream_for)."""
    return settings.dead_stream_for(stream)


async def configured_streams(client: aioredis.Redis, settings: Settings) -> Resolved:
    """The streams settings name: exact names as given, patterns resolved (SCAN TYPE stream)."""
    return await resolve_streams(client, settings.stream_names, dead_stream=settings.dead_stream)


async def read_redis_stats(
    client: aioredis.Redis,
    settings: Settings,
    *,
    dead_stream_optional: bool = False,
    stream: str | None = None,
) -> RedisStats:
    """The figures of one stream (settings.stream unless given), its dead stream and the group.

    A stream that does not exist yet has length 0 and no group. An error reply about the stream
    (a key of another type) is raised; so is one about the dead stream, unless
    dead_stream_optional (a scrape keeps the other figures and leaves dlq_length None).
    """
    name = settings.stream if stream is None else stream
    async with client.pipeline(transaction=False) as pipe:
        _queue_stats(pipe, settings, name)
        replies = await pipe.execute(raise_on_error=False)
    return _parse_stats(settings, replies, dead_stream_optional=dead_stream_optional)


async def read_streams_stats(
    client: aioredis.Redis, settings: Settings, streams: list[str] | tuple[str, ...]
) -> dict[str, RedisStats]:
    """The figures of every stream given, in one pipelined round trip. A stream Redis refuses
    (a key of another type) gets RedisStats(error=...), not an exception; a dead stream Redis
    refuses leaves dlq_length None."""
    if not streams:
        return {}
    async with client.pipeline(transaction=False) as pipe:
        for name in streams:
            _queue_stats(pipe, settings, name)
        replies = await pipe.execute(raise_on_error=False)
    out: dict[str, RedisStats] = {}
    for i, name in enumerate(streams):
        try:
            out[name] = _parse_stats(
                settings, replies[3 * i : 3 * i + 3], dead_stream_optional=True
            )
        except redis.exceptions.RedisError as exc:
            out[name] = RedisStats(exists=True, error=str(exc).split("\n")[0][:200])
    return out


def _queue_stats(pipe: Any, settings: Settings, stream: str) -> None:
    pipe.xlen(stream)
    pipe.xlen(dead_stream_of(settings, stream))
    pipe.xinfo_groups(stream)


def _parse_stats(
    settings: Settings, replies: list[Any], *, dead_stream_optional: bool
) -> RedisStats:
    length, dead, groups = replies
    if isinstance(length, Exception):
        raise length
    if isinstance(dead, Exception) and not dead_stream_optional:
        raise dead
    stats = RedisStats(
        stream_length=int(length), dlq_length=None if isinstance(dead, Exception) else int(dead)
    )
    if isinstance(groups, redis.exceptions.ResponseError):
        stats.exists = False  # no such stream yet
        return stats
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
    client: aioredis.Redis, settings: Settings, stats: RedisStats, *, stream: str | None = None
) -> BacklogAges | None:
    """The ages of the group's oldest undelivered and oldest pending entries (one round trip,
    after read_redis_stats gave the group's last delivered ID); None when there is no group.

    Ages are measured on Redis' own clock (TIME), the clock that made the IDs, so a skew between
    this host and Redis' does not show up as lag."""
    name = settings.stream if stream is None else stream
    return (await read_streams_ages(client, settings, {name: stats})).get(name)


async def read_streams_ages(
    client: aioredis.Redis, settings: Settings, stats: dict[str, RedisStats]
) -> dict[str, BacklogAges]:
    """read_backlog_ages for many streams in one round trip (those with a group only)."""
    grouped = [(name, s.last_delivered_id) for name, s in stats.items() if s.last_delivered_id]
    if not grouped:
        return {}
    async with client.pipeline(transaction=False) as pipe:
        pipe.time()
        for name, last_delivered in grouped:
            # The first entry after the last delivered one: the oldest no consumer has seen.
            pipe.xrange(name, min=next_id(str(last_delivered)), count=1)
            pipe.xpending(name, settings.group)
        now, *replies = await pipe.execute()
    now_ms = int(now[0]) * 1000 + int(now[1]) // 1000
    out: dict[str, BacklogAges] = {}
    for i, (name, _) in enumerate(grouped):
        undelivered, pending = replies[2 * i], replies[2 * i + 1]
        lag_s = _age_s(now_ms, undelivered[0][0]) if undelivered else 0.0
        oldest = pending.get("min") if pending.get("pending") else None
        out[name] = BacklogAges(lag_s, _age_s(now_ms, oldest) if oldest else 0.0)
    return out


REDELIVERY_SAMPLE = 100  # oldest pending entries per stream looked at for redeliveries
DETAIL_STREAMS = 100  # streams looked at for redeliveries and active consumers, per call
ACTIVE_CONSUMER_MS = 60_000  # a consumer that tried to read within this is alive


async def read_group_details(
    client: aioredis.Redis, group: str, stats: dict[str, RedisStats]
) -> tuple[dict[str, int], dict[str, int]]:
    """One round trip over the streams with consumers: (redelivered, active consumers).

    Redelivered: of a stream's oldest pending entries, those delivered more than once (a
    batch that failed and was retried, or reclaimed from a dead consumer). Active: consumers
    that tried to read within ACTIVE_CONSUMER_MS; a dead serve's stay listed until reaped."""
    grouped = [name for name, s in stats.items() if s.consumers][:DETAIL_STREAMS]
    if not grouped:
        return {}, {}
    async with client.pipeline(transaction=False) as pipe:
        for name in grouped:
            pipe.xinfo_consumers(name, group)
            pipe.xpending_range(name, group, "-", "+", REDELIVERY_SAMPLE)
        replies = await pipe.execute(raise_on_error=False)
    redelivered: dict[str, int] = {}
    active: dict[str, int] = {}
    for i, name in enumerate(grouped):
        consumers, pending = replies[2 * i], replies[2 * i + 1]
        if not isinstance(consumers, Exception):
            active[name] = sum(1 for c in consumers if int(c["idle"]) < ACTIVE_CONSUMER_MS)
        if not isinstance(pending, Exception):
            redelivered[name] = sum(1 for e in pending if int(e["times_delivered"]) > 1)
    return redelivered, active


def sum_stats(stats: list[RedisStats | None]) -> RedisStats:
    """Totals over the streams: a figure no stream knows stays None."""
    known = [s for s in stats if s is not None and s.error is None]

    def total(values: list[int | None]) -> int | None:
        present = [v for v in values if v is not None]
        return sum(present) if present else None

    return RedisStats(
        stream_length=sum(s.stream_length for s in known),
        dlq_length=total([s.dlq_length for s in known]),
        pending=total([s.pending for s in known]),
        lag=total([s.lag for s in known]),
        consumers=sum(s.consumers for s in known),
        exists=any(s.exists for s in known),
    )


def _age_s(now_ms: int, entry_id: bytes | str) -> float:
    # An ID from a producer clock ahead of Redis' (explicit IDs) is 0 s old, not negative.
    return max(0.0, (now_ms - id_ms(as_text(entry_id))) / 1000)


def monitor_needs(settings: Settings) -> list[Need]:
    """What `streamd monitor` (and the monitor API) runs in Redis, for its minimal ACL. A
    pattern stands for the keys it matches (ACL key patterns are globs too)."""
    needs = [*database_needs(settings), Need("client|setname")]
    if any(is_pattern(name) for name in settings.stream_names):
        needs.append(Need("scan"))
    for name in settings.stream_names:
        dead = dead_stream_of(settings, name)
        needs += [Need("xlen", name), Need("xlen", dead), Need("xinfo|groups", name)]
        needs += [
            Need("xinfo|consumers", name, effect="no count of active consumers"),
            Need("xpending", name, effect="no count of redelivered entries"),
        ]
    return needs
