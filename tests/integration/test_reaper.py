"""The reaper against real Redis and Postgres: reclaiming entries of dead consumers, poison to the
DLQ, deleting idle consumers, trimming, and leaving a live slow consumer's batch alone."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson
import pytest
import redis.asyncio as aioredis

from streamd.backends.connections import postgres_pool, redis_client
from streamd.backends.preflight import preflight
from streamd.backends.redis_groups import command
from streamd.config.settings import Settings
from streamd.pipeline.batch import BatchWriter
from streamd.pipeline.sink import PostgresSink
from streamd.pipeline.streams import GroupStream
from streamd.worker.reaper import (
    ADOPT_MIN_IDLE_MS,
    DELETE_IF_IDLE,
    Reaper,
    dead_local_pid,
    next_id,
)
from tests.support.helpers import async_wait_until, event

pytestmark = pytest.mark.timeout(60)


@dataclass
class Rig:
    """Real clients and a BatchWriter, built like a worker builds them."""

    settings: Settings
    redis: aioredis.Redis
    pool: asyncpg.Pool
    writer: BatchWriter

    def stream(self, consumer: str) -> GroupStream:
        s = self.settings
        return GroupStream(
            self.redis,
            stream=s.stream,
            group=s.group,
            consumer=consumer,
            dead_stream=s.dead_stream,
            dead_maxlen=s.dlq_stream_maxlen,
        )

    def reaper(self, name: str = "reaper") -> Reaper:
        return Reaper(self.settings, self.redis, self.stream(f"test:{name}"), self.writer)

    async def add(self, n: int, start: int = 0) -> list[bytes]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for i in range(start, start + n):
                pipe.xadd(self.settings.stream, event("t", {"i": i}))  # type: ignore[arg-type]
            ids: list[bytes] = await pipe.execute()
        return ids

    async def read_as(self, consumer: str, count: int = 10_000, group: str = "") -> list[Any]:
        """XREADGROUP as a foreign consumer that will never acknowledge (a dead process)."""
        s = self.settings
        reply = await command(
            self.redis, "XREADGROUP", "GROUP", group or s.group, consumer,
            "COUNT", count, "STREAMS", s.stream, ">",
        )  # fmt: skip
        if not reply:
            return []
        return next(iter(reply.values())) if isinstance(reply, dict) else reply[0][1]  # RESP3/2

    async def rows(self) -> tuple[int, int]:
        table = self.settings.events_table
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(
                f'SELECT count(*) AS n, count(DISTINCT entry_id) AS d FROM "{table}"'
            )
        return int(row["n"]), int(row["d"])

    async def pending(self) -> int:
        summary = await self.redis.xpending(self.settings.stream, self.settings.group)
        return int(summary["pending"])

    async def consumers(self) -> dict[str, dict[str, Any]]:
        infos = await self.redis.xinfo_consumers(self.settings.stream, self.settings.group)
        return {_text(i["name"]): i for i in infos}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@pytest.fixture
async def make_rig(make_settings: Callable[..., Settings]) -> AsyncIterator[Callable[..., Any]]:
    made: list[Rig] = []

    async def make(**overrides: Any) -> Rig:
        overrides.setdefault("claim_min_idle_ms", 100)
        overrides.setdefault("batch_size", 50)
        settings = make_settings(**overrides)
        await preflight(settings)  # schema and group, as serve does
        pool = await postgres_pool(settings, size=4)
        sink = PostgresSink(settings.stream, settings.events_table, settings.dlq_table)
        rig = Rig(settings, redis_client(settings), pool, BatchWriter(settings, pool, sink))
        made.append(rig)
        return rig

    yield make
    for rig in made:
        await rig.redis.aclose()
        await rig.pool.close()


async def reclaim_until(reaper: Reaper, rig: Rig, rows: int) -> None:
    """Run reclaim rounds (each entry becomes claimable after claim_min_idle_ms) until `rows`."""

    async def done() -> bool:
        await reaper.reclaim()
        return (await rig.rows())[0] >= rows

    await async_wait_until(done, timeout=15, interval=0.05)


async def reclaim_some(reaper: Reaper) -> int:
    """Reclaim rounds until one handles something (after claim_min_idle_ms)."""
    return await async_wait_until(reaper.reclaim, timeout=15, interval=0.05)


# --- reclaim ----------------------------------------------------------------------------------


async def test_reclaims_and_ingests_entries_of_a_dead_consumer(make_rig: Any) -> None:
    rig: Rig = await make_rig()
    await rig.add(230)
    held = await rig.read_as("ghost-host:4242:0")
    assert len(held) == 230
    assert await rig.pending() == 230

    await reclaim_until(rig.reaper(), rig, 230)

    assert await rig.rows() == (230, 230)
    assert await rig.pending() == 0


def dead_pid() -> int:
    """The pid of a process that has exited (and been waited for)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


