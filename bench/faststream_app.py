"""The same job done by a FastStream app, as a competent FastStream user would write it: the
second reference streamd's drain is measured against (bench/run.py's `FastStream app`).

A `RedisBroker` with one batch subscriber, `StreamSub(..., group=, consumer=, batch=True,
max_records=)`; the handler writes the whole batch with asyncpg's `copy_records_to_table` (binary
COPY, one autocommit transaction) and returns, and FastStream's default ack policy
(REJECT_ON_ERROR) then XACKs the batch's entry IDs in one command: acked after the commit, and a
batch whose handler raised stays pending. The table is the seed's layout with streamd's columns
(bench/run.py's TEXT_KEY_TABLE, primary key (stream, entry_id)); a batch that meets rows already
there (a redelivery) falls back to `INSERT ... ON CONFLICT DO NOTHING`. No reclaiming of other
consumers' pending entries (FastStream would need `min_idle_time`, which then reads nothing new).

Two worker processes, the FastStream CLI's own supervisor (spawned, so each imports this module
and gets its own consumer name in the same group):

    STREAMD_REDIS_URL=redis://... STREAMD_POSTGRES_DSN=postgresql://... \\
        python -m faststream run bench.faststream_app:app --workers 2
"""

from __future__ import annotations

import os
import socket
from datetime import UTC, datetime
from typing import Any

import asyncpg
import redis.asyncio as aioredis
from faststream import AckPolicy, FastStream
from faststream.redis import RedisBroker, StreamSub
from faststream.redis.annotations import RedisBatchStreamMessage
from redis.exceptions import ResponseError

MAX_RECORDS = 1000  # XREADGROUP COUNT: one batch, one COPY, one XACK
STREAM, GROUP, TABLE = "events", "faststream", "events"
COLUMNS = ("stream", "entry_id", "event_type", "payload", "produced_at")
INSERT_NEW = (
    f"INSERT INTO {TABLE} ({', '.join(COLUMNS)}) VALUES ($1, $2, $3, $4::jsonb, $5)"
    " ON CONFLICT DO NOTHING"
)

REDIS_URL = os.environ["STREAMD_REDIS_URL"]
POSTGRES_DSN = os.environ["STREAMD_POSTGRES_DSN"]
CONSUMER = f"{socket.gethostname()}-{os.getpid()}"

broker = RedisBroker(REDIS_URL)
app = FastStream(broker)
pool: asyncpg.Pool | None = None


@app.on_startup
async def start() -> None:
    global pool
    # StreamSub makes its group at "$" (new entries only); the backlog already in the stream
    # is this app's work too, so the group starts at 0. last_id="0" would not do: the worker
    # that finds the group already there would then read only its own pending entries, forever.
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        await client.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise
    finally:
        await client.aclose()
    pool = await asyncpg.create_pool(POSTGRES_DSN, min_size=1, max_size=2)


@app.on_shutdown
async def stop() -> None:
    if pool is not None:
        await pool.close()


@broker.subscriber(
    stream=StreamSub(STREAM, group=GROUP, consumer=CONSUMER, batch=True, max_records=MAX_RECORDS),
    ack_policy=AckPolicy.REJECT_ON_ERROR,
)
async def ingest(body: list[dict[str, Any]], msg: RedisBatchStreamMessage) -> None:
    assert pool is not None
    ids = [entry_id.decode() for entry_id in msg.raw_message["message_ids"]]
    records = [
        (STREAM, entry_id, event["type"], event["data"], produced_at(entry_id))
        for entry_id, event in zip(ids, body, strict=True)
    ]
    async with pool.acquire() as conn:
        try:
            await conn.copy_records_to_table(TABLE, records=records, columns=COLUMNS)
        except asyncpg.UniqueViolationError:  # a redelivered batch: keep the rows already there
            await conn.executemany(INSERT_NEW, records)


def produced_at(entry_id: str) -> datetime:
    """The entry ID's time (set by Redis), as the seed's design takes it."""
    return datetime.fromtimestamp(int(entry_id.split("-", 1)[0]) / 1000, UTC)
