"""Upserts of hot keys against a real Postgres: several connections writing batches of the same
keys at once (they queue on row locks, taken in key order: never a deadlock, and the newest
entry per key wins), a new key that another transaction inserts meanwhile (the plain INSERT's
race), the switch between plain INSERTs and ON CONFLICT alone, the write that returned is on
disk although its COMMIT did not wait for the flush, and serve says so at start when the role
may not wait for it."""

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
from streamd.pipeline.typed_sink import PLAIN_INSERTS_PAUSE, TypedSink

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


async def test_a_new_key_inserted_meanwhile_by_another_transaction_is_upserted(
    hot: Settings,
) -> None:
    """The batch's plain INSERT of a key it did not see meets another transaction's insert of
    it: once that commits, the unique violation sends the batch the careful way (ON CONFLICT),
    where its newer entry wins; nothing is refused or dead-lettered."""
    other = await postgres_connect(hot)
    conn = await postgres_connect(hot)
    try:
        await other.execute("BEGIN")
        await other.execute(
            "INSERT INTO orders (order_id, status, stream, entry_id, event_type, payload,"
            " produced_at, entry_ms, entry_seq) VALUES ('k1', 'older', 'orders',"
            " '1700000000000-0', 'u', '{}', now(), 1700000000000, 0)"
        )
        sink = TypedSink("orders", hot.tables[0], hot.dlq_table)
        write = asyncio.ensure_future(sink.write(conn, rows_of([1]), []))
        pid = conn.get_server_pid()

        async def blocked() -> bool:
            waiting = "SELECT wait_event_type FROM pg_stat_activity WHERE pid = $1"
            return await other.fetchval(waiting, pid) == "Lock"

        for _ in range(200):  # the plain INSERT waits on the other's uncommitted key
            if await blocked():
                break
            await asyncio.sleep(0.05)
        assert await blocked(), "the batch's INSERT never met the other transaction's key"
        await other.execute("COMMIT")
        result = await asyncio.wait_for(write, 30)
        assert (result.inserted, result.duplicates, result.refused) == (1, 0, [])
        row = await conn.fetchrow("SELECT status, entry_id FROM orders WHERE order_id = 'k1'")
        assert (row["status"], row["entry_id"]) == ("1", "1700000000000-1")
        assert await conn.fetchval("SELECT count(*) FROM dead_letter_queue") == 0
    finally:
        await other.close()
        await conn.close()


async def test_batches_of_updates_pause_plain_inserts_and_new_keys_still_land(
    hot: Settings,
) -> None:
    """A batch that mostly updates keys the table has makes the next batches use ON CONFLICT
    alone; they still insert the new keys they bring, and plain INSERTs come back after."""
    sink = TypedSink("orders", hot.tables[0], hot.dlq_table)
    conn = await postgres_connect(hot)
    try:
        assert (await sink.write(conn, rows_of(list(range(KEYS))), [])).inserted == KEYS
        assert sink._plain_paused == 0  # every key was new: plain INSERTs made them
        await sink.write(conn, rows_of(list(range(KEYS, 2 * KEYS))), [])
        assert sink._plain_paused == PLAIN_INSERTS_PAUSE  # every key an update
        seq = 2 * KEYS
        for _ in range(PLAIN_INSERTS_PAUSE):
            # Each batch: one update, and a key the table lacks (outside k0..k29).
            entries = [
                [
                    f"1700000000000-{seq}".encode(),
                    [b"type", b"u", b"data", orjson.dumps({"order_id": "k0", "status": seq})],
                ],
                [
                    f"1700000000000-{seq + 1}".encode(),
                    [
                        b"type",
                        b"u",
                        b"data",
                        orjson.dumps({"order_id": f"new{seq}", "status": seq}),
                    ],
                ],
            ]
            rows, _ = split_entries(entries, 1 << 20)
            assert (await sink.write(conn, rows, [])).inserted == 2
            seq += 2
        assert sink._plain_paused == 0  # tried again on the next batch
        count = await conn.fetchval("SELECT count(*) FROM orders WHERE order_id LIKE 'new%'")
        assert count == PLAIN_INSERTS_PAUSE
        assert await conn.fetchval("SELECT status FROM orders WHERE order_id = 'k0'") == str(
            seq - 2
        )
    finally:
        await conn.close()


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
