"""The Postgres side of a batch for a typed table ([tables.<name>] with columns): append or upsert.

An append table whose columns Postgres computes itself (generated from the payload:
typed_schema.generated) takes a batch as the events table does, in one binary COPY. Otherwise a
batch is COPYed (binary, payload as text) into a staging table of the transaction and moved into
the table by one statement (typed_sql.py), which parses each payload once and casts the columns.
Everything, dead-letter rows included, commits in one transaction, and a replay changes nothing:
an append hits the (stream, entry_id) key, an upsert compares stream positions.

The common case is one try (an append's INSERT plain, without ON CONFLICT). When Postgres refuses
a row, or an append meets a row already there (a replay), the try is rolled back and the batch
goes the careful way, through the stage with savepoints (an append now with ON CONFLICT DO
NOTHING): text that is not UTF-8 is split off by its COPY line (as in sink.py); a payload that is
not JSON or a value a column cannot take is found by a check function (typed_sql.check_function)
and the entry becomes a dead letter (`invalid_json`; `invalid_column`, naming the column); its
neighbours land. What no check explains (a constraint added by hand) is found entry by entry,
with Postgres's own message.

Upserts into a table with delete_types take a transaction-level advisory lock on the table
before they move the batch: a delete and an older update of the same key in two concurrent
transactions could otherwise each miss the other's tombstone. Without deletes, concurrent
batches meet only on row locks, taken in key order (the batch is sorted by key). An upsert
commits without waiting for its WAL flush, which releases those locks at once, and the same
round trip then waits for the flush in a transaction of its own (typed_sql.FLUSH): batches of
hot keys queue for each other's statement, not for each other's fsync, and nothing is
acknowledged before it is on disk.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any, Protocol

import asyncpg

from streamd.backends.connections import statement_scope, transaction
from streamd.backends.sql import quote_ident
from streamd.backends.typed_schema import generated
from streamd.config.tables import TableSpec
from streamd.pipeline import dead_letters as dlq
from streamd.pipeline import typed_sql
from streamd.pipeline.envelope import ENTRY_ID, EVENT_TYPE, FIELDS, Rejection, Row
from streamd.pipeline.refused_rows import ROW_ERRORS, isolate_rows, refusal
from streamd.pipeline.sink import WriteResult, encode_copy_parts

_LOCK = "SELECT pg_advisory_xact_lock(hashtext($1))"
# After a batch of mostly updates, how many batches an upsert writes with ON CONFLICT alone
# before it tries plain INSERTs for new keys again (TypedSink._upsert_fast).
PLAIN_INSERTS_PAUSE = 15
_ENVELOPE_COPY = ["stream", "entry_id", "event_type", "payload", "produced_at", "meta"]
_HEADER = b"PGCOPY\n\xff\r\n\x00" + b"\x00\x00\x00\x00" + b"\x00\x00\x00\x00"
_NULL = b"\xff\xff\xff\xff"
_pack_i = struct.Struct(">i").pack
_pack_ts = struct.Struct(">iq").pack
_pack_json = struct.Struct(">iB").pack


def encode_stage(streams: list[tuple[bytes, list[Row]]]) -> memoryview:
    """The binary COPY stream for the stage of (row start, rows) per stream: (stream, entry_id,
    event_type, data, produced_at, meta), data as text (parsed once, by the statement that
    moves the stage)."""
    parts = [_HEADER]
    extend = parts.extend
    types: dict[bytes, bytes] = {}
    for row_start, rows in streams:
        _encode_stage_rows(extend, row_start, rows, types)
    parts.append(b"\xff\xff")
    return memoryview(b"".join(parts))


def _encode_stage_rows(
    extend: Any, row_start: bytes, rows: list[Row], types: dict[bytes, bytes]
) -> None:
    for entry_id, event_type, payload, produced_us, meta, _fields in rows:
        type_field = types.get(event_type)
        if type_field is None:
            type_field = types[event_type] = _pack_i(len(event_type)) + event_type
        extend((row_start, _pack_i(len(entry_id)), entry_id, type_field, _pack_i(len(payload))))
        extend((payload, _pack_ts(8, produced_us)))
        if meta is None:
            extend((_NULL,))
        else:
            extend((_pack_json(len(meta) + 1, 1), meta))


class StreamPart(Protocol):
    """One stream's share of a batch bound for one table (rows, and entries dead already)."""

    @property
    def stream(self) -> str: ...
    @property
    def rows(self) -> list[Row]: ...
    @property
    def rejects(self) -> list[Rejection]: ...


