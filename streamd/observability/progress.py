"""What a worker says at info level while it works, so that a journal can keep it all:

- one `ingest_progress` line every log_interval_s: rows, batches, dead letters by reason,
  retries, slow batches, the group's lag and pending (entries and seconds), p50/p99 latency;
- a `dead_letter` warning per dead letter (stream, entry ID, reason; never its payload), at most
  DEAD_LETTER_WARNINGS per interval, then one `dead_letters_suppressed` warning counting the
  rest by reason;
- a `batch_slow` warning for a batch that took longer than slow_batch_s, retries included.

A line per batch (`batch_flushed`, now at debug) was thousands a minute at speed: journald's
default rate limit, 10,000 lines per 30 s, then drops lines, errors included. These stay at about
one line per interval per worker whatever the rate.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis

from streamd.common.aio import wait_event
from streamd.common.text import as_text
from streamd.config.settings import Settings
from streamd.observability.latency import LatencyDigest
from streamd.observability.log import get_logger
from streamd.observability.redis_stats import read_backlog_ages, read_redis_stats
from streamd.pipeline.batch import BatchReport
from streamd.pipeline.envelope import Rejection

DEAD_LETTER_WARNINGS = 5  # per interval and worker; the rest are counted
BACKLOG_TIMEOUT_S = 2.0  # reading the lag must never hold the summary (or a drain) up for long
SUPPRESSION_WINDOW_S = 10.0  # with log_interval_s = 0 (no summaries), the warnings' window


@dataclass(slots=True)
class Interval:
    """What the batches of one interval did."""

    started: float = field(default_factory=time.monotonic)
    rows: int = 0
    batches: int = 0
    duplicates: int = 0
    retries: int = 0
    slow: int = 0
    dead: Counter[str] = field(default_factory=Counter)
    latency: LatencyDigest = field(default_factory=LatencyDigest)


class ProgressLog:
    """One per worker: its batch observer, and (run()) the task that writes the summaries."""

    def __init__(self, settings: Settings, client: aioredis.Redis) -> None:
        self.settings = settings
        self.client = client
        self.log = get_logger()
        self.interval = Interval()
        self.window_s = settings.log_interval_s or SUPPRESSION_WINDOW_S
        self._warned = 0
        self._suppressed: Counter[tuple[str, str]] = Counter()  # (stream, reason) -> count
        self._window_started = time.monotonic()
        self._stopping = asyncio.Event()

    # --- the batch observer --------------------------------------------------------------------

    def observe(self, report: BatchReport) -> None:
        now = time.monotonic()
        if now - self._window_started >= self.window_s:
            self._close_window(now)
        i = self.interval
        i.rows += report.inserted
        i.duplicates += report.duplicates
        for rejection in report.dead:
            i.dead[rejection.reason] += 1
            self._dead_letter(report.stream, rejection)
        if not report.leads:  # another stream's share of a batch already counted
            return
        i.batches += 1
        i.retries += report.retries
        i.latency.add(report.produced_us, report.committed_at)
        if report.total_s >= self.settings.slow_batch_s:
            i.slow += 1
            self.log.warning(
                "batch_slow",
                stream=report.stream,
                consumer=report.consumer,
                entries=report.entries,
                rows=report.inserted,
                ms=round(report.total_s * 1000, 1),
                write_ms=round(report.write_s * 1000, 1),
                retries=report.retries,
                slow_batch_s=self.settings.slow_batch_s,
            )

    def _dead_letter(self, stream: str, rejection: Rejection) -> None:
        if self._warned < DEAD_LETTER_WARNINGS:
            self._warned += 1
            event_type = rejection.event_type
            self.log.warning(
                "dead_letter",
                stream=stream,
                entry_id=as_text(rejection.entry_id),
                reason=rejection.reason,
                event_type=None if event_type is None else as_text(event_type)[:128],
                deliveries=rejection.deliveries,
                see="streamd dlq list",  # the precise error; the payload is never logged
            )
        else:
            self._suppressed[(stream, rejection.reason)] += 1

    def _close_window(self, now: float) -> None:
        """The dead-letter warnings' window ends: count what it did not show, start another."""
        by_stream: dict[str, dict[str, int]] = {}
        for (stream, reason), count in sorted(self._suppressed.items()):
            by_stream.setdefault(stream, {})[reason] = count
        for stream, reasons in by_stream.items():
            self.log.warning(
                "dead_letters_suppressed",
                stream=stream,
                count=sum(reasons.values()),
                by_reason=reasons,
                window_s=round(now - self._window_started, 1),
                shown=self._warned,
            )
        self._suppressed.clear()
        self._warned = 0
        self._window_started = now

    # --- the summaries -------------------------------------------------------------------------

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        """Write a summary every log_interval_s until stop() (the worker writes a last one after
        its drain)."""
        while not await wait_event(self._stopping, self.settings.log_interval_s):
            await self.flush()

    async def flush(self) -> None:
        """Write this interval's summary (unless nothing happened and nothing waits), and start
        the next interval."""
        now = time.monotonic()
        done, self.interval = self.interval, Interval(started=now)
        self._close_window(now)
        backlog = await self._backlog()
        waiting = bool(backlog.get("lag") or backlog.get("pending"))
        if not done.batches and not waiting:
            return  # idle: no line every few seconds forever
        elapsed = max(now - done.started, 1e-9)
        p50, p99 = done.latency.quantile(0.5), done.latency.quantile(0.99)
        self.log.info(
            "ingest_progress",
            stream=",".join(self.settings.stream_names),
            interval_s=round(elapsed, 1),
            rows=done.rows,
            rows_per_s=round(done.rows / elapsed, 1),
            batches=done.batches,
            duplicates=done.duplicates,
            dead=sum(done.dead.values()),
            dead_by_reason=dict(sorted(done.dead.items())),
            retries=done.retries,
            slow_batches=done.slow,
            **backlog,
            p50_ms=None if p50 is None else round(p50 * 1000, 2),
            p99_ms=None if p99 is None else round(p99 * 1000, 2),
        )

    async def _backlog(self) -> dict[str, Any]:
        """The group's lag and pending, in entries and in seconds; None where Redis did not say."""
        out: dict[str, Any] = dict.fromkeys(("lag", "lag_s", "pending", "pending_age_s"))
        if self.settings.streams:  # many streams: their figures are `streamd monitor`'s
            return out
        with contextlib.suppress(Exception):  # a summary without the lag beats no summary
            async with asyncio.timeout(BACKLOG_TIMEOUT_S):
                stats = await read_redis_stats(self.client, self.settings)
                out["lag"], out["pending"] = stats.lag, stats.pending
                ages = await read_backlog_ages(self.client, self.settings, stats)
                if ages is not None:
                    out["lag_s"] = round(ages.lag_s, 3)
                    out["pending_age_s"] = round(ages.pending_age_s, 3)
        return out
