"""The SQL of a typed table's batch, built once per table from its [tables.<name>] section.

A batch is first COPYed (binary, the envelope with the JSON payload as text, unparsed) into
STAGE, a temporary table of the transaction; then one statement moves it into the table, parsing
each payload once into jsonb. Postgres itself takes each declared column out of the payload
(`payload #>> '{totals,amount}'`) and casts it, so numbers keep every digit they were sent with,
and JSON means what `->>` means.

Upsert position: an entry's place is (entry_ms, entry_seq, stream), its entry ID's two numbers
and then its stream's name. Within one stream that is the stream's order; across several streams
feeding one table the later entry ID wins (Redis' clock at XADD), and the stream's name breaks a
tie, so every entry has one fixed place and a replay always compares equal: it changes nothing.

Every name here comes from the validated config (identifiers, JSON path keys, type names that
match config.tables.PG_TYPE) and is quoted as an identifier; event types travel as parameters.
"""

from __future__ import annotations

from streamd.backends.sql import quote_ident
from streamd.backends.typed_schema import FLUSH_FUNCTION, generated, tombstone_table, value_expr
from streamd.config.tables import TableSpec

# Versioned: a session (kept by a pooler across an upgrade) may hold an older layout.
STAGE = "streamd_typed_stage_v1"
STAGE_COLUMNS = ["stream", "entry_id", "event_type", "data", "produced_at", "meta"]
# Temporary, emptied at COMMIT, and created (if this session lacks it) by every transaction that
# uses it: behind a pooler in transaction mode, the next transaction may run on another server
# session, so none may count on a table an earlier one made. Not dropped at COMMIT: creating a
# table per batch writes the catalogs every time (and bloats them).
STAGE_CREATE = (
    f"CREATE TEMP TABLE IF NOT EXISTS {STAGE} (stream text, entry_id text, event_type text,"
    " data text, produced_at timestamptz, meta jsonb) ON COMMIT DELETE ROWS"
)
POSITION = ("entry_ms", "entry_seq", "stream")

# An upsert commits without waiting for its WAL to reach disk, so its row locks (and a delete
# table's advisory lock) are released at once: the next batch of the same hot keys need not wait
# for this one's flush as well as for its statement. FLUSH then runs in a transaction of its
# own, sent with the COMMIT: a transactional WAL record (the message is read by no one, and
# decoded only by logical decoding plugins asked for messages), committed with the session's
# synchronous_commit, so its commit waits for WAL up to and past the upsert's commit record
# (and that of every commit the upsert saw), exactly as the upsert's own commit would have.
# Entries are acknowledged only after FLUSH returns: what a crash could take back was never
# acknowledged, and its replay writes it again.
ASYNC_COMMIT = "SET LOCAL synchronous_commit = off"
FLUSH = f"SELECT {FLUSH_FUNCTION.split('(')[0]}(true, 'streamd.flush', '')"


def envelope_columns(spec: TableSpec) -> list[str]:
    """The envelope columns a row takes from the stage (typed_schema.envelope_layout)."""
    columns = ["stream", "entry_id", "event_type", "produced_at", "meta"]
    if spec.keep_payload:
        columns.insert(3, "payload")
    return columns


def _names(names: list[str] | tuple[str, ...], prefix: str = "") -> str:
    return ", ".join(prefix + quote_ident(n) for n in names)


def _position(alias: str) -> str:
    return "(" + ", ".join(f"{alias}.{c}" for c in POSITION) + ")"


# Both statements take, last, the entry ID to move alone (NULL: the whole stage), for the rare
# batch whose refusal no column check explains; an upsert's $1 is the event types that delete.
def _staged(n: int, extra: str = "") -> str:
    """The stage as rows with their payload parsed, once (OFFSET 0 keeps the subquery from
    being pulled up, which would parse it again for every column that reads it). n: the
    parameter of the one entry to take (n = 0: all of them, no parameter)."""
    only = f" WHERE (${n}::text IS NULL OR entry_id = ${n})" if n else ""
    return (
        "(SELECT stream, entry_id, event_type, data::jsonb AS payload, produced_at, meta"
        f"{extra} FROM {STAGE}{only} OFFSET 0) s"
    )


