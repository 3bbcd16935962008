"""The quiet lane (worker/backlogs.py), in process against real Redis and Postgres: while a
stream has a backlog, the lane consumer keeps to the other streams and commits their entries,
leaving the backlog to the worker's other consumers; every entry lands once, nothing pending."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

import redis.asyncio as aioredis

from streamd.backends.connections import postgres_connect, postgres_pool, redis_client
from streamd.backends.schema import apply_schema
from streamd.config.settings import Settings
from streamd.pipeline.reader import GroupReader
from streamd.pipeline.routes import Routes
from streamd.worker.backlogs import Backlogs
from streamd.worker.consumer import Consumer
from tests.support.helpers import async_wait_until, event

BACKLOG = 3000


@dataclass
class FixedStreams:
    streams: tuple[str, ...]
    refreshes: int = 0


async def rows_of(settings: Settings, stream: str) -> int:
    conn = await postgres_connect(settings)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM events WHERE stream = $1", stream))
    finally:
        await conn.close()


async def count_is(settings: Settings, stream: str, n: int) -> bool:
    return await rows_of(settings, stream) == n


async def entries_read(r: aioredis.Redis, stream: str) -> int:
    (group,) = await r.xinfo_groups(stream)
    return int(group["entries-read"] or 0)


async def test_the_lane_keeps_to_the_quiet_stream_while_another_drains(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(streams=["big", "quiet"], block_ms=200)
    conn = await postgres_connect(settings)
    await apply_schema(conn, settings)
    await conn.close()
    r = aioredis.Redis.from_url(settings.redis_url, decode_responses=True)
    for name in ("big", "quiet"):
        await r.xgroup_create(name, settings.group, id="0", mkstream=True)
    pipe = r.pipeline(transaction=False)
    for i in range(BACKLOG):
        pipe.xadd("big", event("t", {"i": i}))
    await pipe.execute()
    pool = await postgres_pool(settings, size=3)
    client = redis_client(settings, extra_timeout_s=1)
    backlogs = Backlogs()
    backlogs.saw(["big", "quiet"], ["big"])  # as a drainer's full reply of big leaves it

    async def start(name: str, lane: bool) -> tuple[Consumer, asyncio.Task[None]]:
        reader = GroupReader(
            client,
            group=settings.group,
            consumer=name,
            dead_stream_for=settings.dead_stream_for,
            dead_maxlen=settings.dlq_stream_maxlen,
        )
        streams, routes = FixedStreams(("big", "quiet")), Routes(settings, pool)
        consumer = Consumer(settings, reader, streams, routes, backlogs=backlogs, lane=lane)
        return consumer, asyncio.create_task(consumer.run())

    async def stop(consumer: Consumer, task: asyncio.Task[None]) -> None:
        consumer.stop()
        await consumer.reader.unblock()
        await asyncio.wait_for(task, 10)

    try:
        lane, task = await start("test:0", lane=True)
        for i in range(5):
            await r.xadd("quiet", event("t", {"q": i}))
            await asyncio.sleep(0.05)
        await async_wait_until(lambda: count_is(settings, "quiet", 5), timeout=30)
        # Only the quiet stream was read: the backlog is untouched, for the drainers.
        assert await entries_read(r, "big") == 0
        assert await rows_of(settings, "big") == 0
        # A drainer joins: the backlog is drained, while the lane stays ready for the quiet one.
        drainer, drainer_task = await start("test:1", lane=False)
        await async_wait_until(lambda: count_is(settings, "big", BACKLOG), timeout=60)
        await r.xadd("quiet", event("t", {"q": 5}))
        await async_wait_until(lambda: count_is(settings, "quiet", 6), timeout=30)
        await stop(lane, task)
        await stop(drainer, drainer_task)
        assert not backlogs.busy("big")
        for name in ("big", "quiet"):
            assert (await r.xpending(name, settings.group))["pending"] == 0
    finally:
        await client.aclose()
        await pool.close()
        await r.aclose()
