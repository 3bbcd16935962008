"""Typed tables' DDL: a [tables.<name>] section with columns becomes a table with those columns and
the envelope's, created or extended by `streamd db init` (and serve at start), never altered
behind the operator's back.

Layout: the declared columns; then stream, entry_id, event_type, payload (unless keep_payload =
false), produced_at, ingested_at, meta. Append tables are keyed by (stream, entry_id), as the
events table is; upsert tables by `key`, with the position of the entry each row holds
(entry_ms, entry_seq: its entry ID's two numbers) so a replay never moves a row backwards. An
upsert table with delete_types has a `<name>_tombstones` table: the key and position of each
deleted key's delete, so an older update replayed after it does not bring the row back.

Evolution: a column declared later is added (ADD COLUMN IF NOT EXISTS, NULL in the rows before).
Anything else that differs is refused with one line (exit 78): a column of another type, a column
the section no longer declares, a key or mode that changed, a table that is not a typed table
streamd made. streamd never drops or retypes a column: the operator does, knowing the data.
Runs inside apply_schema's transaction, under its advisory lock.
"""

from __future__ import annotations

import asyncpg

from streamd.backends.sql import quote_ident
from streamd.config.settings import Settings
from streamd.config.tables import TableSpec
from streamd.errors import BootError

POSITION_COLUMNS = (("entry_ms", "bigint"), ("entry_seq", "numeric(20,0)"))
TOMBSTONE_SUFFIX = "_tombstones"
UPSERT_FILLFACTOR = 70
_PROBE = "streamd_probe_types"

_COLUMNS = """
SELECT a.attname AS name, format_type(a.atttypid, a.atttypmod) AS type
FROM pg_attribute a WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum
"""
_PRIMARY_KEY = """
SELECT coalesce(array_agg(a.attname::text ORDER BY k.ord), '{}') FROM pg_index i
CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
WHERE i.indrelid = to_regclass($1) AND i.indisprimary
"""


def tombstone_table(spec: TableSpec) -> str:
    return spec.name + TOMBSTONE_SUFFIX


def envelope_layout(spec: TableSpec) -> list[tuple[str, str]]:
    """(name, type) of the columns every typed table has besides the declared ones."""
    layout = [("stream", "text"), ("entry_id", "text"), ("event_type", "text")]
    if spec.keep_payload:
        layout.append(("payload", "jsonb"))
    layout += [("produced_at", "timestamptz"), ("ingested_at", "timestamptz"), ("meta", "jsonb")]
    if spec.mode == "upsert":
        layout += POSITION_COLUMNS
    return layout


def primary_key(spec: TableSpec) -> tuple[str, ...]:
    return spec.key if spec.mode == "upsert" else ("stream", "entry_id")


async def apply_typed_schema(conn: asyncpg.Connection, settings: Settings) -> None:
    """Create or extend every typed table the config declares (in the caller's transaction)."""
    for spec in settings.tables:
        if spec.typed:
            await ensure_typed_table(conn, spec)


async def ensure_typed_table(conn: asyncpg.Connection, spec: TableSpec) -> None:
    declared = await _declared_types(conn, spec)
    table = quote_ident(spec.name)
    existing = {r["name"]: r["type"] for r in await conn.fetch(_COLUMNS, table)}
    if not existing:
        await conn.execute(_create_sql(spec))
    else:
        missing = _missing_columns(spec, declared, existing)
        await check_primary_key(conn, spec)
        for name, pg_type in missing:
            await conn.execute(
                f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {quote_ident(name)} {pg_type}"
            )
    if spec.delete_types:
        await _ensure_tombstones(conn, spec, declared)


async def _declared_types(conn: asyncpg.Connection, spec: TableSpec) -> dict[str, str]:
    """Each declared column's type as Postgres spells it (int -> integer), which also checks
    that each type exists: a temporary table of the transaction takes them all."""
    columns = ", ".join(f"{quote_ident(c.name)} {c.pg_type}" for c in spec.columns)
    try:
        async with conn.transaction():
            await conn.execute(f"CREATE TEMP TABLE {_PROBE} ({columns}) ON COMMIT DROP")
            found = await conn.fetch(_COLUMNS, f"pg_temp.{_PROBE}")
            await conn.execute(f"DROP TABLE {_PROBE}")
    except (asyncpg.UndefinedObjectError, asyncpg.PostgresSyntaxError, asyncpg.DataError) as exc:
        raise BootError(f"[tables.{spec.name}] columns: {str(exc).splitlines()[0]}") from None
    return {r["name"]: r["type"] for r in found}


