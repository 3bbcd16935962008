"""How long retention holds the table's lock to drop a big partition: --rows rows in one old day
partition of a daily-partitioned events table, then one retention pass (backends/upkeep.py),
timed, while another connection runs a statement on the table in a loop: its longest wait is
how long the table was locked for writers. Dropping a
partition unlinks its files, so the time should not grow with its rows.

    uv run python -m bench.retention                  # 10,000,000 rows (several GB of disk)
    uv run python -m bench.retention --rows 1000000
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import time
from pathlib import Path

import asyncpg

from streamd.backends.schema import apply_schema
from streamd.backends.upkeep import upkeep
from streamd.config.sources import load_settings
from streamd.dev.pg_setup import initdb
from streamd.dev.servers import PostgresServer

WORK = Path(__file__).resolve().parent / ".work"
OLD_DAY_MS = 1_700_000_000_000 // 86_400_000 * 86_400_000  # 2023-11-14


async def bench(dsn: str, rows: int) -> None:
    settings = load_settings(environ={"STREAMD_POSTGRES_DSN": dsn, "STREAMD_RETENTION": "30 days"})[
        0
    ]
    keep_all = load_settings(environ={"STREAMD_POSTGRES_DSN": dsn})[0]
    conn = await asyncpg.connect(dsn)
    try:
        await apply_schema(conn, settings)
        await conn.execute(
            f"CREATE TABLE events_old PARTITION OF events FOR VALUES FROM ({OLD_DAY_MS})"
            f" TO ({OLD_DAY_MS + 86_400_000})"
        )
        started = time.perf_counter()
        await conn.execute(
            "INSERT INTO events (stream, entry_id, entry_ms, entry_seq, event_type, payload,"
            " produced_at) SELECT 'events', ($1::bigint + n / 100)::text || '-' || (n % 100)::text,"
            " $1::bigint + n / 100, n % 100, 'order_created',"
            " jsonb_build_object('user_id', n, 'amount', 12.5, 'currency', 'EUR'), now()"
            " FROM generate_series(0, $2 - 1) AS n",
            OLD_DAY_MS,
            rows,
        )
        await conn.execute("VACUUM ANALYZE events_old")
        size = await conn.fetchval("SELECT pg_size_pretty(pg_total_relation_size('events_old'))")
        print(f"filled events_old: {rows:,} rows, {size}, in {time.perf_counter() - started:.0f} s")
        await upkeep(conn, "events", keep_all)  # partitions ahead: made, not timed
        probe = await asyncpg.connect(dsn)
        done = asyncio.Event()
        waits: list[float] = []

        async def probing() -> None:
            # What a writer sees: how long a statement on the table waits for its lock.
            while not done.is_set():
                t0 = time.perf_counter()
                await probe.execute("SELECT 1 FROM events WHERE entry_ms = -1")
                waits.append(time.perf_counter() - t0)

        prober = asyncio.create_task(probing())
        started = time.perf_counter()
        result = await upkeep(conn, "events", settings)
        took = time.perf_counter() - started
        done.set()
        await prober
        await probe.close()
        names = [p.name for p in result.dropped]
        print(
            f"retention dropped {names}: the pass took {took * 1000:.0f} ms; the longest a"
            f" statement on events waited meanwhile: {max(waits) * 1000:.0f} ms"
        )
    finally:
        await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    args = parser.parse_args()
    shutil.rmtree(WORK / "pg-retention", ignore_errors=True)
    template = WORK / "pg-template"
    if not template.exists():
        initdb(template)
    server = PostgresServer(WORK / "pg-retention", template=template, fsync=True).start()
    try:
        asyncio.run(bench(server.dsn, args.rows))
    finally:
        server.stop()
        shutil.rmtree(WORK / "pg-retention", ignore_errors=True)


if __name__ == "__main__":
    main()
