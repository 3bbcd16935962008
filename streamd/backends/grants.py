"""What streamd's Postgres role must be allowed to do, checked once at start.

A least-privilege role (conf/least-privilege.sql) owns nothing: the schema is created by an owner
with `streamd db init`, and `serve` only writes. Without this check a missing grant would surface
later, on the first batch (or on the first replay, for TEMP), as a fault retried forever; at start
it is one clear line and exit 78 instead.
"""

from __future__ import annotations

import asyncpg

from streamd.backends.typed_schema import typed_privilege_problems
from streamd.config.settings import Settings

# One round trip. Unqualified names resolve through search_path, as the sink's statements do.
_CHECK = """
SELECT current_user AS who, current_database() AS db, ev IS NOT NULL AS has_ev,
       dl IS NOT NULL AS has_dl,
       has_database_privilege(current_database(), 'TEMPORARY') AS db_temp,
       has_table_privilege(ev, 'INSERT') AS ev_insert,
       has_table_privilege(ev, 'SELECT') AS ev_select,
       has_table_privilege(dl, 'INSERT') AS dl_insert,
       has_table_privilege(dl, 'SELECT') AS dl_select,
       seq, seq IS NULL OR has_sequence_privilege(seq, 'USAGE') AS seq_usage
FROM (SELECT to_regclass(quote_ident($1)) AS ev, to_regclass(quote_ident($2)) AS dl,
             pg_get_serial_sequence(quote_ident($2), 'id') AS seq) AS names
"""


async def schema_exists(conn: asyncpg.Connection, settings: Settings) -> bool:
    """Every table is visible to this role."""
    for table in settings.table_names:
        row = await conn.fetchrow(
            "SELECT to_regclass(quote_ident($1)) IS NOT NULL AND to_regclass(quote_ident($2)) "
            "IS NOT NULL",
            table,
            settings.dlq_table,
        )
        if not row[0]:
            return False
    return True


async def privilege_problem(conn: asyncpg.Connection, settings: Settings) -> str | None:
    """One line naming the role and what it lacks, or None when it has all `serve` needs."""
    missing: list[str] = []
    for table in settings.table_names:  # each events table, with the one dead-letter table
        row = await conn.fetchrow(_CHECK, table, settings.dlq_table)
        missing += [m for m in _missing(row, table, settings.dlq_table) if m not in missing]
    missing += await typed_privilege_problems(conn, settings)
    if not missing:
        return None
    return (
        f"role {row['who']} lacks what streamd needs: {'; '.join(missing)} "
        "(grant it as in conf/least-privilege.sql)"
    )


def _missing(r: asyncpg.Record, events_table: str, dlq_table: str) -> list[str]:
    """INSERT and SELECT on both tables (COPY, INSERT ... ON CONFLICT, and the staging table's
    LIKE need them), USAGE on the dead-letter id sequence, TEMP on the database (the staging
    table for replayed batches), as grant-like phrases."""
    missing: list[str] = []
    for table, present, key in (
        (events_table, r["has_ev"], "ev"),
        (dlq_table, r["has_dl"], "dl"),
    ):
        if not present:
            missing.append(f"table {table} (not found)")
            continue
        lacking = [p for p in ("INSERT", "SELECT") if not r[f"{key}_{p.lower()}"]]
        if lacking:
            missing.append(f"{', '.join(lacking)} on table {table}")
    if not r["seq_usage"]:
        missing.append(f"USAGE on sequence {r['seq']}")
    if not r["db_temp"]:
        missing.append(f"TEMPORARY on database {r['db']}")
    return missing
