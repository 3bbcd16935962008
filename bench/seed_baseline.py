"""A faithful re-implementation of the seed's ~250-line engine, the baseline streamd is measured
against (same Redis, same Postgres, same table, same events, in the same run).

The seed's design, as its README describes it: 5 asyncio workers (NUM_WORKERS), each
`XREADGROUP ... COUNT 100 BLOCK 5000` (XREAD_COUNT, XREAD_BLOCK_MS), a batch per worker flushed at
500 events (BATCH_SIZE) or after 2 s (BATCH_TIMEOUT_SECONDS), `asyncpg.executemany()` INSERT, XACK
after the insert. redis-py with decoded responses and its default reply parsing; the `data` text
goes to the JSONB column as it is (no parse and re-encode in Python, which would only slow the
baseline down). It writes the same columns into the same table as streamd (so the unique key
costs both the same), and it is not given any of streamd's optimisations.

Run on its own:  python -m bench.seed_baseline REDIS_URL POSTGRES_DSN [--count N]
(exits once N events are in the table). It writes into its own table, the seed's layout (the
text key (stream, entry_id), one heap: bench/run.py's TEXT_KEY_TABLE), not into the partitioned
table `streamd db init` makes now, whose key columns it would not fill.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import time
from datetime import UTC, datetime

import asyncpg
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

NUM_WORKERS = 5
XREAD_COUNT = 100
XREAD_BLOCK_MS = 5000
BATCH_SIZE = 500
BATCH_TIMEOUT_SECONDS = 2.0
STREAM, GROUP, TABLE = "events", "seed", "events"

INSERT = (
    f"INSERT INTO {TABLE} (stream, entry_id, event_type, payload, produced_at) "
    "VALUES ($1, $2, $3, $4::jsonb, $5)"
)


async def ensure_group(r: aioredis.Redis) -> None:
    try:
        await r.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


async def worker(n: int, r: aioredis.Redis, pool: asyncpg.Pool, stop: asyncio.Event) -> None:
    consumer = f"{socket.gethostname()}:{os.getpid()}:{n}"
    batch: list[tuple[str, str, str, str, datetime]] = []
    ids: list[str] = []
    started = time.monotonic()
    while not stop.is_set():
        # Block no longer than the open batch may wait, so "500 events or 2 s" holds.
        left_ms = int((BATCH_TIMEOUT_SECONDS - (time.monotonic() - started)) * 1000)
        block = max(1, min(XREAD_BLOCK_MS, left_ms)) if ids else XREAD_BLOCK_MS
        reply = await r.xreadgroup(GROUP, consumer, {STREAM: ">"}, count=XREAD_COUNT, block=block)
        for _stream, entries in reply or []:
            for entry_id, fields in entries:
                try:
                    ts = int(entry_id.split("-")[0])
                    produced = datetime.fromtimestamp(ts / 1000, UTC)
                    batch.append((STREAM, entry_id, fields["type"], fields["data"], produced))
                except (KeyError, ValueError) as exc:
                    await r.xadd(f"{STREAM}:dead", {"id": entry_id, "error": str(exc)})
                ids.append(entry_id)
        full = len(batch) >= BATCH_SIZE
        if ids and (full or time.monotonic() - started >= BATCH_TIMEOUT_SECONDS):
            async with pool.acquire() as conn:
                await conn.executemany(INSERT, batch)
            await r.xack(STREAM, GROUP, *ids)
            batch, ids, started = [], [], time.monotonic()
        elif not ids:
            started = time.monotonic()


async def run(redis_url: str, dsn: str, count: int | None) -> None:
    r = aioredis.Redis.from_url(redis_url, decode_responses=True, max_connections=NUM_WORKERS + 2)
    pool = await asyncpg.create_pool(dsn, min_size=NUM_WORKERS, max_size=NUM_WORKERS)
    await ensure_group(r)
    stop = asyncio.Event()
    tasks = [asyncio.create_task(worker(i, r, pool, stop)) for i in range(NUM_WORKERS)]
    try:
        if count is None:
            await asyncio.gather(*tasks)
        while count is not None:
            async with pool.acquire() as conn:
                if await conn.fetchval(f"SELECT count(*) FROM {TABLE}") >= count:
                    break
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await pool.close()
        await r.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("redis_url")
    parser.add_argument("postgres_dsn")
    parser.add_argument("--count", type=int, help="exit once this many rows are in the table")
    args = parser.parse_args()
    asyncio.run(run(args.redis_url, args.postgres_dsn, args.count))


if __name__ == "__main__":
    main()
