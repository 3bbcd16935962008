"""The Postgres side of a batch: binary COPY of the good rows, isolation of the rows Postgres
refuses, and the dead-letter rows, all committed in one transaction.

Fast path: one binary COPY straight into the events table, in autocommit (a single round trip).
Otherwise everything happens in one transaction. If the batch was already (partly)
committed before (a replay after a crash, or an entry reclaimed from a slow consumer), the primary
key refuses it and the batch is written again through a staging table with
`INSERT ... ON CONFLICT DO NOTHING`, which inserts only what is new. The staging table is a
temporary table that lives only as long as that transaction (ON COMMIT DROP), so it is safe behind
a pooler in transaction mode, where the next transaction may run on another server session.
If Postgres refuses a row for its data (bad JSON, bad encoding, too deep), the error names the
COPY line, so the refused row is split off and the rest is written again inside a savepoint: one
bad row costs one extra COPY, not a batch in the DLQ. Without a line number the batch is bisected.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import asyncpg

from streamd.backends.connections import statement_scope, transaction
from streamd.backends.sql import quote_ident
from streamd.pipeline import dead_letters as dlq
from streamd.pipeline.envelope import ENTRY_ID, FIELDS, Rejection, Row

_HEADER = b"PGCOPY\n\xff\r\n\x00" + b"\x00\x00\x00\x00" + b"\x00\x00\x00\x00"
_TRAILER = b"\xff\xff"
_NULL = b"\xff\xff\xff\xff"
_COLUMNS = ["stream", "entry_id", "event_type", "payload", "produced_at", "meta"]
_STAGE = "streamd_stage"
_COPY_LINE = re.compile(r"COPY \S+, line (\d+)")

# Errors about the rows themselves: bad values (22), constraint violations other than the unique
# key (23), and per-row limits such as JSON nested too deep or a value too large (54).
ROW_ERRORS = (
    asyncpg.DataError,
    asyncpg.IntegrityConstraintViolationError,
    asyncpg.ProgramLimitExceededError,
)

_pack_i = struct.Struct(">i").pack
_pack_ts = struct.Struct(">iq").pack
_pack_json = struct.Struct(">iB").pack


def encode_copy(row_start: bytes, rows: list[Row]) -> memoryview:
    """The binary COPY stream for rows: (stream, entry_id, event_type, payload, produced_at, meta).

    memoryview, because asyncpg takes plain bytes for a file path.
    """
    return encode_copy_parts([(row_start, rows)])


def encode_copy_parts(parts: list[tuple[bytes, list[Row]]]) -> memoryview:
    """One binary COPY stream for the rows of several streams, each with its own row start."""
    out = [_HEADER]
    for row_start, rows in parts:
        _encode_rows(out, row_start, rows)
    out.append(_TRAILER)
    return memoryview(b"".join(out))


def _encode_rows(parts: list[bytes], row_start: bytes, rows: list[Row]) -> None:
    extend = parts.extend
    # Per batch, encode once what repeats: a stream has few event types, and entry IDs and
    # payloads come in few lengths (the row start and the jsonb header depend only on those).
    types: dict[bytes, bytes] = {}
    id_heads: dict[int, bytes] = {}
    json_heads: dict[int, bytes] = {}
    for entry_id, event_type, payload, produced_us, meta, _fields in rows:
        type_field = types.get(event_type)
        if type_field is None:
            type_field = types[event_type] = _pack_i(len(event_type)) + event_type
        size = len(entry_id)
        id_head = id_heads.get(size)
        if id_head is None:
            id_head = id_heads[size] = row_start + _pack_i(size)
        size = len(payload)
        json_head = json_heads.get(size)
        if json_head is None:
            # jsonb's binary format is a version byte (1), then the JSON text.
            json_head = json_heads[size] = _pack_json(size + 1, 1)
        extend((id_head, entry_id, type_field, json_head, payload, _pack_ts(8, produced_us)))
        if meta is None:
            parts.append(_NULL)
        else:
            extend((_pack_json(len(meta) + 1, 1), meta))


@dataclass(slots=True)
class WriteResult:
    inserted: int = 0  # rows new to the table
    duplicates: int = 0  # rows already there (a replay), skipped
    # rows Postgres refused: they become dead letters
    refused: list[Rejection] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Part:
    """One stream's share of a batch: its rows and the entries that are dead letters already."""

    stream: str
    rows: list[Row]
    rejects: list[Rejection]


