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

import re

import asyncpg

from streamd.backends.sql import quote_ident
from streamd.config.settings import Settings
from streamd.config.tables import ColumnSpec, TableSpec
from streamd.errors import BootError

POSITION_COLUMNS = (("entry_ms", "bigint"), ("entry_seq", "numeric(20,0)"))
TOMBSTONE_SUFFIX = "_tombstones"
UPSERT_FILLFACTOR = 50
_PROBE = "streamd_probe_types"
# What an upsert's COMMIT is followed by, to wait for its WAL flush (pipeline/typed_sql.FLUSH):
# executable by PUBLIC unless revoked, checked at start with the table privileges.
FLUSH_FUNCTION = "pg_logical_emit_message(boolean, text, text)"

_COLUMNS = """
SELECT a.attname AS name, format_type(a.atttypid, a.atttypmod) AS type,
  a.attgenerated <> '' AS generated
FROM pg_attribute a WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum
"""
_PRIMARY_KEY = """
SELECT coalesce(array_agg(a.attname::text ORDER BY k.ord), '{}') FROM pg_index i
CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
WHERE i.indrelid = to_regclass($1) AND i.indisprimary
"""


# The (…) of varchar(20) or numeric(12,2): a value is cast to the type without it, and the
# column's own assignment applies it (so an over-long text is refused, as COPY would, rather
# than cut to length as an explicit cast does).
_MODIFIER = re.compile(r"\(\d+(, ?\d+)?\)")


def base_type(pg_type: str) -> str:
    return _MODIFIER.sub("", pg_type)


def value_expr(column: ColumnSpec, payload: str = "s.payload") -> str:
    """The SQL expression of a column's value, taken from a jsonb payload."""
    if len(column.path) == 1:  # -> is a little cheaper than #> (no path array to parse)
        node, text = f"({payload} -> '{column.path[0]}')", f"({payload} ->> '{column.path[0]}')"
    else:
        path = "{" + ",".join(column.path) + "}"
        node, text = f"({payload} #> '{path}')", f"({payload} #>> '{path}')"
    base = base_type(column.pg_type)
    if base == "jsonb":
        return node
    if base == "json":
        return f"{node}::json"
    if base.endswith("[]"):
        # A JSON array fills an array column element by element; a string is an array literal.
        return (
            f"CASE jsonb_typeof({node}) WHEN 'array' THEN"
            f" ARRAY(SELECT jsonb_array_elements_text({node}))::{base} ELSE {text}::{base} END"
        )
    return f"{text}::{base}"


# Types whose input from text is immutable (it depends on no setting such as DateStyle or
# TimeZone), so Postgres can compute them as generated columns.
_GENERATABLE = frozenset(
    {"text", "varchar", "character varying", "char", "character", "bpchar", "uuid", "jsonb"}
    | {"smallint", "integer", "int", "int2", "int4", "bigint", "int8", "numeric", "decimal"}
    | {"real", "float4", "float8", "double precision", "boolean", "bool"}
)


def generated(spec: TableSpec, column: ColumnSpec) -> bool:
    """Whether Postgres computes the column from the payload as it stores the row (GENERATED
    ALWAYS AS ... STORED): in append tables that keep the payload, for the types above. Then a
    batch is one COPY of the envelope, as for the events table, with no staging."""
    return (
        spec.mode == "append"
        and spec.keep_payload
        and base_type(column.pg_type) in _GENERATABLE
        and not column.pg_type.endswith("[]")
    )