async def test_adopts_at_once_what_a_dead_local_process_held(make_rig: Any) -> None:
    rig: Rig = await make_rig(claim_min_idle_ms=600_000)  # XAUTOCLAIM would wait 10 minutes
    s = rig.settings
    host = socket.gethostname()
    dead = f"{host}:{dead_pid()}:0"
    dead_idle = f"{host}:{dead_pid()}:1"
    alive = f"{host}:{os.getppid()}:0"  # our parent: a live process of this host
    elsewhere = f"another-{host}:{dead_pid()}:0"
    await rig.add(120)
    assert len(await rig.read_as(dead, count=100)) == 100
    await rig.read_as(alive, count=10)
    await rig.read_as(elsewhere, count=10)
    await rig.redis.xgroup_createconsumer(s.stream, s.group, dead_idle)
    reaper = Reaper(s, rig.redis, rig.stream(f"{host}:{os.getpid()}:reaper"), rig.writer)
    await asyncio.sleep(ADOPT_MIN_IDLE_MS / 1000 + 0.1)

    assert await reaper.adopt_dead_local_consumers() == 100

    assert await rig.rows() == (100, 100)
    assert await rig.pending() == 20
    left = await rig.consumers()
    assert int(left[alive]["pending"]) == 10  # a live process's entries are its own
    assert int(left[elsewhere]["pending"]) == 10  # another host's pids are not ours to judge
    assert dead not in left and dead_idle not in left  # dead consumers are deleted
    assert reaper.reclaimed == 100


async def test_reapers_racing_to_adopt_split_the_entries(make_rig: Any) -> None:
    rig: Rig = await make_rig(claim_min_idle_ms=600_000, batch_size=20)
    host = socket.gethostname()
    await rig.add(300)
    await rig.read_as(f"{host}:{dead_pid()}:0")
    reapers = [
        Reaper(rig.settings, rig.redis, rig.stream(f"{host}:{os.getpid()}:r{i}"), rig.writer)
        for i in range(3)
    ]
    await asyncio.sleep(ADOPT_MIN_IDLE_MS / 1000 + 0.1)
    await asyncio.gather(*(r.adopt_dead_local_consumers() for r in reapers))
    assert await rig.rows() == (300, 300)
    assert await rig.pending() == 0
    assert sum(r.reclaimed for r in reapers) == 300  # each entry claimed by one reaper only


def test_dead_local_pid_reads_only_this_hosts_gone_processes() -> None:
    gone = dead_pid()
    assert dead_local_pid(f"h:{gone}:0", "h") == gone
    assert dead_local_pid(f"h:{gone}:reaper", "h") == gone
    assert dead_local_pid(f"h:{os.getpid()}:0", "h") is None
    assert dead_local_pid(f"other:{gone}:0", "h") is None
    assert dead_local_pid(f"h:{gone}:0", None) is None
    assert dead_local_pid("h:1:0", "h") is None  # init: never ours
    for odd in ("h", "h:x:0", "test:r0", f"a:b:h:{gone}"):
        assert dead_local_pid(odd, "h") is None