# One stream's share as the sink works on it: (stream, rows of wanted types, dead letters).
_Share = tuple[str, list[Row], list[Rejection]]


class _RowRefused(Exception):
    """The fast try met a row Postgres refuses: roll it back and take the careful way."""


class TypedSink:
    """Writes batches into one typed table and the DLQ table; `stream` is the one `write`
    writes for (write_parts takes the entries of several)."""

    def __init__(self, stream: str, spec: TableSpec, dlq_table: str) -> None:
        self.stream = stream
        self.spec = spec
        self.events_table = spec.name
        wanted = (*spec.types, *spec.delete_types) if spec.types else ()
        self._wanted = frozenset(t.encode() for t in wanted)
        self._upsert = spec.mode == "upsert"
        self._deletes = list(spec.delete_types)
        self._move_sql = typed_sql.upsert_sql(spec) if self._upsert else typed_sql.append_sql(spec)
        # An upsert's first try: plain INSERTs for the keys the table lacks, while they are
        # most of what batches bring (new keys); while most are updates (hot keys), the probe
        # for which keys exist costs more than it saves, and ON CONFLICT alone takes them.
        self._plain_sql = typed_sql.upsert_sql(spec, plain_inserts=True) if self._upsert else ""
        self._plain_paused = 0  # batches left before plain INSERTs are tried again
        self._fast_sql = typed_sql.append_sql(spec, replay_safe=False)  # an append's first try
        # Every column computed by Postgres (typed_schema.generated): an append is then one
        # COPY of the envelope straight into the table, as the events table's.
        self._direct = not self._upsert and all(generated(spec, c) for c in spec.columns)
        self._check_create, self._check_sql = typed_sql.check_function(spec)
        self._lock_key = f"streamd.upsert.{spec.name}" if self._upsert and spec.delete_types else ""
        self._row_starts: dict[str, bytes] = {}
        self._dlq_insert = dlq.insert_sql(quote_ident(dlq_table))

    def _row_start(self, stream: str) -> bytes:
        """Every COPY row starts with the column count and the (per stream constant) stream."""
        start = self._row_starts.get(stream)
        if start is None:
            if len(self._row_starts) >= 4096:  # streams come and go (patterns): stay bounded
                self._row_starts.clear()
            name = stream.encode()
            count = struct.pack(">h", len(typed_sql.STAGE_COLUMNS))
            start = self._row_starts[stream] = count + struct.pack(">i", len(name)) + name
        return start

    async def write(
        self, conn: asyncpg.Connection, rows: list[Row], rejects: list[Rejection]
    ) -> WriteResult:
        """Commit rows and dead-letter rows of `stream` in one transaction."""
        return await self.write_for(conn, self.stream, rows, rejects)

    async def write_parts(
        self, conn: asyncpg.Connection, parts: Sequence[StreamPart]
    ) -> list[WriteResult]:
        """Commit the rows and dead letters of several streams in one transaction; a result per
        part. Transient errors propagate."""
        return await self._write_shares(
            conn, [(p.stream, self._wanted_rows(p.rows), p.rejects) for p in parts]
        )

    async def _write_shares(
        self, conn: asyncpg.Connection, shares: list[_Share]
    ) -> list[WriteResult]:
        """The fast way for every stream at once (one COPY, one statement), else the careful
        way, stream by stream, in one transaction."""
        moving = any(rows for _, rows, _ in shares)
        if moving:
            try:
                if self._direct:
                    return await self._write_direct(conn, shares)
                return await self._write_fast(conn, shares)
            except _RowRefused:
                pass
        async with transaction(conn):
            results = [await self._careful(conn, *share) for share in shares]
        if moving and self._upsert:
            # Committed synchronously, but what it skipped as older may stand on another
            # batch's commit that is not on disk yet (and a batch that changed nothing
            # commits without a flush): wait for the WAL, as the fast way does.
            await conn.execute(typed_sql.FLUSH)
        return results

    def _wanted_rows(self, rows: list[Row]) -> list[Row]:
        """Entries whose type the section's `types` leaves out are skipped (acknowledged, not
        stored): they count as neither inserted nor duplicates."""
        return [r for r in rows if r[EVENT_TYPE] in self._wanted] if self._wanted else rows

    async def write_for(
        self, conn: asyncpg.Connection, stream: str, rows: list[Row], rejects: list[Rejection]
    ) -> WriteResult:
        """Commit one stream's rows and dead-letter rows in one transaction."""
        return (await self._write_shares(conn, [(stream, self._wanted_rows(rows), rejects)]))[0]

    async def _careful(
        self, conn: asyncpg.Connection, stream: str, rows: list[Row], rejects: list[Rejection]
    ) -> WriteResult:
        """The careful way, in the caller's transaction: stage, move, isolate what is refused,
        write the dead letters; the stage is left empty for the next stream's part."""
        result = WriteResult()
        if rows:
            await conn.execute(typed_sql.STAGE_CREATE)
            staged: list[Row] = []
            await self._stage_isolating(conn, stream, rows, result, staged)
            if staged:
                await self._move_isolating(conn, staged, result)
                await conn.execute(f"DELETE FROM {typed_sql.STAGE}")
        dead = rejects + result.refused
        if dead:
            await conn.executemany(self._dlq_insert, dlq.table_rows(stream, dead))
        return result

    async def _write_direct(
        self, conn: asyncpg.Connection, shares: list[_Share]
    ) -> list[WriteResult]:
        """One binary COPY into the table (in autocommit when there is nothing else to write);
        a refusal of any row (a value, a replay) and the careful way takes over."""
        source = encode_copy_parts([(self._row_start(s), rows) for s, rows, _ in shares if rows])
        try:
            if any(rejects for _, _, rejects in shares):
                async with transaction(conn):
                    await self._copy_into_table(conn, source)
                    await self._dead_letters(conn, shares)
            else:
                async with statement_scope(conn):
                    await self._copy_into_table(conn, source)
        except ROW_ERRORS as exc:
            raise _RowRefused from exc
        return [WriteResult(inserted=len(rows)) for _, rows, _ in shares]

    async def _dead_letters(self, conn: asyncpg.Connection, shares: list[_Share]) -> None:
        for stream, _, rejects in shares:
            if rejects:
                await conn.executemany(self._dlq_insert, dlq.table_rows(stream, rejects))

    async def _copy_into_table(self, conn: asyncpg.Connection, source: memoryview) -> None:
        await conn.copy_to_table(
            self.spec.name, source=source, columns=_ENVELOPE_COPY, format="binary"
        )

    async def _write_fast(
        self, conn: asyncpg.Connection, shares: list[_Share]
    ) -> list[WriteResult]:
        """One try in as few round trips as it takes: BEGIN with the stage's CREATE (and the
        SET LOCALs a pooler needs, as transaction() sends them), the COPY, and an append's
        INSERT with COMMIT (a plain INSERT takes every row or none: no count to read); an
        upsert's statement, then its COMMIT (not waiting for the WAL flush) with FLUSH, which
        does wait, in one round trip."""
        setup = [getattr(conn, "transaction_setup", "")]
        if self._upsert:
            setup.append(typed_sql.ASYNC_COMMIT)
        setup.append(typed_sql.STAGE_CREATE)
        await conn.execute(f"BEGIN; {'; '.join(s for s in setup if s)}")
        try:
            await self._copy(conn, [(s, rows) for s, rows, _ in shares if rows])
            await self._dead_letters(conn, shares)
            if not self._upsert:
                await conn.execute(f"{self._fast_sql}; COMMIT")
                return [WriteResult(inserted=len(rows)) for _, rows, _ in shares]
            changed = await self._upsert_fast(conn)
            # FLUSH runs after the COMMIT, in its own transaction, on the same server session.
            await conn.execute(f"COMMIT; {typed_sql.FLUSH}")
        except asyncpg.PostgresError as exc:
            # Refused by the server, the session still in step: end the transaction. (Cut off
            # instead, by a cancellation or a lost connection, the transaction dies with the
            # session, which BatchWriter drops.)
            await conn.execute("ROLLBACK")
            if isinstance(exc, ROW_ERRORS):
                raise _RowRefused from exc
            raise
        return [
            WriteResult(inserted=changed.get(s, 0), duplicates=len(rows) - changed.get(s, 0))
            for s, rows, _ in shares
        ]

    async def _copy(self, conn: asyncpg.Connection, streams: list[tuple[str, list[Row]]]) -> None:
        await conn.copy_to_table(
            typed_sql.STAGE,
            source=encode_stage([(self._row_start(s), rows) for s, rows in streams]),
            columns=typed_sql.STAGE_COLUMNS,
            format="binary",
        )

    async def _move(self, conn: asyncpg.Connection, only: str | None) -> int:
        """Move the stage (or one entry of it) into the table; how many entries changed it."""
        if not self._upsert:
            status = await conn.execute(self._move_sql, only)
            return int(status.rsplit(" ", 1)[-1])
        return sum((await self._move_counts(conn, only)).values())

    async def _upsert_fast(self, conn: asyncpg.Connection) -> dict[str, int]:
        """The fast try's upsert of the whole stage. With plain INSERTs, a unique violation (a
        key another transaction inserted meanwhile) sends the batch the careful way, where ON
        CONFLICT takes every key."""
        plain = self._plain_paused == 0
        counts = await self._upsert_rows(conn, None, self._plain_sql if plain else self._move_sql)
        changed = sum(int(r["changed"]) for r in counts)
        if not plain:
            self._plain_paused -= 1
        elif 2 * sum(int(r["fresh"]) for r in counts) < changed:
            self._plain_paused = PLAIN_INSERTS_PAUSE
        return {r["stream"]: int(r["changed"]) for r in counts}

    async def _move_counts(self, conn: asyncpg.Connection, only: str | None) -> dict[str, int]:
        """Upsert the stage (or one entry of it): per stream, how many entries changed the
        table (upserted a row, or deleted one with its tombstone)."""
        counts = await self._upsert_rows(conn, only, self._move_sql)
        return {r["stream"]: int(r["changed"]) for r in counts}

    async def _upsert_rows(
        self, conn: asyncpg.Connection, only: str | None, sql: str
    ) -> list[asyncpg.Record]:
        if self._lock_key:
            await conn.execute(_LOCK, self._lock_key)
        rows: list[asyncpg.Record] = await conn.fetch(sql, self._deletes, only)
        return rows

    async def _stage_isolating(
        self,
        conn: asyncpg.Connection,
        stream: str,
        rows: list[Row],
        result: WriteResult,
        staged: list[Row],
    ) -> None:
        """COPY rows into the stage; text Postgres refuses (not UTF-8) goes to result.refused."""

        async def attempt(some: list[Row]) -> None:
            await self._copy(conn, [(stream, some)])
            staged.extend(some)

        await isolate_rows(conn, rows, attempt, result.refused)

    async def _move_isolating(
        self, conn: asyncpg.Connection, staged: list[Row], result: WriteResult
    ) -> None:
        """Move the stage into the table; entries with values a column refuses are dead letters."""
        by_id = {row[ENTRY_ID].decode(): row for row in staged}
        checked = False
        while by_id:
            try:
                async with conn.transaction():
                    changed = await self._move(conn, None)
            except ROW_ERRORS:
                if checked:
                    break  # refused for a reason the column check does not see
                checked = True
                bad = await self._bad_values(conn, by_id)
                if not bad:
                    break
                ids = [r.entry_id.decode() for r in bad]
                await conn.execute(
                    f"DELETE FROM {typed_sql.STAGE} WHERE entry_id = ANY($1::text[])", ids
                )
                for entry_id in ids:
                    del by_id[entry_id]
                result.refused += bad
                continue
            result.inserted += changed
            result.duplicates += len(by_id) - changed
            return
        await self._move_one_by_one(conn, by_id, result)

    async def _bad_values(self, conn: asyncpg.Connection, by_id: dict[str, Row]) -> list[Rejection]:
        """The staged entries the table cannot take, as dead letters: a value its column
        refuses ("column amount (numeric, from $.amount): <Postgres's message>") or an upsert
        key that is missing, `invalid_column`; a payload that is not JSON, as sink.py says it."""
        await conn.execute(self._check_create)
        found = await conn.fetch(self._check_sql, self._deletes)
        types = {c.name: c for c in self.spec.columns}
        out = []
        for record in found:
            triples: list[Any] = record["bad"]
            row = by_id[record["entry_id"]]
            if triples[0] == "":  # the payload itself
                error = f"Postgres refused the row: data: {triples[2]}"
                if triples[1] == "54001":
                    out.append(Rejection(row[ENTRY_ID], row[FIELDS], "too_deeply_nested", error))
                else:
                    out.append(Rejection(row[ENTRY_ID], row[FIELDS], "invalid_json", error))
                continue
            problems = []
            for name, message in zip(triples[::3], triples[2::3], strict=True):
                column = types[name]
                source = "$." + ".".join(column.path)
                problems.append(f"column {name} ({column.pg_type}, from {source}): {message}")
            out.append(Rejection(row[ENTRY_ID], row[FIELDS], "invalid_column", "; ".join(problems)))
        return out

    async def _move_one_by_one(
        self, conn: asyncpg.Connection, by_id: dict[str, Row], result: WriteResult
    ) -> None:
        for entry_id, row in by_id.items():
            try:
                async with conn.transaction():
                    changed = await self._move(conn, entry_id)
            except ROW_ERRORS as exc:
                result.refused.append(refusal(row, exc))
            else:
                result.inserted += changed
                result.duplicates += 1 - changed