def append_sql(spec: TableSpec, *, replay_safe: bool = True) -> str:
    """Append: every staged entry becomes a row; a replayed one hits (stream, entry_id), and is
    skipped (replay_safe, with $1: the one entry to take, or NULL) or refuses the batch: a plain
    INSERT of the whole stage, with no parameter, is the fast path's (it costs about half of one
    with ON CONFLICT: no speculative insertion per row; and it can share a round trip with
    COMMIT)."""
    plain = [c for c in spec.columns if not generated(spec, c)]  # Postgres computes the rest
    envelope = envelope_columns(spec)
    values = ", ".join([*(value_expr(c) for c in plain), *(f"s.{e}" for e in envelope)])
    return (
        f"INSERT INTO {quote_ident(spec.name)} ({_names([c.name for c in plain] + envelope)})"
        f" SELECT {values} FROM {_staged(1 if replay_safe else 0)}"
    ) + (" ON CONFLICT (stream, entry_id) DO NOTHING" if replay_safe else "")


def upsert_sql(spec: TableSpec, *, plain_inserts: bool = False) -> str:
    """Upsert: the batch folded to its latest entry per key, then one statement for the rows
    that change (each only where its position is newer than the row's, or the tombstone's).
    Returns a row (stream, changed, fresh) per stream whose entries changed the table (upserted
    a row, or deleted one with its tombstone); fresh: how many of them the plain INSERT made.

    plain_inserts: the keys the table lacks are inserted by a plain INSERT, which skips ON
    CONFLICT's speculative insertion (its own index check, lock and WAL record per row: about a
    quarter of an insert's cost); the keys it has still go through ON CONFLICT, which also
    re-inserts a row deleted meanwhile. A key another transaction inserts at the same time is
    then a unique violation: the batch is rolled back and written again without plain_inserts
    (typed_sink.py), so the race costs time, never a row."""
    table = quote_ident(spec.name)
    key = list(spec.key)
    declared = [c.name for c in spec.columns]
    envelope = envelope_columns(spec)
    # Deletes need their key only: their other columns are not cast (and not checked).
    casts = ", ".join(
        (
            value_expr(c)
            if c.name in key
            else f"CASE WHEN streamd_delete THEN NULL ELSE {value_expr(c)} END"
        )
        + f" AS {quote_ident(c.name)}"
        for c in spec.columns
    )
    latest = (
        f"SELECT DISTINCT ON ({_names(key)}) * FROM (SELECT {casts}, s.*,"
        " split_part(s.entry_id, '-', 1)::bigint AS entry_ms,"
        " split_part(s.entry_id, '-', 2)::numeric AS entry_seq"
        f" FROM {_staged(2, ', event_type = ANY($1::text[]) AS streamd_delete')}"
        f") x ORDER BY {_names(key)}, entry_ms DESC, entry_seq DESC, stream DESC"
    )
    row_columns = [*declared, *envelope, "entry_ms", "entry_seq"]
    updates = ", ".join(f"{quote_ident(c)} = EXCLUDED.{quote_ident(c)}" for c in row_columns)
    on_key = " AND ".join(f"r.{quote_ident(k)} = b.{quote_ident(k)}" for k in key)
    newer = f"{_position('r')} < {_position('EXCLUDED')}"
    ctes = [f"b AS MATERIALIZED ({latest})"]
    put_where = "NOT b.streamd_delete"
    changed = ["SELECT stream, false AS fresh FROM put"]
    if spec.delete_types:
        tombs = quote_ident(tombstone_table(spec))
        tomb_cols = [*key, "stream", "entry_id", "entry_ms", "entry_seq"]
        tomb_updates = ", ".join(
            f"{quote_ident(c)} = EXCLUDED.{quote_ident(c)}" for c in tomb_cols[len(key) :]
        )
        ctes.append(
            f"tomb AS (INSERT INTO {tombs} AS r ({_names(tomb_cols)})"
            f" SELECT {_names(tomb_cols, 'b.')} FROM b WHERE b.streamd_delete"
            f" ON CONFLICT ({_names(key)}) DO UPDATE SET {tomb_updates}, deleted_at = now()"
            f" WHERE {newer} RETURNING r.stream)"
        )
        ctes.append(
            f"gone AS (DELETE FROM {table} r USING b WHERE b.streamd_delete AND {on_key}"
            f" AND {_position('r')} < {_position('b')} RETURNING 1)"
        )
        put_where += (
            f" AND NOT EXISTS (SELECT 1 FROM {tombs} r WHERE {on_key}"
            f" AND {_position('r')} >= {_position('b')})"
        )
        changed.append("SELECT stream, false FROM tomb")
    if plain_inserts:
        has_key = f"EXISTS (SELECT 1 FROM {table} r WHERE {on_key})"
        ctes.append(
            f"new AS (INSERT INTO {table} AS r ({_names(row_columns)})"
            f" SELECT {_names(row_columns, 'b.')} FROM b WHERE {put_where} AND NOT {has_key}"
            " RETURNING r.stream)"
        )
        put_where += f" AND {has_key}"
        changed.append("SELECT stream, true FROM new")
    ctes.append(
        f"put AS (INSERT INTO {table} AS r ({_names(row_columns)})"
        f" SELECT {_names(row_columns, 'b.')} FROM b WHERE {put_where}"
        f" ON CONFLICT ({_names(key)}) DO UPDATE SET {updates}, ingested_at = now()"
        f" WHERE {newer} RETURNING r.stream)"
    )
    return (
        f"WITH {', '.join(ctes)} SELECT stream, count(*) AS changed,"
        " count(*) FILTER (WHERE fresh) AS fresh"
        f" FROM ({' UNION ALL '.join(changed)}) c GROUP BY stream"
    )


