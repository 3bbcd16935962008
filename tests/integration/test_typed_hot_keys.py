"""Upserts of hot keys against a real Postgres: several connections writing batches of the same
keys at once (they queue on row locks, taken in key order: never a deadlock, and the newest
entry per key wins), the write that returned is on disk although its COMMIT did not wait for
the flush, and serve says so at start when the role may not wait for it."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import signal
from collections.abc import AsyncIterator, Callable

import asyncpg
import orjson
import pytest

from streamd.backends.connections import postgres_connect
from streamd.backends.schema import apply_schema
from streamd.backends.typed_schema import FLUSH_FUNCTION, typed_privilege_problems
from streamd.config.settings import Settings
from streamd.config.tables import parse_tables
from streamd.dev.servers import PostgresServer
from streamd.pipeline.envelope import Row, split_entries
from streamd.pipeline.typed_sink import TypedSink

HOT = {
    "streams": ["orders"],
    "mode": "upsert",
    "key": ["order_id"],
    "columns": {"order_id": "text", "status": "text"},
}
KEYS = 30


def hot_settings(settings: Settings) -> Settings:
    return dataclasses.replace(settings, tables=parse_tables({"orders": HOT}, "test"))


def rows_of(seqs: list[int]) -> list[Row]:
    """Entry 1700000000000-<seq> updates key seq % KEYS to status s<seq>."""
    entries = [
        [
            f"1700000000000-{seq}".encode(),
            [b"type", b"u", b"data", orjson.dumps({"order_id": f"k{seq % KEYS}", "status": seq})],
        ]
        for seq in seqs
    ]
    rows, rejects = split_entries(entries, 1 << 20)
    assert rejects == []
    return rows


@pytest.fixture
async def hot(settings: Settings) -> AsyncIterator[Settings]:
    s = hot_settings(settings)
    conn = await postgres_connect(s)
    try:
        await apply_schema(conn, s)
    finally:
        await conn.close()
    yield s


async def test_batches_of_the_same_keys_at_once_end_with_the_newest_entry_per_key(
    hot: Settings,
) -> None:
    """Every batch updates every key, the batches go out of stream order over five connections,
    some twice (replays): no write fails (a deadlock would), and each key holds its newest."""
    rng = random.Random(14)
    seqs = list(range(2400))
    rng.shuffle(seqs)  # each batch: entries from all over the stream, every key several times
    batches = [seqs[i : i + 120] for i in range(0, len(seqs), 120)]
    work = [*batches, *rng.sample(batches, 5)]
    rng.shuffle(work)
    spec = hot.tables[0]
    sink = TypedSink("orders", spec, hot.dlq_table)
    conns = [await postgres_connect(hot) for _ in range(5)]
    changed = 0

    async def writer(conn: asyncpg.Connection) -> None:
        nonlocal changed
        while work:
            result = await sink.write(conn, rows_of(work.pop()), [])
            assert result.refused == []
            changed += result.inserted

    try:
        await asyncio.gather(*(writer(c) for c in conns))
        records = await conns[0].fetch("SELECT order_id, status, entry_id FROM orders")
    finally:
        for conn in conns:
            await conn.close()
    newest = {f"k{k}": max(s for s in seqs if s % KEYS == k) for k in range(KEYS)}
    assert {r["order_id"]: (r["status"], r["entry_id"]) for r in records} == {
        key: (str(seq), f"1700000000000-{seq}") for key, seq in newest.items()
    }
    assert KEYS <= changed <= len(batches) * KEYS  # replays and older entries change nothing


async def test_an_upsert_that_returned_is_on_disk(
    make_postgres: Callable[..., PostgresServer], settings: Settings
) -> None:
    """The COMMIT does not wait for the WAL; the write returns only once the WAL is written.
    The WAL writer is stopped, so that only that wait can have written it before the crash."""
    server = make_postgres()
    s = hot_settings(dataclasses.replace(settings, postgres_dsn=server.dsn))
    conn = await postgres_connect(s)
    try:
        await apply_schema(conn, s)
        walwriter = await conn.fetchval(
            "SELECT pid FROM pg_stat_activity WHERE backend_type = 'walwriter'"
        )
        os.kill(walwriter, signal.SIGSTOP)
        sink = TypedSink("orders", s.tables[0], s.dlq_table)
        result = await sink.write(conn, rows_of([7, 8]), [])
        assert result.inserted == 2
        # Every process at once, WAL buffers not yet written included (before the session
        # ends: a backend's exit writes them).
        server.kill()
    finally:
        conn.terminate()
    server.start()
    conn = await asyncpg.connect(server.dsn)
    try:
        statuses = await conn.fetchval("SELECT array_agg(status ORDER BY status) FROM orders")
        assert statuses == ["7", "8"]
    finally:
        await conn.close()


async def test_serve_needs_to_execute_the_flush_function(hot: Settings) -> None:
    conn = await postgres_connect(hot)
    role = f"hot_{await conn.fetchval('SELECT current_database()')}"
    try:
        await conn.execute(f'CREATE ROLE "{role}" LOGIN')
        await conn.execute(f'GRANT INSERT, SELECT, UPDATE ON orders TO "{role}"')
        user = hot.postgres_dsn.replace("postgres@", f"{role}@")
        as_role = await asyncpg.connect(user)
        try:
            assert await typed_privilege_problems(as_role, hot) == []
            await conn.execute(f"REVOKE EXECUTE ON FUNCTION {FLUSH_FUNCTION} FROM PUBLIC")
            assert await typed_privilege_problems(as_role, hot) == [
                f"EXECUTE on function {FLUSH_FUNCTION}"
            ]
        finally:
            await as_role.close()
    finally:
        await conn.execute(f"GRANT EXECUTE ON FUNCTION {FLUSH_FUNCTION} TO PUBLIC")
        await conn.execute(f'DROP OWNED BY "{role}"; DROP ROLE "{role}"')
        await conn.close()