async def test_entries_are_not_reclaimed_before_claim_min_idle(make_rig: Any) -> None:
    rig: Rig = await make_rig(claim_min_idle_ms=60_000)
    await rig.add(10)
    await rig.read_as("ghost:1:0")
    assert await rig.reaper().reclaim() == 0
    assert await rig.pending() == 10
    assert (await rig.consumers())["ghost:1:0"]["pending"] == 10


async def test_concurrent_reapers_ingest_each_entry_exactly_once(make_rig: Any) -> None:
    # claim_min_idle_ms well above a 20-row flush even on a busy machine: a reclaimed batch's
    # lease is renewed only every claim_min_idle_ms / 3, and at 100 ms a stalled event loop let
    # a second reaper take over a batch still being flushed (a double count, never a double row).
    rig: Rig = await make_rig(batch_size=20, claim_min_idle_ms=1000)
    await rig.add(500)
    await rig.read_as("ghost:1:0")
    reapers = [rig.reaper(f"r{i}") for i in range(4)]

    async def race() -> bool:
        await asyncio.gather(*(r.reclaim() for r in reapers))
        return (await rig.rows())[0] >= 500

    await async_wait_until(race, timeout=20, interval=0.05)
    assert await rig.rows() == (500, 500)
    assert await rig.pending() == 0
    assert sum(r.reclaimed for r in reapers) == 500  # XAUTOCLAIM hands each entry to one reaper


async def test_pending_entry_deleted_from_the_stream_is_dropped_from_the_pel(
    make_rig: Any,
) -> None:
    rig: Rig = await make_rig()
    ids = await rig.add(5)
    await rig.read_as("ghost:1:0")
    await rig.redis.xdel(rig.settings.stream, ids[0])
    await reclaim_until(rig.reaper(), rig, 4)
    assert await rig.rows() == (4, 4)
    assert await rig.pending() == 0


# --- poison -----------------------------------------------------------------------------------


async def test_poison_entry_goes_to_the_dlq_after_max_deliveries(make_rig: Any) -> None:
    rig: Rig = await make_rig(max_deliveries=3)
    s = rig.settings
    ids = await rig.add(6)
    poison = ids[2]
    await rig.read_as("ghost:1:0")  # every entry delivered once
    for n in range(2):  # consumers that took it over and died too: delivered 3 times
        await command(rig.redis, "XCLAIM", s.stream, s.group, f"ghost:{n + 2}:0", 0, poison)

    await reclaim_until(rig.reaper(), rig, 5)  # the reaper's claim is delivery 4 > 3

    assert await rig.rows() == (5, 5)
    assert await rig.pending() == 0
    async with rig.pool.acquire() as conn:
        dead = await conn.fetch(f'SELECT entry_id, reason, deliveries FROM "{s.dlq_table}"')
        stored = await conn.fetchval(
            f'SELECT count(*) FROM "{s.events_table}" WHERE entry_id = $1', poison.decode()
        )
    assert [(r["entry_id"], r["reason"], r["deliveries"]) for r in dead] == [
        (poison.decode(), "poison", 4)
    ]
    assert stored == 0
    letters = await rig.redis.xrange(s.dead_stream)
    assert [fields[b"entry_id"] for _id, fields in letters] == [poison]
    letter = fields_of(letters[0][1])
    assert letter["reason"] == "poison"
    assert orjson.loads(letter["fields"])["type"] == "t"  # the raw entry, for a replay


def fields_of(raw: dict[bytes, bytes]) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in raw.items()}


async def test_entries_below_max_deliveries_are_ingested_not_dead_lettered(
    make_rig: Any,
) -> None:
    rig: Rig = await make_rig(max_deliveries=3)
    s = rig.settings
    ids = await rig.add(3)
    await rig.read_as("ghost:1:0")
    await command(rig.redis, "XCLAIM", s.stream, s.group, "ghost:2:0", 0, ids[0])  # 2 deliveries
    await reclaim_until(rig.reaper(), rig, 3)  # the reaper's claim is delivery 3: still allowed
    assert await rig.rows() == (3, 3)
    assert await rig.redis.xlen(s.dead_stream) == 0


