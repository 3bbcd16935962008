"""Which writer a stream's entries go through: one BatchWriter (and sink) per target table,
chosen by the `[tables.<name>]` routing (Settings.table_for), shared by consumers and reaper."""

from __future__ import annotations

import asyncpg

from streamd.config.settings import Settings
from streamd.pipeline.batch import BatchObserver, BatchWriter
from streamd.pipeline.sinks import sink_for_table

# Streams come and go with patterns: the per-stream lookup is a cache, dropped when this large.
_CACHE_MAX = 4096


class Routes:
    def __init__(
        self, settings: Settings, pool: asyncpg.Pool, observer: BatchObserver | None = None
    ) -> None:
        self.settings = settings
        # The events tables, then the typed ones (their sections declare columns).
        tables = (*settings.table_names, *(t.name for t in settings.tables if t.typed))
        self._writers = {
            table: BatchWriter(settings, pool, sink_for_table(settings, table), observer)
            for table in tables
        }
        self._by_stream: dict[str, BatchWriter] = {}

    def writer(self, stream: str) -> BatchWriter:
        """The writer of the table this stream's entries go to."""
        found = self._by_stream.get(stream)
        if found is None:
            if len(self._by_stream) >= _CACHE_MAX:
                self._by_stream.clear()
            found = self._by_stream[stream] = self._writers[self.settings.table_for(stream)]
        return found