_Method = Callable[[asyncpg.Connection, str, list[Row]], Awaitable[int]]


class PostgresSink:
    """Writes batches into one events table and one DLQ table; a batch may hold the entries of
    several streams (each row says its stream). `stream` is the one `write` writes for."""

    def __init__(self, stream: str, events_table: str, dlq_table: str) -> None:
        self.stream = stream
        self.events_table = events_table
        self._row_starts: dict[str, bytes] = {}
        self._events = quote_ident(events_table)
        self._dlq_insert = dlq.insert_sql(quote_ident(dlq_table))
        self._stage_create = (
            f"CREATE TEMP TABLE IF NOT EXISTS {_STAGE} "
            f"(LIKE {self._events} INCLUDING DEFAULTS) ON COMMIT DROP"
        )
        cols = ", ".join(_COLUMNS)
        self._stage_insert = (
            f"INSERT INTO {self._events} ({cols}) SELECT {cols} FROM {_STAGE} "
            "ON CONFLICT (stream, entry_id) DO NOTHING"
        )

    def _row_start(self, stream: str) -> bytes:
        """Every row starts with the column count and the (constant per stream) stream column."""
        start = self._row_starts.get(stream)
        if start is None:
            if len(self._row_starts) >= 4096:  # streams come and go (patterns): stay bounded
                self._row_starts.clear()
            name = stream.encode()
            start = self._row_starts[stream] = (
                struct.pack(">h", len(_COLUMNS)) + _pack_i(len(name)) + name
            )
        return start

    def copy_source(self, rows: list[Row], stream: str | None = None) -> memoryview:
        """The binary COPY stream this sink sends for rows of a stream (default: `stream`)."""
        return encode_copy(self._row_start(stream or self.stream), rows)

    async def write(
        self, conn: asyncpg.Connection, rows: list[Row], rejects: list[Rejection]
    ) -> WriteResult:
        """Commit rows and dead-letter rows of `stream` in one transaction."""
        return (await self.write_parts(conn, [Part(self.stream, rows, rejects)]))[0]

    async def write_parts(self, conn: asyncpg.Connection, parts: list[Part]) -> list[WriteResult]:
        """Commit every part's rows and dead-letter rows in one transaction; a result per part.
        Transient errors propagate."""
        if any(p.rows for p in parts) and not any(p.rejects for p in parts):
            # The common case: one COPY in autocommit, one round trip, atomic on its own. If
            # Postgres refuses it for any row's sake, nothing was written: take the careful path.
            try:
                async with statement_scope(conn):
                    await self._copy_parts(conn, parts)
                return [WriteResult(inserted=len(p.rows)) for p in parts]
            except ROW_ERRORS:
                pass
        try:
            return await self._write_with(conn, parts, self._copy)
        except asyncpg.UniqueViolationError:
            # Some of these rows are already committed: write only what is new.
            return await self._write_with(conn, parts, self._copy_staged)

    async def _write_with(
        self, conn: asyncpg.Connection, parts: list[Part], method: _Method
    ) -> list[WriteResult]:
        results = [WriteResult() for _ in parts]
        async with transaction(conn):
            for part, result in zip(parts, results, strict=True):
                if part.rows:
                    await self._insert_isolating(conn, part.stream, part.rows, method, result)
                dead = part.rejects + result.refused
                if dead:
                    await conn.executemany(self._dlq_insert, dlq.table_rows(part.stream, dead))
        return results

    async def _insert_isolating(
        self,
        conn: asyncpg.Connection,
        stream: str,
        rows: list[Row],
        method: _Method,
        result: WriteResult,
    ) -> None:
        """Insert rows in the open transaction; rows Postgres refuses go to result.refused."""
        while rows:
            try:
                async with conn.transaction():  # a savepoint: a refusal undoes only this attempt
                    inserted = await method(conn, stream, rows)
            except ROW_ERRORS as exc:
                if isinstance(exc, asyncpg.UniqueViolationError):
                    raise
                if len(rows) == 1:
                    result.refused.append(_refusal(rows[0], exc))
                    return
                bad = _failing_row(exc, len(rows))
                if bad is None:  # no line number: bisect
                    middle = len(rows) // 2
                    await self._insert_isolating(conn, stream, rows[:middle], method, result)
                    rows = rows[middle:]
                    continue
                if bad:
                    await self._insert_isolating(conn, stream, rows[:bad], method, result)
                result.refused.append(_refusal(rows[bad], exc))
                rows = rows[bad + 1 :]
            else:
                result.inserted += inserted
                result.duplicates += len(rows) - inserted
                return

    async def _copy_parts(self, conn: asyncpg.Connection, parts: list[Part]) -> None:
        source = encode_copy_parts([(self._row_start(p.stream), p.rows) for p in parts if p.rows])
        await conn.copy_to_table(
            self.events_table, source=source, columns=_COLUMNS, format="binary"
        )

    async def _copy(self, conn: asyncpg.Connection, stream: str, rows: list[Row]) -> int:
        await conn.copy_to_table(
            self.events_table,
            source=self.copy_source(rows, stream),
            columns=_COLUMNS,
            format="binary",
        )
        return len(rows)

    async def _copy_staged(self, conn: asyncpg.Connection, stream: str, rows: list[Row]) -> int:
        await conn.execute(self._stage_create)
        await conn.copy_to_table(
            _STAGE,
            source=self.copy_source(rows, stream),
            columns=_COLUMNS,
            format="binary",
        )
        status = await conn.execute(self._stage_insert)
        await conn.execute(f"TRUNCATE {_STAGE}")
        return int(status.rsplit(" ", 1)[-1])


