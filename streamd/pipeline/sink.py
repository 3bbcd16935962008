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

The table's layout (backends/layout.py) decides the COPY columns: the "ids" layout also gets the
entry ID as two bigints (entry_ms, entry_seq). A partitioned table gets the partitions a batch's
time needs before the batch is written (backends/partitions.py): a row for which no partition
exists is never refused, nor taken for a bad row. A batch whose time lies in one partition (the
common case: a batch spans milliseconds) is copied straight into it, which spares Postgres
routing each row through the parent (bench/pg_cost.py); in a transaction that checks, once the
COPY holds the partition's lock, that it is still attached, since rows written into a partition
detached meanwhile (retention detaches, then drops) would have left the table. A row outside
that partition, or a partition gone, and the batch goes through the parent as before.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import asyncpg

from streamd.backends import layout as layouts
from streamd.backends import partitions
from streamd.backends.connections import statement_scope, transaction
from streamd.backends.sql import quote_ident
from streamd.errors import BootError
from streamd.pipeline import dead_letters as dlq
from streamd.pipeline.envelope import Rejection, Row
from streamd.pipeline.refused_rows import ROW_ERRORS, isolate_rows

_HEADER = b"PGCOPY\n\xff\r\n\x00" + b"\x00\x00\x00\x00" + b"\x00\x00\x00\x00"
_TRAILER = b"\xff\xff"
_NULL = b"\xff\xff\xff\xff"
_STAGE = "streamd_stage"
# Rows encoded between two yields to the event loop (encode_copy_chunks): about a millisecond.
COPY_SLICE = 256
# Whether a partition is (still) attached to the table; asked after the COPY into it, which
# holds a lock that DETACH waits for.
ATTACHED = """
SELECT EXISTS (SELECT 1 FROM pg_inherits WHERE inhrelid = to_regclass(quote_ident($1))
               AND inhparent = to_regclass(quote_ident($2)) AND NOT inhdetachpending)
"""


_pack_i = struct.Struct(">i").pack
_pack_ts = struct.Struct(">iq").pack
_pack_json = struct.Struct(">iB").pack
_pack_ms = struct.Struct(">iq").pack
# entry_seq: a sequence number past 2**63 (valid in Redis) is stored as its two's complement,
# which keeps every ID distinct (it is the key), if not in order.
_pack_seq = struct.Struct(">iQ").pack


def encode_copy(row_start: bytes, rows: list[Row], with_ids: bool = False) -> memoryview:
    """The binary COPY stream for rows: the columns of layouts.COPY_COLUMNS, "ids" (with_ids)
    or "text".

    memoryview, because asyncpg takes plain bytes for a file path.
    """
    return encode_copy_parts([(row_start, rows)], with_ids)


def encode_copy_parts(parts: list[tuple[bytes, list[Row]]], with_ids: bool = False) -> memoryview:
    """One binary COPY stream for the rows of several streams, each with its own row start."""
    out = [_HEADER]
    encode = _encode_id_rows if with_ids else _encode_rows
    for row_start, rows in parts:
        encode(out, row_start, rows)
    out.append(_TRAILER)
    return memoryview(b"".join(out))


async def encode_copy_chunks(
    parts: list[tuple[bytes, list[Row]]], with_ids: bool = False
) -> AsyncIterator[bytes]:
    """The stream of encode_copy_parts, made and sent COPY_SLICE rows at a time, yielding to the
    event loop in between: a big batch being encoded never holds up the worker's other consumers
    (the quiet lane, worker/backlogs.py) for more than a slice."""
    out = [_HEADER]
    encode = _encode_id_rows if with_ids else _encode_rows
    pending = 0  # rows encoded since the last yield
    for row_start, rows in parts:
        for i in range(0, len(rows), COPY_SLICE):
            piece = rows[i : i + COPY_SLICE]
            encode(out, row_start, piece)
            pending += len(piece)
            if pending >= COPY_SLICE:
                yield b"".join(out)
                out.clear()
                pending = 0
                await asyncio.sleep(0)
    out.append(_TRAILER)
    yield b"".join(out)