def _create_sql(spec: TableSpec) -> str:
    key = set(spec.key)
    lines = [
        f"{quote_ident(c.name)} {c.pg_type}{' NOT NULL' if c.name in key else ''}"
        for c in spec.columns
    ]
    for name, pg_type in envelope_layout(spec):
        nullable = name == "meta"
        default = " DEFAULT now()" if name == "ingested_at" else ""
        lines.append(f"{name} {pg_type}{'' if nullable else ' NOT NULL'}{default}")
    pk = ", ".join(quote_ident(k) for k in primary_key(spec))
    lines.append(f"CONSTRAINT {quote_ident(spec.name + '_pkey')} PRIMARY KEY ({pk})")
    # An upsert table is updated in place again and again: room left in each page lets an
    # update stay on its page (a HOT update, no index entry), which the hot-key bench needs.
    storage = f" WITH (fillfactor = {UPSERT_FILLFACTOR})" if spec.mode == "upsert" else ""
    return f"CREATE TABLE {quote_ident(spec.name)} ({', '.join(lines)}){storage}"


def _missing_columns(
    spec: TableSpec, declared: dict[str, str], existing: dict[str, str]
) -> list[tuple[str, str]]:
    """The declared columns the table lacks, after checking that nothing else differs."""
    where = f"table {spec.name} ([tables.{spec.name}])"
    envelope = envelope_layout(spec)
    lacking = [n for n, _ in envelope if n not in existing and n != "payload"]
    if lacking:
        raise BootError(
            f"{where}: the table exists with other columns (no {', '.join(lacking)}): it is not "
            f"a {spec.mode} table streamd made; name another table, or move this one away"
        )
    expected = dict(declared)
    expected.update((n, t) for n, t in envelope if n != "payload" or n in existing)
    for name, pg_type in existing.items():
        if name not in expected:
            raise BootError(
                f"{where}: column {name} ({pg_type}) is in the table but not in the section; "
                "streamd never drops a column: declare it again, or drop it yourself "
                f"(ALTER TABLE {quote_ident(spec.name)} DROP COLUMN {quote_ident(name)})"
            )
        if name in declared and existing[name] != declared[name]:
            raise BootError(
                f"{where}: column {name} is {existing[name]} in the table, {declared[name]} in "
                "the section; streamd never changes a column's type: change it yourself "
                "(ALTER TABLE ... ALTER COLUMN ... TYPE) or declare it as it is"
            )
    return [(c.name, c.pg_type) for c in spec.columns if c.name not in existing] + (
        [("payload", "jsonb")] if spec.keep_payload and "payload" not in existing else []
    )


async def check_primary_key(conn: asyncpg.Connection, spec: TableSpec) -> None:
    """A table's primary key must be the one its mode and key ask for."""
    found = tuple(await conn.fetchval(_PRIMARY_KEY, quote_ident(spec.name)))
    if found != primary_key(spec):
        shown = ", ".join(found) or "none"
        raise BootError(
            f"table {spec.name} ([tables.{spec.name}]): its primary key is ({shown}), but "
            f"mode = {spec.mode!r} needs ({', '.join(primary_key(spec))}); streamd never "
            "changes a table's key: write to a new table, or change this one yourself"
        )


async def _ensure_tombstones(
    conn: asyncpg.Connection, spec: TableSpec, declared: dict[str, str]
) -> None:
    name = tombstone_table(spec)
    key = ", ".join(quote_ident(k) for k in spec.key)
    key_columns = "".join(f"{quote_ident(k)} {declared[k]} NOT NULL, " for k in spec.key)
    await conn.execute(
        f"CREATE TABLE IF NOT EXISTS {quote_ident(name)} ({key_columns}"
        "stream text NOT NULL, entry_id text NOT NULL, entry_ms bigint NOT NULL,"
        " entry_seq numeric(20,0) NOT NULL, deleted_at timestamptz NOT NULL DEFAULT now(),"
        f" CONSTRAINT {quote_ident(name + '_pkey')} PRIMARY KEY ({key}))"
    )
