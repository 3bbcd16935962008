"""Which events-table layout Postgres inserts most cheaply: the same rows, binary COPY in
streamd's batch size, into tables that differ only in their key, collation, time index,
partitioning, the payload's type (jsonb or json) and whether the text entry_id is stored.
Measured: CPU of the Postgres backend per event (psutil, the one that runs the COPY) and rows/s,
min and median of --repeat rounds, the candidates interleaved in every round so a noisy machine
hurts them alike. Ratios are against today's layout (text key).

    uv run python -m bench.layouts                 # 400,000 rows, 3 rounds
    uv run python -m bench.layouts --rows 100000 --repeat 1

The stream column's collation: the bench's server is initdb'ed with locale C, where every text
comparison is already bytewise; production databases are usually en_US.UTF-8. "today, ICU" puts
the stream and entry_id columns under an ICU collation ("und-x-icu") to show what a non-C
database costs today's key, and what COLLATE "C" saves there.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import psutil

from streamd.dev.pg_setup import initdb
from streamd.dev.servers import PostgresServer
from streamd.pipeline.envelope import PG_EPOCH_MS

WORK = Path(__file__).resolve().parent / ".work"
BATCH = 2000  # streamd's default batch_size
FIRST_MS = 1_764_547_200_000  # 2025-12-01T00:00Z; 400,000 rows at 100/ms span 4 s

_TAIL = """event_type text NOT NULL, payload jsonb NOT NULL, produced_at timestamptz NOT NULL,
    ingested_at timestamptz NOT NULL DEFAULT now(), meta jsonb"""


@dataclass(frozen=True)
class Candidate:
    name: str
    ddl: str  # {t}: the table name
    columns: str  # "text": (stream, entry_id, ...); "ids": (stream, entry_id, ms, seq, ...)
    stream_id: bool = False  # the stream as a smallint instead of text
    payload: str = "jsonb"  # "json": kept as sent, checked but not converted
    entry_id: bool = True  # False: no entry_id text column (readers would compute it)


def _chosen_variant(name: str, payload: str, entry_id: bool) -> Candidate:
    """The chosen key, PK (ms, seq, stream C), with another payload type or no entry_id."""
    text_id = " entry_id text NOT NULL," if entry_id else ""
    return Candidate(
        f"PK (ms, seq, stream C), {name}",
        f'CREATE TABLE {{t}} (stream text COLLATE "C" NOT NULL,{text_id}'
        f" entry_ms bigint NOT NULL, entry_seq bigint NOT NULL,"
        f" {_TAIL.replace('payload jsonb', f'payload {payload}')},"
        " PRIMARY KEY (entry_ms, entry_seq, stream));"
        " CREATE INDEX ON {t} USING brin (ingested_at)",
        "ids",
        payload=payload,
        entry_id=entry_id,
    )


CANDIDATES = (
    Candidate(
        "today: PK (stream, entry_id) text",
        f"CREATE TABLE {{t}} (stream text NOT NULL, entry_id text NOT NULL, {_TAIL},"
        " PRIMARY KEY (stream, entry_id)); CREATE INDEX ON {t} USING brin (ingested_at)",
        "text",
    ),
    Candidate(
        "today, ICU collation",
        f'CREATE TABLE {{t}} (stream text COLLATE "und-x-icu" NOT NULL,'
        f' entry_id text COLLATE "und-x-icu" NOT NULL, {_TAIL},'
        " PRIMARY KEY (stream, entry_id)); CREATE INDEX ON {t} USING brin (ingested_at)",
        "text",
    ),
    Candidate(
        "PK (stream C, ms, seq), entry_id text column",
        f'CREATE TABLE {{t}} (stream text COLLATE "C" NOT NULL, entry_id text NOT NULL,'
        f" entry_ms bigint NOT NULL, entry_seq bigint NOT NULL, {_TAIL},"
        " PRIMARY KEY (stream, entry_ms, entry_seq));"
        " CREATE INDEX ON {t} USING brin (ingested_at)",
        "ids",
    ),
    Candidate(
        "PK (stream ICU, ms, seq)",
        f'CREATE TABLE {{t}} (stream text COLLATE "und-x-icu" NOT NULL, entry_id text NOT NULL,'
        f" entry_ms bigint NOT NULL, entry_seq bigint NOT NULL, {_TAIL},"
        " PRIMARY KEY (stream, entry_ms, entry_seq));"
        " CREATE INDEX ON {t} USING brin (ingested_at)",
        "ids",
    ),
    Candidate(
        "PK (ms, seq, stream C)",
        f'CREATE TABLE {{t}} (stream text COLLATE "C" NOT NULL, entry_id text NOT NULL,'
        f" entry_ms bigint NOT NULL, entry_seq bigint NOT NULL, {_TAIL},"
        " PRIMARY KEY (entry_ms, entry_seq, stream));"
        " CREATE INDEX ON {t} USING brin (ingested_at)",
        "ids",
    ),
    *(
        _chosen_variant(name, payload, entry_id)
        for name, payload, entry_id in (
            ("payload json", "json", True),
            ("no entry_id column", "jsonb", False),
            ("json, no entry_id", "json", False),
        )
    ),
    Candidate(
        "PK (stream_id smallint, ms, seq)",
        f"CREATE TABLE {{t}} (stream smallint NOT NULL, entry_id text NOT NULL,"
        f" entry_ms bigint NOT NULL, entry_seq bigint NOT NULL, {_TAIL},"
        " PRIMARY KEY (stream, entry_ms, entry_seq));"
        " CREATE INDEX ON {t} USING brin (ingested_at)",
        "ids",
        stream_id=True,
    ),
    Candidate(
        "PK (stream C, ms, seq), btree time index",
        f'CREATE TABLE {{t}} (stream text COLLATE "C" NOT NULL, entry_id text NOT NULL,'
        f" entry_ms bigint NOT NULL, entry_seq bigint NOT NULL, {_TAIL},"
        " PRIMARY KEY (stream, entry_ms, entry_seq)); CREATE INDEX ON {t} (ingested_at)",
        "ids",
    ),
    Candidate(
        "PK (stream C, ms, seq), partitioned by day",
        f'CREATE TABLE {{t}} (stream text COLLATE "C" NOT NULL, entry_id text NOT NULL,'
        f" entry_ms bigint NOT NULL, entry_seq bigint NOT NULL, {_TAIL},"
        " PRIMARY KEY (stream, entry_ms, entry_seq)) PARTITION BY RANGE (entry_ms);"
        " CREATE INDEX ON {t} USING brin (ingested_at);"
        f" CREATE TABLE {{t}}_p1 PARTITION OF {{t}} FOR VALUES FROM ({FIRST_MS - 86_400_000})"
        f" TO ({FIRST_MS}); CREATE TABLE {{t}}_p2 PARTITION OF {{t}} FOR VALUES FROM"
        f" ({FIRST_MS}) TO ({FIRST_MS + 86_400_000})",
        "ids",
    ),
    Candidate(
        "no key (the floor)",
        f"CREATE TABLE {{t}} (stream text NOT NULL, entry_id text NOT NULL, {_TAIL});"
        " CREATE INDEX ON {t} USING brin (ingested_at)",
        "text",
    ),
)

_COLUMNS = {
    "text": ["stream", "entry_id", "event_type", "payload", "produced_at", "meta"],
    "ids": ["stream", "entry_id", "entry_ms", "entry_seq", "event_type", "payload", "produced_at"],
}


def columns_of(candidate: Candidate) -> list[str]:
    return [c for c in _COLUMNS[candidate.columns] if candidate.entry_id or c != "entry_id"]


def encode(candidate: Candidate, first: int, count: int) -> list[bytes]:
    """Binary COPY buffers of `count` rows, BATCH rows each, entry IDs from row `first` on."""
    ids = candidate.columns == "ids"
    ncols = len(columns_of(candidate))
    # jsonb's binary form is a version byte, then the text; json's is the text alone.
    json_version = b"\x01" if candidate.payload == "jsonb" else b""
    stream = struct.pack(">ih", 2, 1) if candidate.stream_id else struct.pack(">i", 6) + b"events"
    header = b"PGCOPY\n\xff\r\n\x00" + bytes(8)
    buffers = []
    for start in range(first, first + count, BATCH):
        parts = [header]
        for i in range(start, min(start + BATCH, first + count)):
            ms, seq = FIRST_MS + i // 100, i % 100
            entry_id = f"{ms}-{seq}".encode()
            kind = b"order_created" if i % 3 else b"page_viewed"
            payload = b'{"user_id": %d, "amount": %d.25, "currency": "EUR", "items": [1, 2, 3]}' % (
                i,
                i % 997,
            )
            row = [struct.pack(">h", ncols), stream]
            if candidate.entry_id:
                row += [struct.pack(">i", len(entry_id)), entry_id]
            if ids:
                row.append(struct.pack(">iqiq", 8, ms, 8, seq))
            row += [struct.pack(">i", len(kind)), kind]
            row += [struct.pack(">i", len(payload) + len(json_version)), json_version]
            row += [payload, struct.pack(">iq", 8, (ms - PG_EPOCH_MS) * 1000)]
            if not ids:
                row.append(b"\xff\xff\xff\xff")  # meta: NULL
            parts += row
        parts.append(b"\xff\xff")
        buffers.append(b"".join(parts))
    return buffers


async def run_one(dsn: str, candidate: Candidate, table: str, rows: int) -> tuple[float, float]:
    """(backend CPU µs per event, rows/s) of COPYing `rows` rows into a fresh table."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f"DROP TABLE IF EXISTS {table}")
        await conn.execute(candidate.ddl.format(t=table))
        buffers = encode(candidate, 0, rows)
        backend = psutil.Process(await conn.fetchval("SELECT pg_backend_pid()"))
        cpu0, t0 = sum(backend.cpu_times()[:2]), time.perf_counter()
        for buffer in buffers:
            await conn.copy_to_table(
                table,
                source=memoryview(buffer),
                columns=columns_of(candidate),
                format="binary",
            )
        wall = time.perf_counter() - t0
        cpu = sum(backend.cpu_times()[:2]) - cpu0
        await conn.execute(f"DROP TABLE {table}")
        return cpu / rows * 1e6, rows / wall
    finally:
        await conn.close()


