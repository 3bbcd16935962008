"""Time partitions of an events table: by the entry ID's milliseconds (`entry_ms`), in UTC ranges
of an hour, a day, a week (from Monday) or a calendar month.

The partition key is the entry ID's time, set by Redis and fixed per entry, never the producer's
`ts`: a replayed entry lands in the partition it landed in the first time, and the unique key
(entry_ms, entry_seq, stream), which contains the partition key as Postgres requires, refuses it
there. There is no default partition: a row for a range with no partition would be refused, so
the sink creates the partitions a batch needs before it writes (create_for), and upkeep creates
the current and next ones ahead of time. Every creation runs in one transaction under an advisory
transaction lock per table, so concurrent workers create each partition once, and the lock is safe
behind a pooler in transaction mode (a session lock would stay on whichever server connection the
pooler lent).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg

from streamd.backends.connections import transaction
from streamd.backends.sql import quote_ident

INTERVALS = ("hour", "day", "week", "month")
_FIXED_MS = {"hour": 3_600_000, "day": 86_400_000, "week": 7 * 86_400_000}
_MONDAY_MS = 4 * 86_400_000  # 1970-01-01 was a Thursday; Monday 1970-01-05 starts week 0
_STAMP = {"hour": "%Y%m%d%H", "day": "%Y%m%d", "week": "%Y%m%d", "month": "%Y%m"}
# The comment streamd puts on a partitioned table it creates: the interval its partitions span.
COMMENT_PREFIX = "streamd: partition_interval="
# pg_get_expr of a range partition's bound: FOR VALUES FROM ('1764547200000') TO ('...')
_BOUND = re.compile(r"FROM \('?(-?\d+)'?\) TO \('?(-?\d+)'?\)")


def _utc(ms: int) -> datetime:
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms)


def _ms(when: datetime) -> int:
    return (when - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(milliseconds=1)


def bounds(interval: str, ms: int) -> tuple[int, int]:
    """[start, end) in epoch ms of the interval that holds ms."""
    if interval == "month":
        when = _utc(ms)
        first = datetime(when.year, when.month, 1, tzinfo=UTC)
        after = datetime(when.year + when.month // 12, when.month % 12 + 1, 1, tzinfo=UTC)
        return _ms(first), _ms(after)
    size = _FIXED_MS[interval]
    offset = _MONDAY_MS if interval == "week" else 0
    start = (ms - offset) // size * size + offset
    return start, start + size


def ahead(interval: str, now_ms: int, count: int) -> list[tuple[int, int]]:
    """The interval that holds now and the `count` after it."""
    out = [bounds(interval, now_ms)]
    while len(out) <= count:
        out.append(bounds(interval, out[-1][1]))
    return out


def partition_name(table: str, interval: str, start_ms: int) -> str:
    """events_p20261201 (day and week: the first day), events_p2026120113 (hour), ..._p202612."""
    return f"{table}_p{_utc(start_ms).strftime(_STAMP[interval])}"


def entry_ms(entry_id: bytes) -> int:
    return int(entry_id.partition(b"-")[0])


@dataclass(frozen=True, slots=True)
class Partition:
    name: str
    start_ms: int
    end_ms: int
    total_bytes: int = 0
    rows_estimate: int = 0  # pg_class.reltuples: -1 until VACUUM or ANALYZE has seen it

    def covers(self, ms: int) -> bool:
        return self.start_ms <= ms < self.end_ms


# Sizes only when asked: pg_total_relation_size locks each partition (ACCESS SHARE), which
# would make the sink's look at its partitions wait behind a LOCK TABLE or a DETACH.
_LIST = """
SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) AS bound,
       CASE WHEN $2 THEN pg_total_relation_size(c.oid) ELSE 0 END AS bytes,
       c.reltuples::bigint AS tuples
FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
WHERE i.inhparent = to_regclass(quote_ident($1))
"""


async def list_partitions(
    conn: asyncpg.Connection, table: str, *, sizes: bool = False
) -> list[Partition]:
    """The table's range partitions in time order (a DEFAULT partition has no range: skipped)."""
    out = []
    for r in await conn.fetch(_LIST, table, sizes):
        found = _BOUND.search(r["bound"] or "")
        if found:
            start, end = int(found.group(1)), int(found.group(2))
            out.append(Partition(r["relname"], start, end, r["bytes"], r["tuples"]))
    return sorted(out, key=lambda p: p.start_ms)


async def table_interval(conn: asyncpg.Connection, table: str, default: str) -> str:
    """The interval streamd created the table with (its comment), else `default`."""
    comment: str | None = await conn.fetchval(
        "SELECT obj_description(to_regclass(quote_ident($1)), 'pg_class')", table
    )
    if comment and comment.startswith(COMMENT_PREFIX):
        interval = comment[len(COMMENT_PREFIX) :].strip()
        if interval in INTERVALS:
            return interval
    return default if default in INTERVALS else "day"


def _gaps(start: int, end: int, existing: list[Partition]) -> list[tuple[int, int]]:
    """The parts of [start, end) no existing partition covers (a partition made by hand, or in
    another interval, is respected: only what is left is created)."""
    gaps = []
    for p in existing:
        if p.end_ms <= start or p.start_ms >= end:
            continue
        if p.start_ms > start:
            gaps.append((start, p.start_ms))
        start = max(start, p.end_ms)
    if start < end:
        gaps.append((start, end))
    return gaps


async def create_ranges(
    conn: asyncpg.Connection, table: str, interval: str, ranges: Iterable[tuple[int, int]]
) -> list[Partition]:
    """Create whatever part of these ranges has no partition yet; returns the partitions now
    there (all of them). One transaction, under the table's partition lock."""
    async with transaction(conn):
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"streamd.parts.{table}")
        existing = await list_partitions(conn, table)
        created = False
        for start, end in sorted(set(ranges)):
            for gap_start, gap_end in _gaps(start, end, existing):
                name = await _free_name(conn, partition_name(table, interval, gap_start))
                await conn.execute(
                    f"CREATE TABLE {quote_ident(name)} "
                    f"PARTITION OF {quote_ident(table)} "
                    f"FOR VALUES FROM ({gap_start}) TO ({gap_end})"
                )
                created = True
        return await list_partitions(conn, table) if created else existing


async def _free_name(conn: asyncpg.Connection, name: str) -> str:
    """name, or name_2, name_3, ...: a table renamed out of the way keeps its partitions' names."""
    candidate, n = name, 1
    while await conn.fetchval("SELECT to_regclass(quote_ident($1)) IS NOT NULL", candidate):
        n += 1
        candidate = f"{name}_{n}"
    return candidate


class Coverage:
    """What one sink knows of its table's partitions, so that a batch whose time is covered
    costs no round trip; asked again when a batch needs a range it has not seen."""

    def __init__(self, table: str, interval: str) -> None:
        self.table = table
        self.interval = interval
        self._known: list[Partition] = []

    def covered(self, ms_values: Iterable[int]) -> bool:
        return all(any(p.covers(ms) for p in self._known) for ms in ms_values)

    def holding(self, ms_values: Iterable[int]) -> Partition | None:
        """The known partition that holds every one of ms_values, if one does."""
        values = list(ms_values)
        first = next((p for p in self._known if values and p.covers(values[0])), None)
        return first if first is not None and all(first.covers(ms) for ms in values) else None

    async def ensure(self, conn: asyncpg.Connection, ms_values: Iterable[int]) -> None:
        values = set(ms_values)
        if self.covered(values):
            return
        needed = {bounds(self.interval, ms) for ms in values}
        self._known = await create_ranges(conn, self.table, self.interval, needed)

    def forget(self) -> None:
        """A partition it knew of is gone (retention): ask Postgres again next time."""
        self._known = []


def is_missing_partition(exc: BaseException) -> bool:
    """Postgres refused a row because no partition holds its key (SQLSTATE 23514)."""
    return isinstance(exc, asyncpg.CheckViolationError) and "no partition of relation" in str(exc)