# --- consumers --------------------------------------------------------------------------------


async def test_deletes_idle_consumers_that_own_nothing(make_rig: Any) -> None:
    rig: Rig = await make_rig(consumer_idle_delete_ms=300, claim_min_idle_ms=60_000)
    s = rig.settings
    await rig.add(1)
    await rig.read_as("holder:1:0")  # idle, but owns an entry
    await rig.redis.xgroup_createconsumer(s.stream, s.group, "gone:2:0")

    async def both_idle() -> bool:
        infos = await rig.consumers()
        return all(int(infos[n]["idle"]) > 300 for n in ("holder:1:0", "gone:2:0"))

    await async_wait_until(both_idle, timeout=10)
    await rig.redis.xgroup_createconsumer(s.stream, s.group, "fresh:3:0")

    deleted = await rig.reaper().delete_idle_consumers()

    assert deleted == ["gone:2:0"]
    assert set(await rig.consumers()) == {"holder:1:0", "fresh:3:0"}
    assert await rig.pending() == 1


async def test_consumer_delete_script_refuses_a_consumer_that_owns_entries(
    make_rig: Any,
) -> None:
    """The Python pre-check can be stale (the consumer read something a moment ago): the script
    checks again, atomically, inside Redis."""
    rig: Rig = await make_rig()
    s = rig.settings
    await rig.add(1)
    await rig.read_as("holder:1:0")
    reply = await DELETE_IF_IDLE.call(rig.redis, keys=[s.stream], args=[s.group, "holder:1:0"])
    assert reply == -1
    assert "holder:1:0" in await rig.consumers()


# --- trim -------------------------------------------------------------------------------------


async def ack_all(rig: Rig, entries: list[Any], group: str = "") -> None:
    ids = [e[0] for e in entries]
    for i in range(0, len(ids), 500):
        await rig.redis.xack(rig.settings.stream, group or rig.settings.group, *ids[i : i + 500])


async def test_trim_keeps_every_entry_any_group_still_needs(make_rig: Any) -> None:
    rig: Rig = await make_rig()
    s = rig.settings
    ids = await rig.add(1000)
    await ack_all(rig, await rig.read_as("a:1:0", count=600))  # group 1: 600 done, 400 unread
    await rig.redis.xgroup_create(s.stream, "other", id="0")
    other = await rig.read_as("b:1:0", count=300, group="other")
    await ack_all(rig, other[:200], group="other")  # group 2: the 201st entry still pending

    reaper = rig.reaper()
    assert await reaper.oldest_needed_id() == ids[200].decode()
    await reaper.trim()

    kept = await rig.redis.xrange(s.stream, min=ids[200])
    assert len(kept) == 800  # everything from the oldest needed entry on
    assert await rig.redis.xlen(s.stream) < 1000  # and whole nodes below it are gone


async def test_trim_bounds_the_stream_once_everything_is_acknowledged(make_rig: Any) -> None:
    rig: Rig = await make_rig()
    s = rig.settings
    # More than one approximate XTRIM does per call (Redis caps it at ~10,000 entries of work).
    await rig.add(25_000)
    await ack_all(rig, await rig.read_as("a:1:0", count=30_000))
    reaper = rig.reaper()
    await reaper.trim()
    # MINID ~ removes whole radix-tree nodes (stream-node-max-entries, 100 by default).
    assert await rig.redis.xlen(s.stream) <= 100
    ids = await rig.add(1, start=25_000)
    assert await rig.redis.xrange(s.stream, min=ids[0]) != []  # the unread entry is kept


