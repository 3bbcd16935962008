"""The streams a worker consumes: `streams` resolved at start and every discover_interval_s.

Names are consumed whether or not they exist yet (their group creates them); patterns are
resolved with SCAN TYPE stream (backends/discovery.py), so a stream created while serve runs is
consumed within discover_interval_s, with no restart. A stream's consumer group is created the
first time it is found, before any consumer reads it. A pattern that matches nothing is a
warning, once (again only after it matched something in between), never an error.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import redis.asyncio as aioredis

from streamd.backends.discovery import MAX_STREAMS, SCAN_COUNT, resolve_streams
from streamd.backends.faults import TRANSIENT_ERRORS
from streamd.backends.redis_groups import ensure_group
from streamd.common.aio import wait_event
from streamd.common.text import as_text
from streamd.config.settings import Settings
from streamd.config.tables import is_pattern
from streamd.observability.log import get_logger
from streamd.pipeline.retry import log_fault


class StreamSet:
    """The current streams (a tuple, replaced whole on a change), and the loop that finds them."""

    def __init__(self, settings: Settings, client: aioredis.Redis) -> None:
        self.settings = settings
        self.client = client
        self.log = get_logger()
        self.streams: tuple[str, ...] = ()
        self.refreshes = 0  # discoveries done; readers forget the streams they found gone
        self.on_change: list[Callable[[], None]] = []
        self._names = frozenset(n for n in settings.stream_names if not is_pattern(n))
        self._unmatched: set[str] = set()
        self._truncated = 0
        self._stopping = asyncio.Event()

    @property
    def has_patterns(self) -> bool:
        return any(is_pattern(n) for n in self.settings.stream_names)

    def named(self, stream: str) -> bool:
        """True for a stream the config names (not one a pattern found): created when missing."""
        return stream in self._names

    def stop(self) -> None:
        self._stopping.set()

    async def refresh(self) -> tuple[str, ...]:
        """Resolve the names again, create the groups of new streams, publish the result."""
        s = self.settings
        found = await resolve_streams(
            self.client, s.stream_names, dead_stream=s.dlq_stream, limit=MAX_STREAMS
        )
        self._warn(found.unmatched, found.truncated)
        if self.refreshes == 0:
            await self._warn_other_types(found.streams)
        known = set(self.streams)
        ready = []
        for name in found.streams:
            # A stream a pattern found may be deleted by now: then it is left out this time.
            if name in known or await ensure_group(
                self.client, name, s.group, mkstream=self.named(name)
            ):
                ready.append(name)
            elif self.named(name) or await self.client.exists(name):
                ready.append(name)  # the group was there already
        streams = tuple(ready)
        self.refreshes += 1
        changed = streams != self.streams
        if changed:
            added = [n for n in streams if n not in known]
            removed = len(known - set(streams))
            if self.streams or len(streams) > 1:
                self.log.info(
                    "streams_discovered",
                    streams=len(streams),
                    added=added[:20],
                    added_count=len(added),
                    removed=removed,
                )
            self.streams = streams
            for notify in self.on_change:
                notify()
        return streams

    def _warn(self, unmatched: tuple[str, ...], truncated: int) -> None:
        for pattern in unmatched:
            if pattern not in self._unmatched:
                self.log.warning(
                    "stream_pattern_unmatched",
                    pattern=pattern,
                    note="no stream matches it yet; streams created later are found within "
                    f"discover_interval_s ({self.settings.discover_interval_s} s)",
                )
        self._unmatched = set(unmatched)
        if truncated and truncated != self._truncated:
            self.log.warning(
                "streams_truncated",
                limit=MAX_STREAMS,
                left_out=truncated,
                note="serve consumes at most this many streams; narrow the patterns or run "
                "another serve for the rest",
            )
        self._truncated = truncated

    async def _warn_other_types(self, streams: tuple[str, ...]) -> None:
        """Once, at start: keys a pattern matches that are not streams (a list, a hash) are
        never read; say so, since the operator may expect them consumed."""
        known = set(streams)
        for pattern in (n for n in self.settings.stream_names if is_pattern(n)):
            others = [
                key
                async for key in self.client.scan_iter(match=pattern, count=SCAN_COUNT)
                if as_text(key) not in known
            ]
            others = [k for k in others if await self.client.type(k) not in (b"stream", "stream")]
            if others:
                self.log.warning(
                    "stream_pattern_skipped_keys",
                    pattern=pattern,
                    count=len(others),
                    keys=sorted(as_text(k) for k in others)[:10],
                    note="keys of another type than stream are never consumed",
                )

    async def run(self) -> None:
        """Discover again every discover_interval_s until stop(); a fault is logged and the
        next interval tries again (the streams known so far are consumed meanwhile)."""
        interval = self.settings.discover_interval_s
        while not await wait_event(self._stopping, interval):
            try:
                await self.refresh()
            except TRANSIENT_ERRORS as exc:
                log_fault(self.log, "discover", exc, retry_in_s=interval)
