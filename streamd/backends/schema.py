"""Applying init.sql: the events tables and the dead-letter table, with names from the config."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import asyncpg

from streamd.backends.connections import transaction
from streamd.backends.layout import check_dlq_table, ensure_events_table
from streamd.backends.typed_schema import apply_typed_schema
from streamd.config.settings import Settings


def init_sql() -> str:
    """init.sql as shipped in the wheel, or from the source checkout."""
    packaged = resources.files("streamd").joinpath("init.sql")
    if packaged.is_file():
        return packaged.read_text(encoding="utf-8")
    return (Path(__file__).resolve().parents[2] / "init.sql").read_text(encoding="utf-8")


async def apply_schema(conn: asyncpg.Connection, settings: Settings) -> None:
    """Create or upgrade the tables; idempotent and safe to run from several processes at once.

    The names travel as values (set_config) and init.sql quotes them with format('%I').
    Everything is scoped to the one transaction, so it is safe behind a pooler in transaction
    mode: the names are set with set_config(..., is_local => true), and the lock that serializes
    concurrent starts is pg_advisory_xact_lock, released at COMMIT (a session-level advisory lock
    would stay held on whichever server connection the pooler gave us).
    Existing tables are checked first (backends/layout.py): one that streamd cannot write into
    safely stops it here, before anything is created or written.
    """
    await check_dlq_table(conn, settings.dlq_table)
    # Every events table has the same layout (events_table and each [tables.<name>]); the
    # one dead-letter table holds the dead letters of every stream.
    for table in settings.table_names:
        await ensure_events_table(conn, table, settings)
    async with transaction(conn):
        await conn.execute("SELECT set_config('streamd.dlq_table', $1, true)", settings.dlq_table)
        await conn.execute(init_sql())
        await apply_typed_schema(conn, settings)  # [tables.<name>] sections with columns