# Per batch, each encoder packs once what repeats: a stream has few event types; entry IDs and
# payloads come in few lengths; entries of one millisecond share their time (ts and the ID's),
# and sequence numbers repeat from one millisecond to the next. One extend per row.


def _encode_rows(parts: list[bytes], row_start: bytes, rows: list[Row]) -> None:
    """(stream, entry_id, event_type, payload, produced_at, meta)"""
    extend = parts.extend
    types: dict[bytes, bytes] = {}
    id_heads: dict[int, bytes] = {}
    json_heads: dict[int, bytes] = {}
    last_us, ts_field = None, b""
    for entry_id, event_type, payload, produced_us, meta, _fields in rows:
        id_head = id_heads.get(len(entry_id))
        if id_head is None:
            id_head = id_heads[len(entry_id)] = row_start + _pack_i(len(entry_id))
        type_field = types.get(event_type)
        if type_field is None:
            type_field = types[event_type] = _pack_i(len(event_type)) + event_type
        json_head = json_heads.get(len(payload))
        if json_head is None:
            # jsonb's binary format is a version byte (1), then the JSON text.
            json_head = json_heads[len(payload)] = _pack_json(len(payload) + 1, 1)
        if produced_us != last_us:
            last_us, ts_field = produced_us, _pack_ts(8, produced_us)
        if meta is None:
            extend((id_head, entry_id, type_field, json_head, payload, ts_field, _NULL))
        else:
            meta_head = _pack_json(len(meta) + 1, 1)
            extend((id_head, entry_id, type_field, json_head, payload, ts_field, meta_head, meta))