async def bench(dsn: str, rows: int, repeat: int) -> None:
    results: dict[str, list[tuple[float, float]]] = {c.name: [] for c in CANDIDATES}
    for _ in range(repeat):
        for n, candidate in enumerate(CANDIDATES):
            results[candidate.name].append(await run_one(dsn, candidate, f"layout_{n}", rows))
    base = results[CANDIDATES[0].name]
    base_min, base_cpu = min(r[0] for r in base), statistics.median(r[0] for r in base)
    base_rate = statistics.median(r[1] for r in base)
    # The least disturbed round (min) is the better estimate of CPU on a shared machine.
    print(f"{rows:,} rows, binary COPY of {BATCH} per statement, {repeat} rounds")
    print(
        f"{'layout':<46} {'PG µs/event min':>15} {'ratio':>6} {'median':>7} {'ratio':>6}"
        f" {'rows/s':>9} {'ratio':>6}"
    )
    for name, samples in results.items():
        low = min(x[0] for x in samples)
        cpu = statistics.median(x[0] for x in samples)
        rate = statistics.median(x[1] for x in samples)
        print(
            f"{name:<46} {low:>15.2f} {low / base_min:>6.2f} {cpu:>7.2f} {cpu / base_cpu:>6.2f}"
            f" {rate:>9,.0f} {rate / base_rate:>6.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=400_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--postgres-dsn", default="", help="an existing server (else a private one)"
    )
    args = parser.parse_args()
    if args.postgres_dsn:
        asyncio.run(bench(args.postgres_dsn, args.rows, args.repeat))
        return
    shutil.rmtree(WORK / "pg-layouts", ignore_errors=True)
    template = WORK / "pg-template"
    if not template.exists():
        initdb(template)
    server = PostgresServer(WORK / "pg-layouts", template=template, fsync=True).start()
    try:
        asyncio.run(bench(server.dsn, args.rows, args.repeat))
    finally:
        server.stop()


if __name__ == "__main__":
    main()
