"""Where Postgres spends its CPU per event of a binary COPY into the events table: the chosen
layout, then variants that each leave one thing out (the entry_id text column, the BRIN index,
jsonb for json, the key) or route the rows differently (a partitioned parent against COPY
straight into its partition). The drain's rows (bench/run.py's sample payloads), encoded before
the clock starts, 2,000 per COPY in autocommit, as the sink sends them.

Measured per variant: CPU of the backend that runs the COPY and of the whole server (walwriter,
checkpointer, autovacuum included: what bench/run.py counts as Postgres), per event; WAL bytes per
event (pg_current_wal_lsn before and after); rows/s. Minimum over --repeat interleaved rounds: on
a shared machine the least disturbed round is the best estimate of CPU.

    uv run python -m bench.pg_cost                      # 200,000 rows, 3 rounds
    uv run python -m bench.pg_cost --rows 100000 --repeat 1
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import statistics
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import psutil

from bench.run import sample_payloads, tree_cpu
from streamd.dev.pg_setup import initdb
from streamd.dev.servers import PostgresServer
from streamd.pipeline.envelope import PG_EPOCH_MS
from streamd.pipeline.sink import ATTACHED

WORK = Path(__file__).resolve().parent / ".work"
BATCH = 2000
DAY_MS = 86_400_000
FIRST_MS = 1_764_547_200_000 + 3_600_000  # 2025-12-01T01:00Z: inside one day's partition

_KEY = "PRIMARY KEY (entry_ms, entry_seq, stream)"
_BRIN = "CREATE INDEX ON {t} USING brin (ingested_at)"


def _ddl(
    *, entry_id: bool = True, payload: str = "jsonb", key: str = _KEY, partitioned: bool = False
) -> str:
    columns = [
        'stream text COLLATE "C" NOT NULL',
        *(["entry_id text NOT NULL"] if entry_id else []),
        "entry_ms bigint NOT NULL",
        "entry_seq bigint NOT NULL",
        "event_type text NOT NULL",
        f"payload {payload} NOT NULL",
        "produced_at timestamptz NOT NULL",
        "ingested_at timestamptz NOT NULL DEFAULT now()",
        "meta jsonb",
        *([key] if key else []),
    ]
    ddl = f"CREATE TABLE {{t}} ({', '.join(columns)})"
    if partitioned:
        ddl += " PARTITION BY RANGE (entry_ms)"
        ddl += (
            f"; CREATE TABLE {{t}}_p1 PARTITION OF {{t}} FOR VALUES FROM ({FIRST_MS - 3_600_000})"
            f" TO ({FIRST_MS - 3_600_000 + DAY_MS})"
            f"; CREATE TABLE {{t}}_p0 PARTITION OF {{t}} FOR VALUES FROM"
            f" ({FIRST_MS - 3_600_000 - DAY_MS}) TO ({FIRST_MS - 3_600_000})"
        )
    return ddl


@dataclass(frozen=True)
class Variant:
    name: str
    ddl: str  # {t}: the table name
    brin: bool = True
    entry_id: bool = True  # the entry_id text column is sent
    json: bool = False  # payload is json (binary format: the text, no version byte)
    into_partition: bool = False  # COPY into {t}_p1 rather than {t}
    batch: int = BATCH  # rows per COPY statement
    checked: bool = False  # in a transaction that then asks whether the partition is attached


VARIANTS = (
    Variant("chosen layout, unpartitioned", _ddl()),
    Variant("  without the entry_id text column", _ddl(entry_id=False), entry_id=False),
    Variant("  without the BRIN index", _ddl(), brin=False),
    Variant("  payload json instead of jsonb", _ddl(payload="json"), json=True),
    Variant("  no key at all (no exactly-once)", _ddl(key="")),
    Variant("  no entry_id column, no BRIN", _ddl(entry_id=False), brin=False, entry_id=False),
    Variant("chosen layout, by day: COPY into the parent", _ddl(partitioned=True)),
    Variant(
        "chosen layout, by day: COPY into the partition",
        _ddl(partitioned=True),
        into_partition=True,
    ),
    Variant(
        "  in a transaction checking it is attached",
        _ddl(partitioned=True),
        into_partition=True,
        checked=True,
    ),
    Variant(
        "  into the partition, no entry_id column",
        _ddl(partitioned=True, entry_id=False),
        entry_id=False,
        into_partition=True,
    ),
    Variant("chosen layout, 500 rows per COPY", _ddl(), batch=500),
    Variant("chosen layout, 1000 rows per COPY", _ddl(), batch=1000),
    Variant("chosen layout, 10000 rows per COPY", _ddl(), batch=10_000),
)


def columns(v: Variant) -> list[str]:
    out = ["stream", "entry_id", "entry_ms", "entry_seq", "event_type", "payload", "produced_at"]
    return [c for c in out if v.entry_id or c != "entry_id"]


def encode(v: Variant, rows: int) -> list[bytes]:
    """Binary COPY buffers of BATCH rows each: 100 entries per millisecond, as a busy stream."""
    payloads = sample_payloads(rows)
    ncols = struct.pack(">h", len(columns(v)))
    stream = struct.pack(">i", 6) + b"events"
    buffers = []
    for start in range(0, rows, v.batch):
        parts = [b"PGCOPY\n\xff\r\n\x00" + bytes(8)]
        for i in range(start, min(start + v.batch, rows)):
            ms, seq = FIRST_MS + i // 100, i % 100
            kind, payload = payloads[i]
            parts += [ncols, stream]
            if v.entry_id:
                entry_id = f"{ms}-{seq}".encode()
                parts += [struct.pack(">i", len(entry_id)), entry_id]
            parts.append(struct.pack(">iqiq", 8, ms, 8, seq))
            parts += [struct.pack(">i", len(kind)), kind.encode()]
            if v.json:
                parts += [struct.pack(">i", len(payload)), payload]
            else:
                parts += [struct.pack(">iB", len(payload) + 1, 1), payload]
            parts.append(struct.pack(">iq", 8, (ms - PG_EPOCH_MS) * 1000))
        parts.append(b"\xff\xff")
        buffers.append(b"".join(parts))
    return buffers


@dataclass
class Sample:
    backend_us: float
    server_us: float
    wal_bytes: float
    rate: float


async def run_one(dsn: str, postmaster: int, v: Variant, table: str, rows: int) -> Sample:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f"DROP TABLE IF EXISTS {table} CASCADE")
        await conn.execute(v.ddl.format(t=table))
        if v.brin:
            await conn.execute(_BRIN.format(t=table))
        await conn.execute("CHECKPOINT")
        buffers = encode(v, rows)
        target = f"{table}_p1" if v.into_partition else table
        backend = psutil.Process(await conn.fetchval("SELECT pg_backend_pid()"))
        lsn0 = await conn.fetchval("SELECT pg_current_wal_lsn()::text")
        cpu0, server0 = sum(backend.cpu_times()[:2]), tree_cpu(postmaster)
        t0 = time.perf_counter()
        for buffer in buffers:
            if v.checked:  # as the sink writes a batch straight into its partition
                async with conn.transaction():
                    await conn.copy_to_table(
                        target, source=memoryview(buffer), columns=columns(v), format="binary"
                    )
                    assert await conn.fetchval(ATTACHED, target, table)
            else:
                await conn.copy_to_table(
                    target, source=memoryview(buffer), columns=columns(v), format="binary"
                )
        wall = time.perf_counter() - t0
        cpu, server = sum(backend.cpu_times()[:2]) - cpu0, tree_cpu(postmaster) - server0
        wal = await conn.fetchval("SELECT pg_current_wal_lsn() - $1::text::pg_lsn", lsn0)
        await conn.execute(f"DROP TABLE {table} CASCADE")
        return Sample(cpu / rows * 1e6, server / rows * 1e6, float(wal) / rows, rows / wall)
    finally:
        await conn.close()


async def bench(dsn: str, postmaster: int, variants: list[Variant], rows: int, repeat: int) -> None:
    results: dict[str, list[Sample]] = {v.name: [] for v in variants}
    order = list(enumerate(variants))
    for round_ in range(repeat):
        # a new order every round: drift on a shared machine (and WAL segments created on the
        # way) then favours no variant
        random.Random(round_).shuffle(order)
        for n, v in order:
            results[v.name].append(await run_one(dsn, postmaster, v, f"cost_{n}", rows))
    first = results[variants[0].name]
    base, base_mid = min(s.server_us for s in first), statistics.median(s.server_us for s in first)
    print(
        f"{rows:,} rows, binary COPY of {BATCH} per statement (unless said) in autocommit,"
        f" {repeat} rounds"
    )
    print(
        f"{'variant (server CPU µs per event)':<48}{'backend':>8}{'min':>7}{'ratio':>7}"
        f"{'median':>8}{'ratio':>7}{'WAL B/ev':>9}{'rows/s':>10}"
    )
    for name, samples in results.items():
        low = min(s.server_us for s in samples)
        mid = statistics.median(s.server_us for s in samples)
        print(
            f"{name:<48}{min(s.backend_us for s in samples):>8.2f}{low:>7.2f}{low / base:>7.2f}"
            f"{mid:>8.2f}{mid / base_mid:>7.2f}{min(s.wal_bytes for s in samples):>9.0f}"
            f"{statistics.median(s.rate for s in samples):>10,.0f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--only", default="", help="comma-separated: the variants whose names contain one"
    )
    args = parser.parse_args()
    shutil.rmtree(WORK / "pg-cost", ignore_errors=True)
    template = WORK / "pg-template"
    if not template.exists():
        initdb(template)
    server = PostgresServer(WORK / "pg-cost", template=template, fsync=True).start()
    try:
        assert server.pid is not None
        wanted = args.only.split(",")
        variants = [v for v in VARIANTS if any(w in v.name for w in wanted)]
        asyncio.run(bench(server.dsn, server.pid, variants, args.rows, args.repeat))
    finally:
        server.stop()


if __name__ == "__main__":
    main()