def _encode_id_rows(parts: list[bytes], row_start: bytes, rows: list[Row]) -> None:
    """(stream, entry_ms, entry_seq, entry_id, event_type, payload, produced_at, meta): the
    entry ID's two numbers first, so that the row start and the milliseconds, shared by the
    entries of one millisecond, are one piece."""
    extend = parts.extend
    types: dict[bytes, bytes] = {}
    seqs: dict[bytes, bytes] = {}
    id_lengths: dict[int, bytes] = {}
    json_heads: dict[int, bytes] = {}
    last_ms, ms_head = b"", b""
    last_us, ts_field = None, b""
    for entry_id, event_type, payload, produced_us, meta, _fields in rows:
        ms, _, seq = entry_id.partition(b"-")
        if ms != last_ms:
            last_ms, ms_head = ms, row_start + _pack_ms(8, int(ms))
        seq_field = seqs.get(seq)
        if seq_field is None:
            seq_field = seqs[seq] = _pack_seq(8, int(seq or 0))
        id_length = id_lengths.get(len(entry_id))
        if id_length is None:
            id_length = id_lengths[len(entry_id)] = _pack_i(len(entry_id))
        type_field = types.get(event_type)
        if type_field is None:
            type_field = types[event_type] = _pack_i(len(event_type)) + event_type
        json_head = json_heads.get(len(payload))
        if json_head is None:
            json_head = json_heads[len(payload)] = _pack_json(len(payload) + 1, 1)
        if produced_us != last_us:
            last_us, ts_field = produced_us, _pack_ts(8, produced_us)
        if meta is None:
            extend(
                (
                    ms_head,
                    seq_field,
                    id_length,
                    entry_id,
                    type_field,
                    json_head,
                    payload,
                    ts_field,
                    _NULL,
                )
            )
        else:
            extend((ms_head, seq_field, id_length, entry_id, type_field, json_head, payload))
            extend((ts_field, _pack_json(len(meta) + 1, 1), meta))


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

    def __init__(
        self, stream: str, events_table: str, dlq_table: str, layout: str | None = None
    ) -> None:
        """layout: "ids" or "text" (backends/layout.py); None: found out at the first write."""
        self.stream = stream
        self.events_table = events_table
        self._row_starts: dict[str, bytes] = {}
        self._coverage: partitions.Coverage | None = None
        self._layout = ""
        self._events = quote_ident(events_table)
        self._dlq_insert = dlq.insert_sql(quote_ident(dlq_table))
        self._stage_create = (
            f"CREATE TEMP TABLE IF NOT EXISTS {_STAGE} "
            f"(LIKE {self._events} INCLUDING DEFAULTS) ON COMMIT DROP"
        )
        if layout is not None:
            self._use_layout(layout)

    def _use_layout(self, layout: str) -> None:
        self._layout = layout
        self.columns = layouts.COPY_COLUMNS[layout]
        self._row_starts.clear()
        cols = ", ".join(self.columns)
        # No conflict target: the table's one unique key is the one a replay hits, in either layout.
        self._stage_insert = (
            f"INSERT INTO {self._events} ({cols}) SELECT {cols} FROM {_STAGE} "
            "ON CONFLICT DO NOTHING"
        )

    async def _resolve(self, conn: asyncpg.Connection) -> None:
        """The table's layout, asked once (the schema was checked at start)."""
        async with transaction(conn):  # streamd's timeouts, behind a pooler too
            found = await layouts.inspect(conn, self.events_table)
        if found is None:
            raise BootError(f"table {self.events_table!r} is gone (streamd db init creates it)")
        if isinstance(found, str):
            raise layouts.refusal(self.events_table, found)
        self._use_layout(found.kind)
        self._coverage = None
        if found.partitioned:
            self._coverage = partitions.Coverage(self.events_table, found.interval)

    def _row_start(self, stream: str) -> bytes:
        """Every row starts with the column count and the (constant per stream) stream column."""
        start = self._row_starts.get(stream)
        if start is None:
            if len(self._row_starts) >= 4096:  # streams come and go (patterns): stay bounded
                self._row_starts.clear()
            name = stream.encode()
            start = self._row_starts[stream] = (
                struct.pack(">h", len(self.columns)) + _pack_i(len(name)) + name
            )
        return start

    def copy_source(self, rows: list[Row], stream: str | None = None) -> memoryview:
        """The binary COPY stream this sink sends for rows of a stream (default: `stream`)."""
        return encode_copy(self._row_start(stream or self.stream), rows, self._layout == "ids")

    async def write(
        self, conn: asyncpg.Connection, rows: list[Row], rejects: list[Rejection]
    ) -> WriteResult:
        """Commit rows and dead-letter rows of `stream` in one transaction."""
        return (await self.write_parts(conn, [Part(self.stream, rows, rejects)]))[0]

    async def write_parts(self, conn: asyncpg.Connection, parts: list[Part]) -> list[WriteResult]:
        """Commit every part's rows and dead-letter rows in one transaction; a result per part.
        Transient errors propagate."""
        if not self._layout:
            await self._resolve(conn)
        coverage = self._coverage
        partition = None
        if coverage is not None:
            # Each part's first and last entries name its time span, almost always within one
            # partition; a row in between that needs another one is refused, then all are seen.
            ends = [partitions.entry_ms(p.rows[i][0]) for p in parts if p.rows for i in (0, -1)]
            if ends:
                await coverage.ensure(conn, ends)
                held = coverage.holding(ends)
                partition = held.name if held is not None else None
        try:
            return await self._write_parts(conn, parts, partition)
        except (asyncpg.CheckViolationError, asyncpg.NotNullViolationError) as exc:
            if not _table_changed(exc):
                raise
        # A partition was dropped under us, or `streamd db migrate` swapped the table in.
        await self._resolve(conn)
        if self._coverage is not None:
            every = (partitions.entry_ms(r[0]) for p in parts for r in p.rows)
            await self._coverage.ensure(conn, every)
        return await self._write_parts(conn, parts)

    async def _write_parts(
        self, conn: asyncpg.Connection, parts: list[Part], partition: str | None = None
    ) -> list[WriteResult]:
        """partition: the one that holds the time of every part's first and last rows."""
        if any(p.rows for p in parts) and not any(p.rejects for p in parts):
            # The common case: one COPY, atomic on its own (in autocommit, one round trip, when
            # it goes through the table). If Postgres refuses it for any row's sake, nothing was
            # written: take the careful path.
            try:
                if partition is None or not await self._copy_into_partition(conn, parts, partition):
                    async with statement_scope(conn):
                        await self._copy_parts(conn, parts, self.events_table)
                return [WriteResult(inserted=len(p.rows)) for p in parts]
            except ROW_ERRORS as exc:
                if _table_changed(exc):
                    raise
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

        async def attempt(some: list[Row]) -> None:
            inserted = await method(conn, stream, some)
            result.inserted += inserted
            result.duplicates += len(some) - inserted

        await isolate_rows(conn, rows, attempt, result.refused, keep_raising=_replay_or_swap)

    async def _copy_parts(self, conn: asyncpg.Connection, parts: list[Part], table: str) -> None:
        source = encode_copy_chunks(
            [(self._row_start(p.stream), p.rows) for p in parts if p.rows], self._layout == "ids"
        )
        await conn.copy_to_table(table, source=source, columns=self.columns, format="binary")

    async def _copy_into_partition(
        self, conn: asyncpg.Connection, parts: list[Part], partition: str
    ) -> bool:
        """COPY every part's rows straight into `partition`, committed only if it is still a
        partition of the table; False (nothing written) when it is not, or is gone, or a row
        lies outside its range: the table then routes them. Row errors propagate."""
        try:
            async with transaction(conn):
                await self._copy_parts(conn, parts, partition)
                if not await conn.fetchval(ATTACHED, partition, self.events_table):
                    raise _Detached
        except (_Detached, asyncpg.UndefinedTableError):
            if self._coverage is not None:
                self._coverage.forget()
            return False
        except asyncpg.CheckViolationError as exc:
            # A row outside the partition's range: a partition constraint, which (unlike a
            # CHECK constraint, a row error) has no name.
            if getattr(exc, "constraint_name", None):
                raise
            return False
        return True

    async def _copy(self, conn: asyncpg.Connection, stream: str, rows: list[Row]) -> int:
        await conn.copy_to_table(
            self.events_table,
            source=self.copy_source(rows, stream),
            columns=self.columns,
            format="binary",
        )
        return len(rows)

    async def _copy_staged(self, conn: asyncpg.Connection, stream: str, rows: list[Row]) -> int:
        await conn.execute(self._stage_create)
        await conn.copy_to_table(
            _STAGE,
            source=self.copy_source(rows, stream),
            columns=self.columns,
            format="binary",
        )
        status = await conn.execute(self._stage_insert)
        await conn.execute(f"TRUNCATE {_STAGE}")
        return int(status.rsplit(" ", 1)[-1])


class _Detached(Exception):
    """The partition a COPY went into is no longer attached to the table: roll it back."""


def _replay_or_swap(exc: BaseException) -> bool:
    """A replay (the key refuses rows already there) or a table changed under the batch: not
    the rows' fault, for the caller to handle."""
    return isinstance(exc, asyncpg.UniqueViolationError) or _table_changed(exc)


def _table_changed(exc: BaseException) -> bool:
    """Refused for the table's sake, not the row's: no partition for its time, or the key
    columns of the layout `streamd db migrate` swapped in while this sink wrote the old one."""
    if partitions.is_missing_partition(exc):
        return True
    return isinstance(exc, asyncpg.NotNullViolationError) and getattr(exc, "column_name", None) in (
        "entry_ms",
        "entry_seq",
    )