def _failing_row(exc: asyncpg.PostgresError, count: int) -> int | None:
    """The index of the row a COPY error names ("COPY events, line 7, ..."), if any."""
    found = _COPY_LINE.search(getattr(exc, "context", None) or "")
    if found is None:
        return None
    index = int(found.group(1)) - 1
    return index if 0 <= index < count else None


_REASONS = {
    "22P02": "invalid_json",  # invalid_text_representation: JSON syntax
    "22021": "invalid_encoding",  # character_not_in_repertoire: bad UTF-8 or NUL in text
    "22P05": "invalid_json",  # untranslatable_character: \u0000 in JSON
    "54001": "too_deeply_nested",  # statement_too_complex: stack depth while parsing JSON
}


def _refusal(row: Row, exc: asyncpg.PostgresError) -> Rejection:
    where = getattr(exc, "context", None) or ""
    column = re.search(r"column (\w+)", where)
    field_name = {"payload": "data", "event_type": "type", "meta": "meta"}.get(
        column.group(1) if column else "", ""
    )
    detail = f" ({exc.detail})" if getattr(exc, "detail", None) else ""
    message = str(exc).splitlines()[0] + detail
    error = f"{field_name}: {message}" if field_name else message
    reason = _REASONS.get(exc.sqlstate or "", "rejected_by_postgres")
    return Rejection(row[ENTRY_ID], row[FIELDS], reason, f"Postgres refused the row: {error}")


# The typed tables' sink (typed_sink.py) isolates the rows Postgres refuses the same way.
failing_row = _failing_row
refusal = _refusal
