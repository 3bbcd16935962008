"""The reaper of every stream a worker consumes: each round visits a bounded number of streams,
in turn, so 1,000 idle streams cost a few commands per round, not thousands.

A stream's recovery (reclaim, adoption, consumer cleanup, trim) is worker/reaper.py, one Reaper
per stream, made the first time the stream comes up and forgotten when it is no longer consumed.
"""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from streamd.common.aio import wait_event
from streamd.config.settings import Settings
from streamd.pipeline.reader import GroupReader
from streamd.pipeline.routes import Routes
from streamd.worker.consumer import Streams
from streamd.worker.reaper import Reaper

# Streams visited per round (reaper_interval_s): with more, each is visited every
# ceil(streams / STREAMS_PER_ROUND) rounds.
STREAMS_PER_ROUND = 100


class Reapers:
    def __init__(
        self,
        settings: Settings,
        client: aioredis.Redis,
        reader: GroupReader,
        streams: Streams,
        routes: Routes,
    ) -> None:
        self.settings = settings
        self.client = client
        self.reader = reader  # the reaper's own consumer name; its handles use `client`
        self.streams = streams
        self.routes = routes
        self._reapers: dict[str, Reaper] = {}
        self._next = 0  # where the next round starts in the current streams
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        self._stopping.set()
        for reaper in self._reapers.values():
            reaper.stop()

    def reaper(self, stream: str) -> Reaper:
        found = self._reapers.get(stream)
        if found is None:
            found = self._reapers[stream] = Reaper(
                self.settings, self.client, self.reader.stream(stream), self.routes.writer(stream)
            )
        return found

    async def run(self) -> None:
        while not self._stopping.is_set():
            await self.run_once()
            await wait_event(self._stopping, self.settings.reaper_interval_s)

    async def run_once(self) -> None:
        """One round over the next STREAMS_PER_ROUND streams; a stream's failed round is handled
        (and logged) by its own Reaper, and does not stop the others'."""
        names = self.streams.streams
        if len(self._reapers) > len(names):
            wanted = set(names)
            for gone in [n for n in self._reapers if n not in wanted]:
                del self._reapers[gone]
        if not names:
            return
        start = self._next % len(names)
        turn = [names[(start + i) % len(names)] for i in range(min(STREAMS_PER_ROUND, len(names)))]
        self._next = start + len(turn)
        for name in turn:
            if self._stopping.is_set():
                return
            reaper = self.reaper(name)
            try:
                await reaper.run_once()
            except Exception as exc:
                await reaper.round_failed(exc)
