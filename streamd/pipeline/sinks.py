"""Which sink writes a table's batches: the events layout's (sink.py) or, when the table's
[tables.<name>] section declares columns, the typed table's (typed_sink.py); and what
BatchWriter needs of either (Sink)."""

from __future__ import annotations

from typing import Protocol

import asyncpg

from streamd.config.settings import Settings
from streamd.config.tables import route
from streamd.pipeline.envelope import Rejection, Row
from streamd.pipeline.sink import Part, PostgresSink, WriteResult
from streamd.pipeline.typed_sink import TypedSink


class Sink(Protocol):
    """What BatchWriter needs of a sink."""

    stream: str

    async def write(
        self, conn: asyncpg.Connection, rows: list[Row], rejects: list[Rejection]
    ) -> WriteResult: ...

    async def write_parts(
        self, conn: asyncpg.Connection, parts: list[Part]
    ) -> list[WriteResult]: ...


def sink_for_table(settings: Settings, table: str) -> Sink:
    """The sink of one target table (routes.py makes one per table)."""
    spec = next((t for t in settings.tables if t.name == table and t.typed), None)
    if spec is not None:
        return TypedSink(settings.stream, spec, settings.dlq_table)
    return PostgresSink(settings.stream, table, settings.dlq_table)


def sink_for(settings: Settings, stream: str) -> Sink:
    """The sink for a stream's entries, by the [tables.<name>] routing."""
    spec = route(settings.tables, stream)
    return sink_for_table(settings, spec.name if spec is not None else settings.events_table)
