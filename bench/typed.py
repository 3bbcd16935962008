"""Typed tables against the JSONB events table, side by side in one run: the Postgres side of a
batch (encode, COPY, the statement that moves the stage, COMMIT), the part that differs.

    uv run python -m bench.typed                     # 100,000 events, 3 runs each
    uv run python -m bench.typed --events 20000 --repeat 1

Contenders, each writing the same events (order_updated, ~110-byte payloads) in batches of
--batch over --connections connections (serve's consumer tasks), into a fresh table:
- jsonb append: the events table (PostgresSink, one binary COPY per batch): the baseline.
- typed append: [tables.orders] with four columns (TypedSink: stage COPY + INSERT ... SELECT).
- upsert, distinct keys: mode = "upsert", every event a new key (100,000 keys at the default).
- upsert, 1,000 hot keys: the same events over 1,000 keys, so most entries update a row.
Reported: median events/s and its ratio to jsonb append (targets: typed append >= 0.8x, both
upserts >= 0.5x); and, steadier on a busy machine, the CPU each event costs (Postgres' processes
and this one's), as jsonb append's CPU over the contender's: the throughput ratio when CPU
bounds both. Private PostgreSQL under bench/.work (fsync on), unless --postgres-dsn (then
without Postgres' CPU). --commit-delay-ms N makes each WAL flush of the private server take N ms
longer (commit_delay, on every commit): a slow or busy disk, where waiting for flushes, not CPU,
bounds the upserts of hot keys.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import shutil
import statistics
import time
from collections.abc import Iterator
from typing import Any

import asyncpg
import orjson

from bench.run import WORK, tree_cpu
from streamd.backends.schema import apply_schema
from streamd.config.settings import Settings
from streamd.config.tables import parse_tables
from streamd.dev.pg_setup import initdb
from streamd.dev.servers import PostgresServer
from streamd.pipeline.envelope import Row, split_entries
from streamd.pipeline.sink import PostgresSink
from streamd.pipeline.sinks import Sink
from streamd.pipeline.typed_sink import TypedSink

COLUMNS = {"order_id": "text", "status": "text", "amount": "numeric", "items": "integer"}
TABLES = {
    "typed append": {"streams": ["orders"], "columns": COLUMNS},
    "upsert, distinct keys": {
        "streams": ["orders"],
        "mode": "upsert",
        "key": ["order_id"],
        "columns": COLUMNS,
    },
}
TARGETS = {"typed append": 0.8, "upsert, distinct keys": 0.5, "upsert, 1,000 hot keys": 0.5}


def batches(events: int, keys: int, size: int) -> list[list[Row]]:
    """Rows of `events` order updates over `keys` keys, split into batches, in stream order."""
    entries = []
    for i in range(events):
        data = {
            "order_id": f"order-{i % keys:07d}",
            "status": ("new", "paid", "shipped")[i % 3],
            "amount": f"{(i % 10_000) / 100:.2f}",
            "items": i % 7,
            "customer": f"customer-{i % 5000}",
        }
        entry_id = f"{1_800_000_000_000 + i // 100}-{i % 100}".encode()
        fields = [b"type", b"order_updated", b"data", orjson.dumps(data)]
        entries.append([entry_id, fields])
    rows, rejects = split_entries(entries, 1 << 20)
    assert not rejects
    return [rows[i : i + size] for i in range(0, len(rows), size)]


async def write_all(dsn: str, sink: Sink, work: list[list[Row]], connections: int) -> float:
    """Write every batch over `connections` connections; the seconds it took."""
    queue: asyncio.Queue[list[Row]] = asyncio.Queue()
    for batch in work:
        queue.put_nowait(batch)
    conns = [await asyncpg.connect(dsn) for _ in range(connections)]

    async def drain(conn: asyncpg.Connection) -> None:
        while not queue.empty():
            result = await sink.write(conn, queue.get_nowait(), [])
            assert not result.refused, result.refused[:1]

    try:
        started = time.perf_counter()
        await asyncio.gather(*(drain(c) for c in conns))
        return time.perf_counter() - started
    finally:
        for conn in conns:
            await conn.close()


async def one_run(
    dsn: str, pg_pid: int | None, name: str, work: list[list[Row]], connections: int
) -> tuple[float, float]:
    """(events/s, CPU microseconds per event) of one contender's run on a fresh table."""
    section = TABLES["upsert, distinct keys" if name.startswith("upsert") else "typed append"]
    settings = dataclasses.replace(
        Settings(postgres_dsn=dsn), tables=parse_tables({"orders": section}, "bench")
    )
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("DROP TABLE IF EXISTS events, orders, dead_letter_queue")
        await apply_schema(conn, settings)
        await conn.execute("CHECKPOINT")  # each run starts from the same clean state
    finally:
        await conn.close()
    sink: Sink
    if name == "jsonb append":
        sink = PostgresSink("orders", "events", "dead_letter_queue")
    else:
        sink = TypedSink("orders", settings.tables[0], "dead_letter_queue")
    cpu_before = tree_cpu(pg_pid) + time.process_time()
    seconds = await write_all(dsn, sink, work, connections)
    events = sum(len(b) for b in work)
    cpu = tree_cpu(pg_pid) + time.process_time() - cpu_before
    return events / seconds, cpu / events * 1e6


