"""`streamd db migrate` (backends/migrate.py), and `streamd db partitions`: each events table's
partitions with their time ranges, sizes and row estimates; `--upkeep` first runs one round of
what serve does every maintenance_interval_s (create ahead, apply retention), for a cron job of
the table owner when serve's role may not create partitions."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import asyncpg

from streamd.backends import partitions
from streamd.backends.connections import postgres_connect
from streamd.backends.faults import POSTGRES_FAULTS
from streamd.backends.layout import TableLayout, inspect
from streamd.backends.migrate import Progress, migrate
from streamd.backends.preflight import postgres_error
from streamd.backends.upkeep import UpkeepResult, maintained_tables, now_ms, upkeep
from streamd.common.text import human_bytes
from streamd.config.settings import Settings


def _when(ms: int) -> str:
    return (datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms)).strftime(
        "%Y-%m-%d %H:%M"
    )


async def partition_report(settings: Settings, *, run_upkeep: bool = False) -> str:
    try:
        conn = await postgres_connect(settings)
    except (*POSTGRES_FAULTS, ValueError) as exc:
        raise postgres_error(settings, exc) from None
    try:
        lines: list[str] = []
        for table in maintained_tables(settings):
            if run_upkeep:
                lines += _upkeep_lines(await upkeep(conn, table, settings))
            lines += await _table_lines(conn, table)
        return "\n".join(lines)
    except POSTGRES_FAULTS as exc:
        raise postgres_error(settings, exc, "list the partitions") from None
    finally:
        await conn.close()


async def run_migrate(settings: Settings, progress: Progress) -> None:
    """Migrate events_table (see backends/migrate.py), printing progress lines."""
    try:
        conn = await postgres_connect(settings)
    except (*POSTGRES_FAULTS, ValueError) as exc:
        raise postgres_error(settings, exc) from None
    try:
        result = await migrate(conn, settings.events_table, settings, progress)
    except POSTGRES_FAULTS as exc:
        raise postgres_error(settings, exc, "migrate (run it again to resume)") from None
    finally:
        await conn.close()
    if result.kept_as:
        progress(f"{result.table}: migrated, {result.copied:,} rows copied")


def _upkeep_lines(result: UpkeepResult) -> list[str]:
    out = [f"created {result.table}.{name}" for name in result.created]
    out += [f"dropped {result.table}.{p.name} ({p.rows_estimate} rows)" for p in result.dropped]
    out += [f"postponed dropping {result.table}.{name}: table busy" for name in result.postponed]
    return out


async def _table_lines(conn: asyncpg.Connection, table: str) -> list[str]:
    found = await inspect(conn, table)
    if found is None:
        return [f"{table}: no such table (streamd db init creates it)"]
    if not isinstance(found, TableLayout):
        return [f"{table}: not streamd's layout: {found}"]
    if not found.partitioned:
        return [f"{table}: not partitioned ({found.kind} key; streamd db migrate converts it)"]
    parts = await partitions.list_partitions(conn, table, sizes=True)
    now = now_ms()
    out = [f"{table}: partitioned by {found.interval} (UTC), {len(parts)} partitions"]
    out.append(f"  {'partition':<32} {'from':<16}   {'to':<16} {'size':>10} {'rows≈':>12}")
    for p in parts:
        rows = "?" if p.rows_estimate < 0 else f"{p.rows_estimate:,}"
        mark = "  (current)" if p.covers(now) else ""
        out.append(
            f"  {p.name:<32} {_when(p.start_ms):<16} → {_when(p.end_ms):<16}"
            f" {human_bytes(p.total_bytes):>10} {rows:>12}{mark}"
        )
    return out