def check_function(spec: TableSpec) -> tuple[str, str]:
    """(CREATE statement, call) of a function that says what in a staged entry the table cannot
    take, with Postgres's own message: (data, is_delete) -> text[] as [column, SQLSTATE,
    message, ...], the column '' for a payload that is not JSON. Each value is assigned to a
    variable of the column's exact type, which refuses what the INSERT would refuse. Only run
    after a batch was refused; made in pg_temp (this session's), within the transaction."""
    name = f"pg_temp.{quote_ident('streamd_check_' + spec.name)}"
    declare = "".join(f"v{i} {c.pg_type}; " for i, c in enumerate(spec.columns))
    body = []
    for i, c in enumerate(spec.columns):
        label = c.name  # [a-z_][a-z0-9_]*: safe in a literal
        step = (
            f"BEGIN v{i} := {value_expr(c, 'j')}; EXCEPTION WHEN data_exception"
            " OR integrity_constraint_violation THEN"
            f" bad := bad || ARRAY['{label}', SQLSTATE, SQLERRM]; END;"
        )
        if c.name in spec.key:
            step += (
                f" IF v{i} IS NULL AND NOT '{label}' = ANY(bad) THEN bad := bad ||"
                f" ARRAY['{label}', '23502', 'missing: a key column needs a value']; END IF;"
            )
        else:
            step = f"IF NOT d THEN {step} END IF;"
        body.append(step)
    create = (
        f"CREATE OR REPLACE FUNCTION {name}(p text, d boolean) RETURNS text[]"
        f" LANGUAGE plpgsql AS $f$ DECLARE j jsonb; {declare}bad text[] := '{{}}'; BEGIN"
        " BEGIN j := p::jsonb; EXCEPTION WHEN data_exception OR program_limit_exceeded THEN"
        f" RETURN ARRAY['', SQLSTATE, SQLERRM]; END; {' '.join(body)} RETURN bad; END $f$"
    )
    call = (
        f"SELECT entry_id, bad FROM (SELECT entry_id, {name}(data, event_type = ANY($1::text[]))"
        f" AS bad FROM {STAGE}) c WHERE cardinality(bad) > 0"
    )
    return create, call
