"""Partition upkeep of one events table: the current and next partitions created ahead, and
retention: partitions entirely older than `retention` detached and dropped.

Retention runs in one process at a time: its transactions first take pg_try_advisory_xact_lock
(a transaction lock, so it is safe behind a pooler in transaction mode, and released at COMMIT
even if the process dies); a process that does not get it leaves the pass to the one that has
it. DETACH takes an ACCESS EXCLUSIVE lock on the parent table, held only for the catalog change;
the detached table is then dropped apart, locking nothing anyone else uses. lock_timeout keeps a
long-running reader from making every insert queue behind a waiting DETACH: the drop is tried
again at the next upkeep instead. The partition that holds "now" is never dropped, whatever the
retention.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import asyncpg

from streamd.backends import partitions
from streamd.backends.connections import transaction
from streamd.backends.layout import TableLayout, inspect
from streamd.backends.sql import quote_ident
from streamd.config.durations import Retention, parse_retention
from streamd.config.settings import Settings

AHEAD = 2  # partitions created after the current one
DROP_LOCK_TIMEOUT_MS = 1000


@dataclass(slots=True)
class UpkeepResult:
    table: str
    partitioned: bool = False
    created: list[str] = field(default_factory=list)
    dropped: list[partitions.Partition] = field(default_factory=list)
    postponed: list[str] = field(default_factory=list)  # drops that waited too long for the lock


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def retention_cutoff(retention: Retention, at_ms: int) -> int:
    """Epoch ms before which a partition is entirely older than the retention."""
    at = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=at_ms)
    if retention.unit == "month":
        months = at.year * 12 + at.month - 1 - retention.count
        year, month = divmod(months, 12)
        day = min(at.day, 28)  # a month back from the 31st: no 31st of February
        back = at.replace(year=year, month=month + 1, day=day)
    else:
        hours = {"hour": 1, "day": 24, "week": 168}[retention.unit] * retention.count
        back = at - timedelta(hours=hours)
    return (back - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(milliseconds=1)


async def upkeep(
    conn: asyncpg.Connection, table: str, settings: Settings, at_ms: int | None = None
) -> UpkeepResult:
    """Create ahead and apply retention on one table (a no-op unless it is partitioned)."""
    result = UpkeepResult(table)
    found = await inspect(conn, table)
    if not isinstance(found, TableLayout) or not found.partitioned:
        return result
    result.partitioned = True
    at = now_ms() if at_ms is None else at_ms
    before = {p.name for p in await partitions.list_partitions(conn, table)}
    now_there = await partitions.create_ranges(
        conn, table, found.interval, partitions.ahead(found.interval, at, AHEAD)
    )
    result.created = [p.name for p in now_there if p.name not in before]
    retention = parse_retention(settings.retention)
    if retention is not None:
        await _apply_retention(conn, found, retention, at, result)
    return result


async def _apply_retention(
    conn: asyncpg.Connection,
    found: TableLayout,
    retention: Retention,
    at: int,
    result: UpkeepResult,
) -> None:
    """Detach, then drop. Detaching is a catalog change, quick whatever the partition's size:
    the table's ACCESS EXCLUSIVE lock is held only for that. The detached tables are marked
    (a comment), then dropped in a transaction of their own, which locks only them: dropping
    unlinks the files at COMMIT, which takes time with the size (~0.6 s for 440 MB here). A
    table detached by a process that died before dropping it is dropped by the next pass."""
    current_start = partitions.bounds(found.interval, at)[0]
    limit = min(retention_cutoff(retention, at), current_start)
    table = found.table
    lock = f"streamd.retention.{table}"
    mark = _RETIRED + table
    detached: list[partitions.Partition] = []
    async with transaction(conn):
        if not await conn.fetchval("SELECT pg_try_advisory_xact_lock(hashtext($1))", lock):
            return  # another process runs retention of this table now
        await conn.execute(f"SET LOCAL lock_timeout = {DROP_LOCK_TIMEOUT_MS}")
        # Listed under the lock: what another process dropped before is no longer there.
        for part in await partitions.list_partitions(conn, table, sizes=True):
            if part.end_ms > limit:
                continue
            try:
                async with conn.transaction():  # a savepoint: a lock timeout postpones this one
                    name = quote_ident(part.name)
                    await conn.execute(f"ALTER TABLE {quote_ident(table)} DETACH PARTITION {name}")
                    await conn.execute(f"COMMENT ON TABLE {name} IS '{mark}'")
            except asyncpg.LockNotAvailableError:
                result.postponed.append(part.name)
            else:
                detached.append(part)
    async with transaction(conn):
        if not await conn.fetchval("SELECT pg_try_advisory_xact_lock(hashtext($1))", lock):
            return  # left for the next pass, which finds them by their mark
        for name in await conn.fetch(_MARKED, mark):
            await conn.execute(f"DROP TABLE IF EXISTS {quote_ident(name[0])}")
    result.dropped.extend(detached)


# A partition detached for retention, not yet dropped: its comment.
_RETIRED = "streamd: detached by retention from "
_MARKED = """
SELECT c.relname FROM pg_class c
JOIN pg_description d ON d.objoid = c.oid AND d.classoid = 'pg_class'::regclass AND d.objsubid = 0
WHERE d.description = $1 AND c.relkind = 'r' AND NOT c.relispartition AND pg_table_is_visible(c.oid)
"""


def maintained_tables(settings: Settings) -> list[str]:
    """The events-layout tables serve writes into: events_table and the untyped routes."""
    names = [settings.events_table]
    names += [t.name for t in settings.tables if not t.typed and t.name not in names]
    return names
