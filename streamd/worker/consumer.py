"""A consumer task: read -> batch -> write to Postgres -> acknowledge, until told to stop.

A batch is flushed when it holds `batch_size` entries, when `batch_timeout_s` has passed since its
first entry, or as soon as a read comes back short (the stream is drained), so latency at low rates
is one round trip, not the timeout. The task reads again only after its batch is committed and
acknowledged: memory is bounded by tasks x batch_size, and while Postgres is down the task holds
one batch and retries it, reading nothing more.
"""

from __future__ import annotations

import asyncio
import time

from streamd.backends.faults import TRANSIENT_ERRORS
from streamd.common.aio import wait_event
from streamd.common.backoff import Backoff
from streamd.config.settings import Settings
from streamd.observability.log import get_logger
from streamd.pipeline.batch import BatchReport, BatchWriter
from streamd.pipeline.envelope import RawEntry
from streamd.pipeline.retry import log_fault
from streamd.pipeline.streams import GroupStream


class Consumer:
    """One consumer task of the group, named `<host>:<pid>:<task>`."""

    def __init__(self, settings: Settings, stream: GroupStream, writer: BatchWriter) -> None:
        self.settings = settings
        self.stream = stream
        self.writer = writer
        self.log = get_logger(consumer=stream.consumer)
        self._stopping = asyncio.Event()
        # After a lost connection, Redis may have delivered entries whose reply never arrived:
        # they are pending under this consumer's name. Take them back before reading new ones,
        # rather than leaving them to the reaper's claim_min_idle_ms.
        self._check_own_pending = False

    @property
    def client_id(self) -> int | None:
        """CLIENT ID of the read connection, to wake a blocked read with CLIENT UNBLOCK."""
        return self.stream.client_id

    def stop(self) -> None:
        """Finish the batch in hand, then return from run(). Pair with a CLIENT UNBLOCK."""
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    async def run(self) -> None:
        backoff = Backoff(self.settings.retry_initial_s, self.settings.retry_max_s)
        while not self.stopping:
            try:
                entries = await self._fill_batch()
            except Exception as exc:
                if not await self._read_failed(exc, backoff):
                    raise
                continue
            backoff.reset()
            if entries:
                report = await self.writer.flush(self.stream, entries, self.log)
                self._log_flush(report)

    async def _read_failed(self, exc: BaseException, backoff: Backoff) -> bool:
        """After a failed read: True when the consumer may go on (the group is back, or after a
        backoff for a transient fault), False for an error it cannot handle."""
        self._check_own_pending = True
        try:
            if await self.stream.recover(exc, self.log):  # stream or group deleted under us
                return True
        except TRANSIENT_ERRORS as again:  # Redis went away while we recreated them
            exc = again
        if not isinstance(exc, TRANSIENT_ERRORS):
            return False
        delay = backoff.next_delay()
        log_fault(self.log, "read", exc, retry_in_s=round(delay, 3))
        await wait_event(self._stopping, delay)
        return True

    async def _fill_batch(self) -> list[RawEntry]:
        s = self.settings
        if self._check_own_pending:
            own = await self.stream.read(s.batch_size, None, own_pending=True)
            if own:
                self.log.info("own_pending_recovered", count=len(own))
                return own
            self._check_own_pending = False
        entries: list[RawEntry] = []
        deadline = 0.0
        while len(entries) < s.batch_size and not self.stopping:
            count = min(s.read_count, s.batch_size - len(entries))
            if entries:
                got = await self.stream.read(count, None)
            else:
                if self.stopping:
                    break
                got = await self.stream.read(count, s.block_ms)
            if not got:
                break
            if not entries:
                deadline = time.monotonic() + s.batch_timeout_s
            entries.extend(got)
            if len(got) < count or time.monotonic() >= deadline:
                break  # drained, or the batch is old enough: flush now
        return entries

    def _log_flush(self, report: BatchReport) -> None:
        # One line per batch is too many for journald at speed (its default limit is 10,000
        # lines per 30 s); the worker's ingest_progress line sums them up at info.
        self.log.debug(
            "batch_flushed",
            rows=report.inserted,
            duplicates=report.duplicates,
            dlq=len(report.dead),
            ms=round(report.total_s * 1000, 2),
            write_ms=round(report.write_s * 1000, 2),
        )