@contextlib.contextmanager
def postgres(dsn: str | None, commit_delay_ms: float = 0) -> Iterator[tuple[str, int | None]]:
    if dsn:
        yield dsn, None
        return
    WORK.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(WORK / "pg-typed", ignore_errors=True)
    template = WORK / "pg-template"
    if not template.exists():
        initdb(template)
    slow_disk = {"commit_delay": str(int(commit_delay_ms * 1000)), "commit_siblings": "0"}
    server = PostgresServer(
        WORK / "pg-typed",
        template=template,
        fsync=True,
        settings=slow_disk if commit_delay_ms else {},
    )
    try:
        started = server.start()
        yield started.dsn, started.pid
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=2000)
    parser.add_argument("--connections", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--postgres-dsn", default=None, help="an outside server (data is wiped)")
    parser.add_argument(
        "--commit-delay-ms", type=float, default=0, help="slow the private server's WAL flushes"
    )
    args = parser.parse_args()
    work = {
        "jsonb append": batches(args.events, args.events, args.batch),
        "typed append": batches(args.events, args.events, args.batch),
        "upsert, distinct keys": batches(args.events, args.events, args.batch),
        "upsert, 1,000 hot keys": batches(args.events, 1000, args.batch),
    }
    rates: dict[str, list[float]] = {name: [] for name in work}
    cpus: dict[str, list[float]] = {name: [] for name in work}
    with postgres(args.postgres_dsn, args.commit_delay_ms) as (dsn, pg_pid):
        for run in range(args.repeat):
            for name, batches_ in work.items():  # interleaved: drift hits all alike
                rate, cpu = asyncio.run(one_run(dsn, pg_pid, name, batches_, args.connections))
                rates[name].append(rate)
                cpus[name].append(cpu)
                print(f"run {run + 1}: {name}: {rate:,.0f} events/s, {cpu:.1f} us CPU/event")
    report(args, rates, cpus)


def report(args: Any, rates: dict[str, list[float]], cpus: dict[str, list[float]]) -> None:
    base = statistics.median(rates["jsonb append"])
    base_cpu = statistics.median(cpus["jsonb append"])
    slow = f", WAL flushes {args.commit_delay_ms:g} ms slower" if args.commit_delay_ms else ""
    print(
        f"\n{args.events:,} events in batches of {args.batch} over {args.connections} "
        f"connections, median of {args.repeat}{slow}"
    )
    print(
        f"{'table':<26}{'events/s':>10}{'vs jsonb':>10}{'CPU us/ev':>11}{'by CPU':>8}{'target':>8}"
    )
    for name, values in rates.items():
        median, cpu = statistics.median(values), statistics.median(cpus[name])
        target = TARGETS.get(name)
        shown = f">= {target}" if target else ""
        print(
            f"{name:<26}{median:>10,.0f}{median / base:>9.2f}x{cpu:>11.1f}"
            f"{base_cpu / cpu:>7.2f}x{shown:>8}"
        )


if __name__ == "__main__":
    main()
