"""The raw limit: parallel binary COPY of the same rows straight into the same table, no Redis.

Rows are encoded before the clock starts (with streamd's own encoder, so the bytes Postgres parses
are identical); K connections then COPY chunks in autocommit until all rows are in. Whatever
streamd does on top (reading Redis, acknowledging, dead-letter checks) can only be slower: this
is the ceiling the drain ratio is measured against.
"""

from __future__ import annotations

import asyncio
import time

import asyncpg

from streamd.pipeline.envelope import PG_EPOCH_MS, Row
from streamd.pipeline.sink import PostgresSink


def make_rows(payloads: list[tuple[str, bytes]], first_ms: int) -> list[Row]:
    """Rows with synthetic, unique entry IDs in the same shape Redis gives ("<ms>-<seq>")."""
    rows = []
    for i, (event_type, payload) in enumerate(payloads):
        ms = first_ms + i // 100
        entry_id = f"{ms}-{i % 100}".encode()
        rows.append((entry_id, event_type.encode(), payload, (ms - PG_EPOCH_MS) * 1000, None, []))
    return rows


async def copy_parallel(
    dsn: str, rows: list[Row], *, connections: int, chunk: int = 5000, stream: str = "events"
) -> float:
    """COPY rows over `connections` connections; returns the seconds it took."""
    # The layout `streamd db init` creates (and partitions it already made for these rows' time).
    sink = PostgresSink(stream, "events", "dead_letter_queue", layout="ids")
    buffers = [sink.copy_source(rows[i : i + chunk]) for i in range(0, len(rows), chunk)]
    conns = [await asyncpg.connect(dsn) for _ in range(connections)]
    queue: asyncio.Queue[memoryview] = asyncio.Queue()
    for buffer in buffers:
        queue.put_nowait(buffer)

    async def drain(conn: asyncpg.Connection) -> None:
        while not queue.empty():
            buffer = queue.get_nowait()
            await conn.copy_to_table(
                "events",
                source=buffer,
                format="binary",
                columns=sink.columns,
            )

    try:
        started = time.perf_counter()
        await asyncio.gather(*(drain(c) for c in conns))
        return time.perf_counter() - started
    finally:
        for conn in conns:
            await conn.close()