async def test_trim_without_groups_or_when_disabled_removes_nothing(make_rig: Any) -> None:
    rig: Rig = await make_rig(trim=False)
    s = rig.settings
    await rig.add(300)
    await ack_all(rig, await rig.read_as("a:1:0"))
    await rig.reaper().run_once()
    assert await rig.redis.xlen(s.stream) == 300
    await rig.redis.xgroup_destroy(s.stream, s.group)
    assert await rig.reaper().oldest_needed_id() is None


def test_next_id() -> None:
    assert next_id("1700000000000-7") == "1700000000000-8"
    assert next_id("0-0") == "0-1"


# --- leases -----------------------------------------------------------------------------------


async def test_live_slow_consumer_keeps_its_batch(make_rig: Any) -> None:
    """A flush stuck behind a table lock renews its claim (XCLAIM JUSTID), so reapers running all
    along take nothing, and the delivery counter never moves."""
    rig: Rig = await make_rig(claim_min_idle_ms=300)
    s = rig.settings
    await rig.add(40)
    slow = rig.stream("slow:1:0")
    entries = await rig.read_as("slow:1:0")
    reaper = rig.reaper()
    async with rig.pool.acquire() as locker:
        tx = locker.transaction()
        await tx.start()
        await locker.execute(f'LOCK TABLE "{s.events_table}" IN ACCESS EXCLUSIVE MODE')
        flush = asyncio.create_task(rig.writer.flush(slow, entries, _Quiet()))
        deadline = time.monotonic() + 5 * s.claim_min_idle_ms / 1000
        while time.monotonic() < deadline:  # several claim_min_idle_ms periods, reaping all along
            assert await reaper.reclaim() == 0
            await asyncio.sleep(0.05)
        assert not flush.done()
        detail = await rig.redis.xpending_range(s.stream, s.group, "-", "+", 100)
        assert {_text(d["consumer"]) for d in detail} == {"slow:1:0"}
        assert {int(d["times_delivered"]) for d in detail} == {1}
        await tx.rollback()
    await asyncio.wait_for(flush, timeout=10)
    assert await rig.rows() == (40, 40)
    assert await rig.pending() == 0
    assert reaper.reclaimed == 0


class _Quiet:
    """A logger for direct BatchWriter calls."""

    def __getattr__(self, _name: str) -> Callable[..., None]:
        return lambda *_a, **_k: None


async def test_slow_poison_batch_is_not_taken_over_by_another_reaper(make_rig: Any) -> None:
    """A batch of nothing but poison still renews its claim while its DLQ write is slow."""
    rig: Rig = await make_rig(claim_min_idle_ms=300, max_deliveries=1)
    s = rig.settings
    ids = await rig.add(3)
    await rig.read_as("ghost:1:0")
    await command(rig.redis, "XCLAIM", s.stream, s.group, "ghost:2:0", 0, *ids)  # 2 deliveries
    first, second = rig.reaper("first"), rig.reaper("second")
    async with rig.pool.acquire() as locker:
        tx = locker.transaction()
        await tx.start()
        await locker.execute(f'LOCK TABLE "{s.dlq_table}" IN ACCESS EXCLUSIVE MODE')
        reclaiming = asyncio.create_task(reclaim_some(first))

        async def first_holds_all() -> bool:
            return (await rig.consumers()).get("test:first", {}).get("pending") == 3

        await async_wait_until(first_holds_all, timeout=10)
        deadline = time.monotonic() + 5 * s.claim_min_idle_ms / 1000
        while time.monotonic() < deadline:
            assert await asyncio.wait_for(second.reclaim(), timeout=2) == 0
            await asyncio.sleep(0.05)
        await tx.rollback()
    await asyncio.wait_for(reclaiming, timeout=10)

    async def dead_lettered() -> bool:
        return await rig.pending() == 0

    await async_wait_until(dead_lettered, timeout=10)
    async with rig.pool.acquire() as conn:
        assert await conn.fetchval(f'SELECT count(*) FROM "{s.dlq_table}"') == 3
    assert await rig.redis.xlen(s.dead_stream) == 3
