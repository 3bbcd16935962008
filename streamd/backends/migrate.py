"""`streamd db migrate`: convert an events table to the layout `db init` makes today (the two-bigint
key, partitioned by partition_interval), online, resumable, keeping every row.

1. Copy, online: the new table `<table>_migrating` is filled from the old one in chunks in the
   old key's order (keyset pagination), each chunk one short transaction with
   `ON CONFLICT DO NOTHING`; the partitions a chunk needs are made first. After each chunk the
   position is written into the new table's comment, so a migration that was stopped (Ctrl-C, a
   crash, a lost connection) resumes where it was when run again.
2. Catch up, online: rows serve wrote meanwhile behind the position (ingested since the
   migration started, less a margin longer than any transaction streamd keeps open).
3. Swap, under a short lock: ACCESS EXCLUSIVE on the old table while the rows that arrived
   during step 2 are copied, then the old table is renamed `<table>_premigrate` and the new one
   takes its name, in one transaction. Serve's writes wait for that lock (seconds at most) and
   then go to the new table (the sink sees the new layout and re-reads it). The old table is
   kept for the operator to check and drop.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import asyncpg

from streamd.backends import partitions
from streamd.backends.connections import transaction
from streamd.backends.layout import KEYS, TableLayout, create_sql, inspect, refusal
from streamd.backends.sql import quote_ident
from streamd.config.settings import Settings
from streamd.errors import StreamdError

CHUNK_ROWS = 10_000
# Rows committed after the migration started carry ingested_at (their transaction's start) at
# most this much earlier: streamd's transactions end within statement and idle timeouts.
CATCH_UP_MARGIN_S = 600
_COMMENT = "streamd: migrating "
_MAX_NAME = 63  # Postgres cuts longer identifiers, which could make two partitions' names one

Progress = Callable[[str], None]


@dataclass(slots=True)
class MigrateResult:
    table: str
    copied: int
    kept_as: str  # the old table's new name; "" when nothing had to change


# A sequence number past 2**63 as the sink stores it: its two's complement (inline, not a
# function: a temporary one would not outlive a transaction behind a pooler).
_SEQ = "split_part(entry_id, '-', 2)::numeric"
_TEXT_IDS = (
    f"split_part(entry_id, '-', 1)::bigint, CASE WHEN {_SEQ} >= 9223372036854775808"
    f" THEN ({_SEQ} - 18446744073709551616)::bigint ELSE {_SEQ}::bigint END"
)
_COLUMNS = (
    "stream, entry_id, entry_ms, entry_seq, event_type, payload, produced_at, ingested_at, meta"
)


def _select(source: TableLayout) -> str:
    """The old table's rows as the new layout's columns."""
    ids = _TEXT_IDS if source.kind == "text" else "entry_ms, entry_seq"
    return f"stream, entry_id, {ids}, event_type, payload, produced_at, ingested_at, meta"


async def migrate(
    conn: asyncpg.Connection, table: str, settings: Settings, progress: Progress
) -> MigrateResult:
    source = await inspect(conn, table)
    if source is None:
        raise StreamdError(f"table {table!r} does not exist: nothing to migrate")
    if isinstance(source, str):
        raise refusal(table, source)
    target = f"{table}_migrating"
    if len(f"{target}_p2026120100") > _MAX_NAME:
        raise StreamdError(
            f"table name {table!r} is too long for the names db migrate gives its tables and "
            f"partitions (at most {_MAX_NAME - len('_migrating_p2026120100')} characters): "
            "rename the table first"
        )
    wanted = settings.partition_interval
    if source.kind == "ids" and source.interval == wanted:
        if await _exists(conn, target):
            raise StreamdError(
                f"table {table!r} already has the current layout, and {target!r} is left from "
                "another migration: drop it"
            )
        progress(
            f"{table}: already the current layout ({source.kind} key, "
            f"{'partitioned by ' + wanted if wanted else 'not partitioned'})"
        )
        return MigrateResult(table, 0, "")
    state = await _start(conn, table, target, wanted)
    key = KEYS[source.kind]
    total = await conn.fetchval(
        "SELECT reltuples::bigint FROM pg_class WHERE oid = to_regclass(quote_ident($1))", table
    )
    if total < 0:  # never vacuumed nor analyzed: a young table, counted quickly
        total = await conn.fetchval(f"SELECT count(*) FROM {quote_ident(table)}")
    coverage = partitions.Coverage(target, wanted) if wanted else None
    copied = await _copy_all(conn, table, target, source, key, state, coverage, total, progress)
    since = state["started_ms"] / 1000 - CATCH_UP_MARGIN_S
    progress(f"{table}: catching up with rows written since the copy started")
    copied += await _catch_up(conn, table, target, source, coverage, since)
    swap_from = time.time() - CATCH_UP_MARGIN_S
    kept = f"{table}_premigrate"
    async with transaction(conn):
        await conn.execute(f"LOCK TABLE {quote_ident(table)} IN ACCESS EXCLUSIVE MODE")
        locked = time.monotonic()
        copied += await _catch_up_in(conn, table, target, source, coverage, swap_from)
        await _rename(conn, table, kept)
        await _rename(conn, target, table)
        comment = partitions.COMMENT_PREFIX + wanted if wanted else None
        await conn.execute(
            f"COMMENT ON TABLE {quote_ident(table)} IS " + (f"'{comment}'" if comment else "NULL")
        )
    progress(
        f"{table}: swapped in (the lock held {time.monotonic() - locked:.2f} s); the old table "
        f"is kept as {kept}: drop it once you have checked the new one"
    )
    return MigrateResult(table, copied, kept)


async def _rename(conn: asyncpg.Connection, table: str, to: str) -> None:
    """Rename a table and its partitions named after it (events_p20260101 -> to_p20260101)."""
    for part in await partitions.list_partitions(conn, table):
        if part.name.startswith(f"{table}_p"):
            new = to + part.name[len(table) :]
            await conn.execute(f"ALTER TABLE {quote_ident(part.name)} RENAME TO {quote_ident(new)}")
    await conn.execute(f"ALTER TABLE {quote_ident(table)} RENAME TO {quote_ident(to)}")


async def _exists(conn: asyncpg.Connection, name: str) -> bool:
    return bool(await conn.fetchval("SELECT to_regclass(quote_ident($1)) IS NOT NULL", name))


async def _start(
    conn: asyncpg.Connection, table: str, target: str, interval: str
) -> dict[str, Any]:
    """The migration's state: resumed from the new table's comment, or a new table."""
    if await _exists(conn, target):
        comment = await conn.fetchval(
            "SELECT obj_description(to_regclass(quote_ident($1)), 'pg_class')", target
        )
        if comment and comment.startswith(_COMMENT):
            state: dict[str, Any] = json.loads(comment[len(_COMMENT) :])
            if state.get("from") == table:
                return state
        raise StreamdError(
            f"table {target!r} exists but is not a migration of {table!r} in progress: drop it"
        )
    state = {"from": table, "after": None, "started_ms": time.time_ns() // 1_000_000, "copied": 0}
    async with transaction(conn):
        for statement in create_sql(target, interval):
            if not statement.startswith("COMMENT"):
                await conn.execute(statement)
        await _save(conn, target, state)
    return state


async def _save(conn: asyncpg.Connection, target: str, state: dict[str, Any]) -> None:
    text = (_COMMENT + json.dumps(state)).replace("'", "''")
    await conn.execute(f"COMMENT ON TABLE {quote_ident(target)} IS '{text}'")


async def _copy_all(
    conn: asyncpg.Connection,
    table: str,
    target: str,
    source: TableLayout,
    key: tuple[str, ...],
    state: dict[str, Any],
    coverage: partitions.Coverage | None,
    total: int,
    progress: Progress,
) -> int:
    cols = ", ".join(key)
    marks = ", ".join(f"${i + 1}" for i in range(len(key)))
    first = f"SELECT {cols} FROM {quote_ident(table)} ORDER BY {cols} LIMIT {CHUNK_ROWS}"
    after = (
        f"SELECT {cols} FROM {quote_ident(table)} WHERE ({cols}) > ({marks}) "
        f"ORDER BY {cols} LIMIT {CHUNK_ROWS}"
    )
    n = len(key)
    insert = (
        f"INSERT INTO {quote_ident(target)} ({_COLUMNS}) SELECT {_select(source)} "
        f"FROM {quote_ident(table)} WHERE ({cols}) >= ({marks}) AND ({cols}) <= "
        f"({', '.join(f'${n + i + 1}' for i in range(n))}) ON CONFLICT DO NOTHING"
    )
    copied_before = int(state["copied"])
    while True:
        position = state["after"]
        keys = await (conn.fetch(after, *position) if position else conn.fetch(first))
        if not keys:
            return int(state["copied"]) - copied_before
        low, high = tuple(keys[0]), tuple(keys[-1])
        async with transaction(conn):
            if coverage is not None:
                await coverage.ensure(conn, _ms_of(keys, source))
            status = await conn.execute(insert, *low, *high)
            state["copied"] += int(status.rsplit(" ", 1)[-1])
            state["after"] = list(high)
            await _save(conn, target, state)
        shown = f"/{total:,}" if total > 0 else ""
        share = f" ({min(100, state['copied'] * 100 // total)}%)" if total > 0 else ""
        progress(f"{table}: copied {state['copied']:,}{shown} rows{share}")


def _ms_of(keys: list[asyncpg.Record], source: TableLayout) -> set[int]:
    if source.kind == "text":
        return {partitions.entry_ms(r["entry_id"].encode()) for r in keys}
    return {r["entry_ms"] for r in keys}


async def _catch_up(
    conn: asyncpg.Connection,
    table: str,
    target: str,
    source: TableLayout,
    coverage: partitions.Coverage | None,
    since_s: float,
) -> int:
    async with transaction(conn):
        return await _catch_up_in(conn, table, target, source, coverage, since_s)


async def _catch_up_in(
    conn: asyncpg.Connection,
    table: str,
    target: str,
    source: TableLayout,
    coverage: partitions.Coverage | None,
    since_s: float,
) -> int:
    """Copy the rows ingested since since_s (epoch seconds), in the open transaction."""
    where = f"FROM {quote_ident(table)} WHERE ingested_at >= to_timestamp($1)"
    if coverage is not None:
        expr = "entry_ms" if source.kind == "ids" else "split_part(entry_id, '-', 1)::bigint"
        found = await conn.fetch(f"SELECT DISTINCT {expr} AS ms {where}", since_s)
        await coverage.ensure(conn, {r["ms"] for r in found})
    status = await conn.execute(
        f"INSERT INTO {quote_ident(target)} ({_COLUMNS}) SELECT {_select(source)} {where} "
        "ON CONFLICT DO NOTHING",
        since_s,
    )
    return int(status.rsplit(" ", 1)[-1])
