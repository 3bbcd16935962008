"""A consumer task: read -> batch -> write to Postgres -> acknowledge, until told to stop.

One task reads every stream the worker consumes, in one XREADGROUP per read (pipeline/reader.py);
a batch is split by target table at flush time, and each stream's entries are acknowledged on
their own stream.

A batch is flushed when it holds `batch_size` entries, when `batch_timeout_s` has passed since its
first entry, or as soon as a read comes back short (the stream is drained), so latency at low rates
is one round trip, not the timeout. The task reads again only after its batch is committed and
acknowledged: memory is bounded by tasks x batch_size, and while Postgres is down the task holds
one batch and retries it, reading nothing more.

With several streams, one consumer of each worker is its quiet lane (worker/backlogs.py): it keeps
to the streams without a backlog, in small batches, and reads on while its last one is written.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

from streamd.backends.faults import TRANSIENT_ERRORS
from streamd.common.aio import wait_event
from streamd.common.backoff import Backoff
from streamd.config.settings import Settings
from streamd.observability.log import get_logger
from streamd.pipeline.batch import BatchReport, BatchWriter, InPart
from streamd.pipeline.reader import GroupReader, StreamEntries
from streamd.pipeline.retry import log_fault
from streamd.pipeline.routes import Routes
from streamd.worker.backlogs import Backlogs
from streamd.worker.group_watch import GroupWatch

# Entries the quiet lane (worker/backlogs.py) takes per batch, at most.
LANE_BATCH = 200
# Batches the lane may have being written at once (each over a connection of the pool).
LANE_FLUSHES = 2


class Streams(Protocol):
    """What a consumer reads: the current streams, replaced whole when a discovery changes them."""

    streams: tuple[str, ...]
    refreshes: int


class Consumer:
    """One consumer task of the group, named `<host>:<pid>:<task>`, reading every stream."""

    def __init__(
        self,
        settings: Settings,
        reader: GroupReader,
        streams: Streams,
        routes: Routes,
        watch: GroupWatch | None = None,
        backlogs: Backlogs | None = None,
        *,
        lane: bool = False,
    ) -> None:
        """lane: this is the worker's quiet lane (worker/backlogs.py): while some streams have a
        backlog and others not, it reads only the others."""
        self.settings = settings
        self.reader = reader
        self.streams = streams
        self.routes = routes
        # The worker's, shared with its reapers: what `>` delivered tells an XGROUP SETID back.
        self.watch = watch if watch is not None else GroupWatch()
        # The worker's, shared by its consumers: which streams last answered a full reply.
        self.backlogs = backlogs if backlogs is not None else Backlogs()
        self.lane = lane
        self.batch_size = settings.batch_size
        self._lane_writes: list[asyncio.Task[None]] = []
        self.log = get_logger(consumer=reader.consumer)
        self._stopping = asyncio.Event()
        self._refreshes_seen = -1
        # After a lost connection, Redis may have delivered entries whose reply never arrived:
        # they are pending under this consumer's name. Take them back before reading new ones,
        # rather than leaving them to the reaper's claim_min_idle_ms.
        self._check_own_pending = False

    @property
    def client_id(self) -> int | None:
        """CLIENT ID of the read connection, to wake a blocked read with CLIENT UNBLOCK."""
        return self.reader.client_id

    def stop(self) -> None:
        """Finish the batch in hand, then return from run(). Pair with a CLIENT UNBLOCK."""
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    async def run(self) -> None:
        try:
            await self._run()
        finally:
            for write in self._lane_writes:  # cancelled or failed: take the others down with it
                write.cancel()

    async def _run(self) -> None:
        s = self.settings
        backoff = Backoff(s.retry_initial_s, s.retry_max_s)
        while not self.stopping:
            names = every = self._current()
            if self.lane:
                names = tuple(self.backlogs.lane_streams(every))
                # Among several streams, the lane's batches stay small until it knows which have
                # a backlog (a full reply), and then while it keeps to the others: it never holds
                # a quiet entry behind a big write of its own.
                small = len(every) > 1 and (len(names) < len(every) or not self.backlogs.seen)
                self.batch_size = min(s.batch_size, LANE_BATCH) if small else s.batch_size
            if not names:  # nothing to read yet (a pattern that matches nothing)
                await wait_event(self._stopping, min(1.0, self.settings.discover_interval_s))
                continue
            try:
                got, backlog = await self._fill_batch(names)
            except Exception as exc:
                if not await self._read_failed(exc, names, backoff):
                    raise
                continue
            backoff.reset()
            if got and self.lane and len(names) < len(every):
                await self._lane_flush(got, backlog)
            elif got:
                await self._flush(got, backlog)
        await self._lane_settle(0)

    async def _lane_flush(self, got: list[StreamEntries], backlog: set[str]) -> None:
        """The quiet lane reads on while its last batch is written (LANE_FLUSHES at most in
        flight): an entry that comes meanwhile is read at once, not after that write."""
        flush = asyncio.create_task(self._flush(got, backlog), name="lane-flush")
        self._lane_writes.append(flush)
        await self._lane_settle(LANE_FLUSHES - 1)

    async def _lane_settle(self, keep: int) -> None:
        """Await the lane's writes until at most `keep` are in flight; a finished one's error is
        raised here (as a consumer's own write's would be)."""
        writes = self._lane_writes
        while len(writes) > keep or (writes and writes[0].done()):
            try:
                await writes[0]
            finally:
                writes.pop(0)

    def _current(self) -> tuple[str, ...]:
        names = self.streams.streams
        if self.streams.refreshes != self._refreshes_seen:
            self._refreshes_seen = self.streams.refreshes
            self.reader.keep_only(names)
            self.backlogs.keep_only(names)
        return names

    async def _flush(self, got: list[StreamEntries], backlog: set[str]) -> None:
        """One flush per target table, each of its streams' entries in one transaction. Streams
        drained by this batch go first, in a flush of their own, then the ones with a backlog:
        a quiet stream's few entries never wait for a big batch of another's to be written."""
        quiet = [item for item in got if item[0].stream not in backlog]
        busy = [item for item in got if item[0].stream in backlog]
        for share in (quiet, busy) if quiet and busy else (got,):
            by_table: dict[int, tuple[BatchWriter, list[InPart]]] = {}
            for stream, entries in share:
                writer = self.routes.writer(stream.stream)
                by_table.setdefault(id(writer), (writer, []))[1].append((stream, entries, []))
            for writer, parts in by_table.values():
                reports = await writer.flush_parts(parts, self.log)
                self._log_flush(reports)

    async def _read_failed(
        self, exc: BaseException, names: tuple[str, ...], backoff: Backoff
    ) -> bool:
        """After a failed read: True when the consumer may go on (the group is back, or after a
        backoff for a transient fault), False for an error it cannot handle."""
        self._check_own_pending = True
        try:
            if await self.reader.recover(exc, names, self.log):  # stream or group deleted
                for name in names:
                    self.watch.forget(name)
                return True
        except TRANSIENT_ERRORS as again:  # Redis went away while we recreated them
            exc = again
        if not isinstance(exc, TRANSIENT_ERRORS):
            return False
        delay = backoff.next_delay()
        log_fault(self.log, "read", exc, retry_in_s=round(delay, 3))
        await wait_event(self._stopping, delay)
        return True

    async def _fill_batch(self, names: tuple[str, ...]) -> tuple[list[StreamEntries], set[str]]:
        """Entries of up to batch_size in all, from any of the streams, and the streams whose
        last reply was full (a backlog waits there).

        Fair share: the first read of every batch names every stream, with COUNT the batch's
        room divided among them, so a quiet stream's entries join the very next batch whatever
        backlog another has; the reads that top the batch up name only the streams whose last
        reply was full (more is waiting there). A batch never holds more than
        max(batch_size, streams) entries, and one stream's backlog never starves another's.
        """
        s = self.settings
        if self._check_own_pending:
            # The lane's writes in flight hold entries pending under our name: let them end
            # first, so that what is read back is only what no write of ours has in hand.
            await self._lane_settle(0)
            count = max(1, self.batch_size // len(names))
            own = await self.reader.read(names, count, None, own_pending=True)
            if own:
                self.log.info("own_pending_recovered", count=sum(len(e) for _, e in own))
                return own, set()
            self._check_own_pending = False
        held: dict[str, StreamEntries] = {}
        total = 0
        deadline = 0.0
        asking: tuple[str, ...] | list[str] = names
        while total < self.batch_size and not self.stopping:
            room = self.batch_size - total
            if held and room < len(asking):
                break  # less than an entry per stream left: not worth another round trip
            count = max(1, min(s.read_count, room // len(asking)))
            sent = self.watch.replies
            got = await self.reader.read(asking, count, None if held else s.block_ms)
            if not got:
                self.backlogs.saw(asking, ())
                break
            if not held:
                deadline = time.monotonic() + s.batch_timeout_s
            for stream, entries in got:
                self.watch.delivered(stream.stream, entries[0][0], entries[-1][0], sent)
                before = held.get(stream.stream)
                if before is None:
                    held[stream.stream] = (stream, entries)
                else:
                    before[1].extend(entries)
                total += len(entries)
            full = [stream.stream for stream, entries in got if len(entries) >= count]
            self.backlogs.saw(asking, full)
            asking = full
            if not asking or time.monotonic() >= deadline:
                break  # drained, or the batch is old enough: flush now
        return list(held.values()), set(asking) if held else set()

    def _log_flush(self, reports: list[BatchReport]) -> None:
        # One line per batch is too many for journald at speed (its default limit is 10,000
        # lines per 30 s); the worker's ingest_progress line sums them up at info.
        if not reports:
            return
        self.log.debug(
            "batch_flushed",
            rows=sum(r.inserted for r in reports),
            duplicates=sum(r.duplicates for r in reports),
            dlq=sum(len(r.dead) for r in reports),
            streams=len(reports),
            ms=round(reports[0].total_s * 1000, 2),
            write_ms=round(reports[0].write_s * 1000, 2),
        )
