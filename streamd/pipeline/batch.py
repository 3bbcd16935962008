"""One batch's way through the pipeline: commit it to Postgres, then acknowledge it in Redis.

BatchWriter is shared by the consumer tasks and the reaper, so a reclaimed batch follows exactly
the same path as a fresh one; what a flush did is a BatchReport, handed to a BatchObserver (the
worker's metrics).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import asyncpg
import redis.exceptions

from streamd.backends.faults import TRANSIENT_ERRORS
from streamd.backends.redis_groups import group_gone
from streamd.common.backoff import Backoff
from streamd.config.settings import Settings
from streamd.pipeline.envelope import ENTRY_ID, PRODUCED_US, RawEntry, Rejection, Row, split_entries
from streamd.pipeline.retry import retry_transient
from streamd.pipeline.sink import Part, WriteResult
from streamd.pipeline.sinks import Sink
from streamd.pipeline.streams import GroupStream, ack_all


@dataclass(frozen=True, slots=True)
class BatchReport:
    """What one flush did, for logs and metrics."""

    consumer: str
    entries: int
    inserted: int
    duplicates: int
    dead: list[Rejection]
    write_s: float
    total_s: float
    # producer times of the committed rows: of every stream of the flush, on its leading report
    produced_us: list[int] = field(repr=False)
    committed_at: float = 0.0  # time.time() right after COMMIT
    stream: str = ""  # the stream the batch came from
    retries: int = 0  # transient faults the write and the ack waited out
    # A flush of several streams makes a report per stream; the first one leads: it stands for
    # the flush (one batch, its timing, the latencies of all its rows), the others only count
    # their stream's rows and dead letters.
    leads: bool = True


# Entries parsed between two yields to the event loop (BatchWriter._split): well under a ms.
SPLIT_SLICE = 500

BatchObserver = Callable[[BatchReport], None]
# One stream's entries in a flush: its handle, the entries read, dead letters decided already.
InPart = tuple[GroupStream, list[RawEntry], list[Rejection]]


class BatchWriter:
    """Commits a batch of raw entries to Postgres and then acknowledges it in Redis.

    Shared by consumer tasks and the reaper, so a reclaimed batch follows exactly the same path.
    """

    def __init__(
        self,
        settings: Settings,
        pool: asyncpg.Pool,
        sink: Sink,
        observer: BatchObserver | None = None,
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.sink = sink
        self.observer = observer

    async def flush(
        self,
        stream: GroupStream,
        entries: list[RawEntry],
        log: object,
        extra_dead: list[Rejection] | None = None,
    ) -> BatchReport:
        """Write and acknowledge. Transient faults are retried until they heal (or cancellation)."""
        return (await self.flush_parts([(stream, entries, extra_dead or [])], log))[0]

    async def flush_parts(self, parts: list[InPart], log: object) -> list[BatchReport]:
        """Write the entries of several streams (all bound for this writer's table) in one
        transaction, then acknowledge each stream's; a report per stream."""
        started = time.perf_counter()
        split = []
        for stream, entries, extra_dead in parts:
            rows, rejects = await self._split(entries)
            split.append(Part(stream.stream, rows, rejects + extra_dead))
        backoff = Backoff(self.settings.retry_initial_s, self.settings.retry_max_s)

        async def write() -> tuple[list[WriteResult], float]:
            async with self.pool.acquire() as conn:
                t0 = time.perf_counter()
                try:
                    written = await self.sink.write_parts(conn, split)
                except BaseException:
                    # A write cut off mid-way (server gone, timeout, cancellation) can leave the
                    # connection mid-protocol: never hand it back to the pool for reuse.
                    conn.terminate()
                    raise
                return written, time.perf_counter() - t0

        # Dead letters handed in (the reaper's poison) are held by this consumer too.
        lease = asyncio.create_task(self._keep_leases(parts), name="lease-renewal")
        retries = 0

        def count_retry(_exc: BaseException) -> None:
            nonlocal retries
            retries += 1

        try:
            results, write_s = await retry_transient(
                write, backoff=backoff, log=log, what="write", on_retry=count_retry
            )
            committed_at = time.time()
            acks = []
            for (stream, _, _), part, result in zip(parts, split, results, strict=True):
                committed = _without(part.rows, result.refused)
                acks.append((stream, committed, part.rejects + result.refused))
            await retry_transient(
                lambda: ack_all([(s, [r[ENTRY_ID] for r in c], d) for s, c, d in acks]),
                backoff=backoff,
                log=log,
                what="ack",
                on_retry=count_retry,
            )
        finally:
            lease.cancel()
        total_s = time.perf_counter() - started
        latencies = (
            [r[PRODUCED_US] for _, committed, _ in acks for r in committed] if self.observer else []
        )
        reports = [
            BatchReport(
                consumer=stream.consumer,
                entries=len(entries),
                inserted=result.inserted,
                duplicates=result.duplicates,
                dead=dead,
                write_s=write_s,
                total_s=total_s,
                produced_us=latencies if i == 0 else [],
                committed_at=committed_at,
                stream=stream.stream,
                retries=retries if i == 0 else 0,
                leads=i == 0,
            )
            for i, ((stream, entries, _), result, (_, _, dead)) in enumerate(
                zip(parts, results, acks, strict=True)
            )
        ]
        if self.observer is not None:
            for report in reports:
                self.observer(report)
        return reports

    async def _split(self, entries: list[RawEntry]) -> tuple[list[Row], list[Rejection]]:
        """split_entries, SPLIT_SLICE entries at a time, yielding to the event loop in between:
        a big batch never holds up the worker's other consumers for long (the quiet lane)."""
        s = self.settings
        if len(entries) <= SPLIT_SLICE:
            return split_entries(entries, s.max_event_bytes, s.keep_extra_fields)
        rows: list[Row] = []
        rejects: list[Rejection] = []
        for i in range(0, len(entries), SPLIT_SLICE):
            more_rows, more_rejects = split_entries(
                entries[i : i + SPLIT_SLICE], s.max_event_bytes, s.keep_extra_fields
            )
            rows += more_rows
            rejects += more_rejects
            await asyncio.sleep(0)
        return rows, rejects

    async def _keep_leases(self, parts: list[InPart]) -> None:
        """While a flush is slow (Postgres down, a huge batch), keep its entries' idle time below
        claim_min_idle_ms so no reaper takes over a batch that is still being worked on."""
        interval = self.settings.claim_min_idle_ms / 1000 / 3
        await asyncio.sleep(interval)  # most flushes end long before: no ID list for them
        held = [
            (stream, [entry[0] for entry in entries] + [r.entry_id for r in extra])
            for stream, entries, extra in parts
        ]
        held = [(stream, ids) for stream, ids in held if ids]
        while held:
            for stream, ids in list(held):
                try:
                    await stream.renew(ids)
                except TRANSIENT_ERRORS:
                    pass  # the flush's retries report outages
                except redis.exceptions.ResponseError as exc:
                    if group_gone(exc) is None:
                        raise
                    # nothing left to hold: the consumer's next read recreates the group
                    held.remove((stream, ids))
            await asyncio.sleep(interval)


def _without(rows: list[Row], refused: list[Rejection]) -> list[Row]:
    """The rows Postgres took: all of them, but for the ones it refused."""
    if not refused:
        return rows
    bad = {r.entry_id for r in refused}
    return [r for r in rows if r[ENTRY_ID] not in bad]
