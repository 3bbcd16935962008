"""Applying init.sql: the events and dead-letter tables, with names from the config."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import asyncpg

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
    """
    async with conn.transaction():
        await conn.execute(
            "SELECT set_config('streamd.events_table', $1, true),"
            " set_config('streamd.dlq_table', $2, true)",
            settings.events_table,
            settings.dlq_table,
        )
        await conn.execute(init_sql())
