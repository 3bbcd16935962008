"""Time partitions against a real Postgres: a replay refused by the key in its partition, backfills,
boundaries, retention, pruning, and the listing."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime

import asyncpg
import pytest

from streamd.backends.connections import postgres_connect
from streamd.backends.schema import apply_schema
from streamd.backends.upkeep import upkeep
from streamd.config.settings import Settings
from streamd.pipeline.envelope import Row, split_entries
from streamd.pipeline.sink import PostgresSink
from tests.support.helpers import (
    ServeProcess,
    count_rows,
    pending_count,
    pg_fetch,
    pg_fetchval,
    redis_client,
    wait_until,
)
from tests.support.streamd_cli import run_streamd

DAY_MS = 86_400_000


def ms(text: str) -> int:
    """Epoch ms of an ISO time in UTC: "2026-01-31T23:59:59.999"."""
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp() * 1000)


def rows_at(*entry_ids: str) -> list[Row]:
    entries = [[i.encode(), [b"type", b"t", b"data", b'{"i": 1}']] for i in entry_ids]
    rows, rejects = split_entries(entries, 1 << 20)
    assert rejects == []
    return rows


async def placement(conn: asyncpg.Connection) -> dict[str, str]:
    """entry_id -> the partition its row is in."""
    records = await conn.fetch("SELECT entry_id, tableoid::regclass::text AS part FROM events")
    return {r["entry_id"]: r["part"] for r in records}


async def partition_names(conn: asyncpg.Connection) -> list[str]:
    return [
        r[0]
        for r in await conn.fetch(
            "SELECT inhrelid::regclass::text FROM pg_inherits"
            " WHERE inhparent = 'events'::regclass ORDER BY 1"
        )
    ]


@pytest.fixture
async def conn(settings: Settings) -> AsyncIterator[asyncpg.Connection]:
    assert settings.partition_interval == "day"  # the default
    connection = await postgres_connect(settings)
    await apply_schema(connection, settings)
    yield connection
    await connection.close()


@pytest.fixture
def sink(settings: Settings) -> PostgresSink:
    return PostgresSink(settings.stream, settings.events_table, settings.dlq_table)


async def test_a_replay_lands_in_the_same_partition_and_the_key_refuses_it(
    conn: asyncpg.Connection, sink: PostgresSink
) -> None:
    ids = [f"{ms('2026-03-04T05:06:07')}-{i}" for i in range(50)]
    first = await sink.write(conn, rows_at(*ids), [])
    assert (first.inserted, first.duplicates) == (50, 0)
    # The same entries again (a crash before XACK, or a reclaim), also mixed with new ones.
    again = await sink.write(conn, rows_at(*ids), [])
    assert (again.inserted, again.duplicates) == (0, 50)
    new = f"{ms('2026-03-04T05:06:08')}-0"
    mixed = await sink.write(conn, rows_at(ids[0], new), [])
    assert (mixed.inserted, mixed.duplicates) == (1, 1)
    assert await conn.fetchval("SELECT count(*) FROM events") == 51
    assert set((await placement(conn)).values()) == {"events_p20260304"}
    # The key that refuses it contains the partition key, as Postgres requires.
    key = await conn.fetchval(
        "SELECT pg_get_indexdef(indexrelid) FROM pg_index"
        " WHERE indrelid = 'events'::regclass AND indisprimary"
    )
    assert "(entry_ms, entry_seq, stream)" in key


async def test_a_backfill_of_old_explicit_ids_gets_partitions_for_its_own_time(
    conn: asyncpg.Connection, sink: PostgresSink
) -> None:
    old = [f"{ms('2020-01-01T12:00:00')}-1", f"{ms('2021-06-15T00:00:00')}-0", "1-1"]
    result = await sink.write(conn, rows_at(*old), [])
    assert (result.inserted, result.refused) == (3, [])
    assert await placement(conn) == {
        old[0]: "events_p20200101",
        old[1]: "events_p20210615",
        "1-1": "events_p19700101",
    }
    # Only the days that hold rows were created, and there is no default partition to fill.
    names = await partition_names(conn)
    assert {"events_p20200101", "events_p20210615", "events_p19700101"} <= set(names)
    assert len(names) == 3 + 3  # and today's and the next two, from db init
    assert (
        await conn.fetchval(
            "SELECT partdefid FROM pg_partitioned_table WHERE partrelid = 'events'::regclass"
        )
        == 0
    )


async def test_a_batch_across_a_boundary_and_one_out_of_order(
    conn: asyncpg.Connection, sink: PostgresSink
) -> None:
    midnight = ms("2025-12-31T00:00:00")
    across = [f"{midnight - 1}-{i}" for i in range(3)] + [f"{midnight}-{i}" for i in range(3)]
    assert (await sink.write(conn, rows_at(*across), [])).inserted == 6
    # First and last in one day, the middle one in another (as a reclaimed batch may be): the
    # row without a partition is not taken for a bad row; its partition is made and all land.
    far = f"{ms('2025-07-01T00:00:00')}-0"
    middle = [f"{midnight + 5}-0", far, f"{midnight + 6}-0"]
    result = await sink.write(conn, rows_at(*middle), [])
    assert (result.inserted, result.refused) == (3, [])
    where = await placement(conn)
    assert where[across[0]] == "events_p20251230" and where[across[-1]] == "events_p20251231"
    assert where[far] == "events_p20250701"
    assert await conn.fetchval("SELECT count(*) FROM dead_letter_queue") == 0


async def test_a_partition_dropped_under_a_sink_is_made_again_not_dead_lettered(
    conn: asyncpg.Connection, sink: PostgresSink
) -> None:
    day = ms("2024-02-02T00:00:00")
    await sink.write(conn, rows_at(f"{day}-1"), [])
    await conn.execute("DROP TABLE events_p20240202")  # as retention on another host would
    result = await sink.write(conn, rows_at(f"{day}-2"), [])
    assert (result.inserted, result.refused) == (1, [])
    assert await conn.fetchval("SELECT count(*) FROM events") == 1


async def _parent_statements(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval("SELECT n FROM parent_inserts"))


async def count_parent_statements(conn: asyncpg.Connection) -> None:
    """Count the INSERT and COPY statements that go through the parent: a statement trigger
    fires for the table named by the statement, not for the partitions it routes rows to."""
    await conn.execute(
        """
        CREATE TABLE parent_inserts (n int NOT NULL); INSERT INTO parent_inserts VALUES (0);
        CREATE FUNCTION count_parent() RETURNS trigger LANGUAGE plpgsql AS
          $$BEGIN UPDATE parent_inserts SET n = n + 1; RETURN NULL; END$$;
        CREATE TRIGGER count_parent AFTER INSERT ON events
          FOR EACH STATEMENT EXECUTE FUNCTION count_parent();
        """
    )


async def test_a_batch_in_one_partition_is_copied_straight_into_it(
    conn: asyncpg.Connection, sink: PostgresSink
) -> None:
    await count_parent_statements(conn)
    day = ms("2026-05-05T10:00:00")
    result = await sink.write(
        conn, rows_at(*(f"{day + i}-{j}" for i in range(3) for j in range(2))), []
    )
    assert (result.inserted, result.refused) == (6, [])
    assert set((await placement(conn)).values()) == {"events_p20260505"}
    assert await _parent_statements(conn) == 0  # Postgres routed none of them
    # Across a boundary, and a replay (the careful path): through the table, as before.
    across = [f"{ms('2026-05-05T23:59:59.999')}-0", f"{ms('2026-05-06T00:00:00')}-0"]
    assert (await sink.write(conn, rows_at(*across), [])).inserted == 2
    assert await _parent_statements(conn) == 1
    again = await sink.write(conn, rows_at(f"{day}-0", f"{day}-1"), [])
    assert (again.inserted, again.duplicates) == (0, 2)
    assert await conn.fetchval("SELECT count(*) FROM events") == 8


async def test_a_partition_detached_under_a_sink_gets_no_rows_they_stay_in_the_table(
    conn: asyncpg.Connection, sink: PostgresSink
) -> None:
    day = ms("2024-03-03T00:00:00")
    await sink.write(conn, rows_at(f"{day}-1"), [])  # the sink now knows events_p20240303
    # Detached and not yet dropped, as retention leaves it between its two transactions (or
    # an operator archiving it): a COPY straight into it would put the rows out of the table.
    await conn.execute("ALTER TABLE events DETACH PARTITION events_p20240303")
    result = await sink.write(conn, rows_at(f"{day}-2", f"{day}-3"), [])
    assert (result.inserted, result.refused) == (2, [])
    assert await conn.fetchval("SELECT count(*) FROM events_p20240303") == 1
    where = await placement(conn)
    assert set(where) == {f"{day}-2", f"{day}-3"}
    assert set(where.values()) == {"events_p20240303_2"}  # a new partition for that day


async def test_a_row_a_check_constraint_refuses_in_a_partition_is_refused_alone(
    conn: asyncpg.Connection, sink: PostgresSink
) -> None:
    # A CHECK constraint (named, unlike the partition's own) refuses a row for its data.
    await conn.execute("ALTER TABLE events ADD CONSTRAINT small_seq CHECK (entry_seq < 100)")
    day = ms("2026-06-06T06:00:00")
    result = await sink.write(conn, rows_at(f"{day}-1", f"{day}-100", f"{day + 1}-2"), [])
    assert result.inserted == 2
    assert [r.entry_id for r in result.refused] == [f"{day}-100".encode()]
    assert set((await placement(conn)).values()) == {"events_p20260606"}


def test_nothing_is_lost_across_a_boundary_under_load(
    env: dict[str, str], start_serve: Callable[..., ServeProcess]
) -> None:
    """20,000 entries whose IDs cross midnight (explicit IDs, 50 per millisecond) drained by five
    consumer tasks in batches of 500: every one lands once, each in the partition of its day."""
    url, dsn = env["STREAMD_REDIS_URL"], env["STREAMD_POSTGRES_DSN"]
    midnight = ms("2026-06-01T00:00:00")
    ids = [f"{midnight - 200 + i // 50}-{i % 50}" for i in range(20_000)]
    with redis_client(url) as r:
        for start in range(0, len(ids), 1000):
            pipe = r.pipeline(transaction=False)
            for entry_id in ids[start : start + 1000]:
                pipe.xadd("events", {"type": "t", "data": "{}"}, id=entry_id)
            pipe.execute()
    serve = start_serve(environ={**env, "STREAMD_BATCH_SIZE": "500", "STREAMD_READ_COUNT": "500"})
    serve.wait_ready()
    wait_until(lambda: count_rows(dsn) >= len(ids), timeout=90)
    wait_until(lambda: pending_count(url) == 0, timeout=30)
    got = pg_fetch(
        dsn,
        "SELECT tableoid::regclass::text AS part, count(*) AS n, count(DISTINCT entry_id) AS d"
        " FROM events GROUP BY 1 ORDER BY 1",
    )
    assert [tuple(r) for r in got] == [
        ("events_p20260531", 200 * 50, 200 * 50),
        ("events_p20260601", 200 * 50, 200 * 50),
    ]
    assert count_rows(dsn, "dead_letter_queue") == 0
    assert serve.terminate() == 0


async def test_retention_drops_only_partitions_entirely_older_never_the_current(
    conn: asyncpg.Connection, sink: PostgresSink, make_settings: Callable[..., Settings]
) -> None:
    now = ms("2026-05-20T00:30:00")  # half an hour into the current day
    for day in ("2026-04-01", "2026-04-19", "2026-04-20", "2026-04-21", "2026-05-19"):
        await sink.write(conn, rows_at(f"{ms(day + 'T12:00:00')}-0"), [])
    await sink.write(conn, rows_at(f"{now}-0"), [])
    result = await upkeep(conn, "events", make_settings(retention="30 days"), at_ms=now)
    # 30 days before now is 2026-04-20T00:30: the 20th is not entirely older, the 19th is.
    assert sorted(p.name for p in result.dropped) == ["events_p20260401", "events_p20260419"]
    assert sorted(result.created) == ["events_p20260521", "events_p20260522"]
    left = await partition_names(conn)
    assert "events_p20260420" in left and "events_p20260520" in left
    # A retention shorter than the current partition's age never drops the current one.
    result = await upkeep(conn, "events", make_settings(retention="1 hour"), at_ms=now)
    assert "events_p20260520" not in [p.name for p in result.dropped]
    assert "events_p20260520" in await partition_names(conn)
    # Yesterday's ends at midnight, within the hour: not entirely older, kept with its row.
    assert "events_p20260519" in await partition_names(conn)
    assert await conn.fetchval("SELECT count(*) FROM events") == 2


async def test_concurrent_retention_drops_each_partition_once(
    conn: asyncpg.Connection,
    sink: PostgresSink,
    settings: Settings,
    make_settings: Callable[..., Settings],
) -> None:
    for day in range(1, 21):
        await sink.write(conn, rows_at(f"{ms(f'2025-01-{day:02d}T00:00:00')}-0"), [])
    others = [await postgres_connect(settings) for _ in range(4)]
    try:
        keep = make_settings(retention="7 days")
        results = await asyncio.gather(*(upkeep(c, "events", keep) for c in others))
    finally:
        for other in others:
            await other.close()
    dropped = [p.name for r in results for p in r.dropped]
    remaining = [n for n in await partition_names(conn) if n.startswith("events_p202501")]
    # Every old partition went exactly once, whichever process dropped it.
    assert sorted(dropped) == [f"events_p202501{d:02d}" for d in range(1, 21)]
    assert remaining == []


@pytest.mark.parametrize("interval", ["hour", "day"])
def test_a_last_hour_query_scans_at_most_two_partitions(env: dict[str, str], interval: str) -> None:
    dsn = env["STREAMD_POSTGRES_DSN"]
    environ = {**env, "STREAMD_PARTITION_INTERVAL": interval}
    assert run_streamd(environ, "db", "init").returncode == 0
    # A week of history, one partition per interval (made as a backfill would).
    now = int(datetime.now(UTC).timestamp() * 1000)
    step = 3_600_000 if interval == "hour" else DAY_MS
    for k in range(1, 8):
        run_async_backfill(dsn, now - k * step)
    assert pg_fetchval(dsn, "SELECT count(*) FROM pg_inherits") >= 8
    plan = "\n".join(
        r[0]
        for r in pg_fetch(
            dsn,
            "EXPLAIN SELECT count(*) FROM events WHERE entry_ms BETWEEN"
            " (extract(epoch FROM now() - interval '1 hour') * 1000)::bigint"
            " AND (extract(epoch FROM now()) * 1000)::bigint",
        )
    )
    scanned = set(re.findall(r"Scan on (events_p\d+) ", plan))
    assert 1 <= len(scanned) <= 2, plan


def test_db_partitions_lists_ranges_sizes_and_estimates(env: dict[str, str]) -> None:
    dsn = env["STREAMD_POSTGRES_DSN"]
    assert run_streamd(env, "db", "init").returncode == 0
    run_async_backfill(dsn, int(datetime.now(UTC).timestamp() * 1000))  # a row in today's
    today = datetime.now(UTC).strftime("%Y%m%d")
    result = run_streamd(env, "db", "partitions")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "events: partitioned by day (UTC), 3 partitions"
    current = next(line for line in lines if f"events_p{today}" in line)
    assert current.endswith("(current)") and "kB" in current
    start = datetime.now(UTC).strftime("%Y-%m-%d 00:00")
    assert start in current
    # --upkeep applies retention (nothing to drop here) and prints what it did.
    old = ms("2020-02-02T00:00:00")
    run_async_backfill(dsn, old)
    dropped = run_streamd(env, "--set", "retention=30 days", "db", "partitions", "--upkeep")
    assert dropped.returncode == 0, dropped.stderr
    assert "dropped events.events_p20200202 (" in dropped.stdout
    assert "events_p20200202" not in dropped.stdout.split("dropped", 1)[1].split("\n", 1)[1]


def run_async_backfill(dsn: str, at_ms: int) -> None:
    async def go() -> None:
        c = await asyncpg.connect(dsn)
        try:
            sink = PostgresSink("events", "events", "dead_letter_queue")
            await sink.write(c, rows_at(f"{at_ms}-0"), [])
        finally:
            await c.close()

    asyncio.run(go())


def test_serve_applies_retention_at_start_and_logs_each_drop(
    env: dict[str, str], start_serve: Callable[..., ServeProcess]
) -> None:
    dsn = env["STREAMD_POSTGRES_DSN"]
    assert run_streamd(env, "db", "init").returncode == 0
    run_async_backfill(dsn, ms("2021-03-03T00:00:00"))
    serve = start_serve(environ={**env, "STREAMD_RETENTION": "30 days"})
    serve.wait_ready()
    wait_until(lambda: serve.events("partition_dropped"), timeout=30)
    (line,) = serve.events("partition_dropped")
    assert line["partition"] == "events_p20210303" and line["dropped_total"] == 1
    assert pg_fetchval(dsn, "SELECT to_regclass('events_p20210303')") is None
    assert serve.terminate() == 0


async def test_a_partition_detached_by_a_pass_that_died_is_dropped_by_the_next(
    conn: asyncpg.Connection, sink: PostgresSink, make_settings: Callable[..., Settings]
) -> None:
    await sink.write(conn, rows_at(f"{ms('2025-03-03T00:00:00')}-0"), [])
    # What a pass leaves when it dies between its two transactions: detached and marked.
    await conn.execute("ALTER TABLE events DETACH PARTITION events_p20250303")
    await conn.execute(
        "COMMENT ON TABLE events_p20250303 IS 'streamd: detached by retention from events'"
    )
    await conn.execute("CREATE TABLE events_p20250304_mine (LIKE events)")  # not marked: kept
    await upkeep(conn, "events", make_settings(retention="30 days"))
    assert await conn.fetchval("SELECT to_regclass('events_p20250303')") is None
    assert await conn.fetchval("SELECT to_regclass('events_p20250304_mine')") is not None


def test_retention_on_an_unpartitioned_table_is_a_warning_not_silence(
    env: dict[str, str], start_serve: Callable[..., ServeProcess]
) -> None:
    environ = {**env, "STREAMD_PARTITION_INTERVAL": "", "STREAMD_RETENTION": "30 days"}
    serve = start_serve(environ=environ)
    serve.wait_ready()
    wait_until(lambda: serve.events("retention_needs_partitions"), timeout=30)
    (line,) = serve.events("retention_needs_partitions")
    assert line["table"] == "events" and "streamd db migrate" in line["fix"]
    assert serve.terminate() == 0
