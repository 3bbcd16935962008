"""Which sink writes a stream's entries: the events table's (sink.py) or, when the stream's
[tables.<name>] section declares columns, its typed table's (typed_sink.py); and what
BatchWriter needs of either (Sink)."""

from __future__ import annotations

from typing import Protocol

import asyncpg

from streamd.config.settings import Settings
from streamd.config.tables import route
from streamd.pipeline.envelope import Rejection, Row
from streamd.pipeline.sink import PostgresSink, WriteResult
from streamd.pipeline.typed_sink import TypedSink


class Sink(Protocol):
    """What BatchWriter needs of a sink."""

    stream: str

    async def write(
        self, conn: asyncpg.Connection, rows: list[Row], rejects: list[Rejection]
    ) -> WriteResult: ...


def sink_for(settings: Settings, stream: str) -> Sink:
    """The sink for a stream's entries: a typed table's when its [tables.<name>] section
    declares columns, else the events table's (as before typed tables)."""
    spec = route(settings.tables, stream)
    if spec is not None and spec.typed:
        return TypedSink(stream, spec, settings.dlq_table)
    return PostgresSink(stream, settings.events_table, settings.dlq_table)