def column_sql(spec: TableSpec, column: ColumnSpec) -> str:
    """A declared column's definition, for CREATE TABLE and ADD COLUMN."""
    sql = f"{quote_ident(column.name)} {column.pg_type}"
    if generated(spec, column):
        sql += f" GENERATED ALWAYS AS ({value_expr(column, 'payload')}) STORED"
    return sql + (" NOT NULL" if column.name in spec.key else "")


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
    found = await conn.fetch(_COLUMNS, table)
    existing = {r["name"]: r["type"] for r in found}
    if not existing:
        await conn.execute(_create_sql(spec))
    else:
        missing = _missing_columns(spec, declared, existing)
        _check_generated(spec, {r["name"] for r in found if r["generated"]})
        await check_primary_key(conn, spec)
        for name, definition in missing:
            await _add_column(conn, spec, name, definition)
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
    lines = [column_sql(spec, c) for c in spec.columns]
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
    return [(c.name, column_sql(spec, c)) for c in spec.columns if c.name not in existing] + (
        [("payload", "payload jsonb")] if spec.keep_payload and "payload" not in existing else []
    )


def _check_generated(spec: TableSpec, in_table: set[str]) -> None:
    """Columns Postgres computes must be the ones this section's rule says (generated())."""
    for column in spec.columns:
        if column.name in in_table and not generated(spec, column):
            what = "computed from the payload (GENERATED)"
            raise BootError(
                f"table {spec.name} ([tables.{spec.name}]): column {column.name} is {what} in "
                "the table, which this section's mode and keep_payload do not allow: write "
                "to a new table, or change this one yourself (ALTER COLUMN ... DROP EXPRESSION)"
            )


async def _add_column(conn: asyncpg.Connection, spec: TableSpec, name: str, sql: str) -> None:
    """ADD COLUMN; a generated one is computed for every row already there, which fails if an
    old payload holds a value the column cannot take."""
    try:
        async with conn.transaction():
            await conn.execute(
                f"ALTER TABLE {quote_ident(spec.name)} ADD COLUMN IF NOT EXISTS {sql}"
            )
    except asyncpg.DataError as exc:
        raise BootError(
            f"table {spec.name} ([tables.{spec.name}]): cannot add column {name}: a row already "
            f"in the table has a value it cannot take ({str(exc).splitlines()[0]}); fix or "
            "delete that row, or declare the column with a type that takes it"
        ) from None


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


async def typed_privilege_problems(conn: asyncpg.Connection, settings: Settings) -> list[str]:
    """What `serve`'s role lacks on typed tables, as grant-like phrases: INSERT and SELECT;
    an upsert table's UPDATE (ON CONFLICT DO UPDATE) and DELETE (delete_types), its
    tombstones' INSERT, SELECT and UPDATE, and EXECUTE on FLUSH_FUNCTION. (grants.py checks
    the events tables.)"""
    missing: list[str] = []
    for spec in settings.tables:
        if not spec.typed:
            continue
        needs = {spec.name: ["INSERT", "SELECT"]}
        if spec.mode == "upsert":
            needs[spec.name] += ["UPDATE", "DELETE"] if spec.delete_types else ["UPDATE"]
        if spec.delete_types:
            needs[tombstone_table(spec)] = ["INSERT", "SELECT", "UPDATE"]
        if spec.mode == "upsert" and not await conn.fetchval(_EXECUTE, FLUSH_FUNCTION):
            phrase = f"EXECUTE on function {FLUSH_FUNCTION}"
            if phrase not in missing:
                missing.append(phrase)
        for table, privileges in needs.items():
            found = await conn.fetchval(_PRIVILEGES, quote_ident(table), privileges)
            if found is None:
                missing.append(f"table {table} (not found)")
            elif found:
                missing.append(f"{', '.join(found)} on table {table}")
    return missing


_EXECUTE = "SELECT has_function_privilege('pg_catalog.' || $1, 'EXECUTE')"
_PRIVILEGES = """
SELECT CASE WHEN to_regclass($1) IS NULL THEN NULL ELSE coalesce(
  (SELECT array_agg(p ORDER BY n) FROM unnest($2::text[]) WITH ORDINALITY AS u(p, n)
   WHERE NOT has_table_privilege(to_regclass($1), p)), '{}') END
"""
