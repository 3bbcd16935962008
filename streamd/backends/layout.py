"""The events table's layout: creating it, and checking one that exists before writing into it.

Two layouts are streamd's own:
- "ids" (what `streamd db init` creates): the entry ID as two bigints, the unique key
  (entry_ms, entry_seq, stream) with the stream under COLLATE "C" (bytewise compares), the text
  `entry_id` kept as a plain column for readers, and, with partition_interval set, range
  partitions on entry_ms (backends/partitions.py). bench/layouts.py measures why.
- "text" (the layout of streamd before 0.x): the unique key (stream, entry_id text). Still
  written into as it is; `streamd db migrate` converts it.

A table of any other shape (a hand-made one, another program's `events`) is refused with one
line naming what differs, and streamd never writes into it: above all, not into a table whose
key cannot refuse a replay, where exactly-once would silently become at-least-once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import asyncpg

from streamd.backends import partitions
from streamd.backends.connections import transaction
from streamd.backends.sql import quote_ident
from streamd.config.settings import Settings
from streamd.errors import BootError

# Columns the sink writes, with the type format_type() names; the rest may be anything nullable
# or defaulted (ingested_at has a default, a reader's extra column is left alone).
_WRITTEN = {
    "stream": "text",
    "entry_id": "text",
    "event_type": "text",
    "payload": "jsonb",
    "produced_at": "timestamp with time zone",
    "meta": "jsonb",
}
_IDS = {"entry_ms": "bigint", "entry_seq": "bigint"}
# The unique key exactly-once rests on, per layout, in the order of its index.
KEYS = {"ids": ("entry_ms", "entry_seq", "stream"), "text": ("stream", "entry_id")}

# The columns a binary COPY sends, per layout, in the order of the encoded fields
# (pipeline/sink.py: the ID's numbers before its text, the cheaper order to encode).
COPY_COLUMNS = {
    "text": ["stream", "entry_id", "event_type", "payload", "produced_at", "meta"],
    "ids": [
        "stream",
        "entry_ms",
        "entry_seq",
        "entry_id",
        "event_type",
        "payload",
        "produced_at",
        "meta",
    ],
}


@dataclass(frozen=True, slots=True)
class TableLayout:
    table: str
    kind: str  # "ids" | "text"
    interval: str = ""  # the partitions' interval; "": not partitioned

    @property
    def partitioned(self) -> bool:
        return bool(self.interval)


def create_sql(table: str, interval: str) -> list[str]:
    """The statements that create an events table of the "ids" layout.

    Constraint and index names are left to Postgres, which picks free ones: the leftovers of a
    table renamed out of the way (events_pkey, ...) never block creating a new one.
    """
    t = quote_ident(table)
    partition = " PARTITION BY RANGE (entry_ms)" if interval else ""
    out = [
        f"""CREATE TABLE {t} (
    stream       text COLLATE "C" NOT NULL,
    entry_id     text        NOT NULL,  -- the Redis entry ID, "<ms>-<seq>", for readers
    entry_ms     bigint      NOT NULL,  -- its milliseconds: the partition key
    entry_seq    bigint      NOT NULL,  -- its sequence number
    event_type   text        NOT NULL,
    payload      jsonb       NOT NULL,
    produced_at  timestamptz NOT NULL,  -- the entry's `ts` field, else its ID's milliseconds
    ingested_at  timestamptz NOT NULL DEFAULT now(),
    meta         jsonb,                 -- extra envelope fields, when keep_extra_fields is on
    -- The time first: inserts go to the right edge of the index, and most comparisons end at
    -- the first, integer, column (bench/layouts.py).
    PRIMARY KEY (entry_ms, entry_seq, stream)
){partition}""",
        # BRIN costs almost nothing on insert and serves "events in the last minute".
        f"CREATE INDEX ON {t} USING brin (ingested_at)",
    ]
    if interval:
        comment = partitions.COMMENT_PREFIX + interval
        out.append(f"COMMENT ON TABLE {t} IS '{comment}'")
    return out


_COLUMNS = """
SELECT a.attname AS name, format_type(a.atttypid, a.atttypmod) AS type, a.attnotnull AS notnull,
       a.atthasdef OR a.attidentity <> '' AS defaulted, a.attgenerated <> '' AS generated
FROM pg_attribute a
WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum
"""
# Unique keys that can refuse a replay: immediate, valid, on plain columns, not partial.
_KEYS = """
SELECT ARRAY(SELECT a.attname::text FROM unnest(i.indkey) k
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k) AS columns
FROM pg_index i
WHERE i.indrelid = $1 AND i.indisunique AND i.indimmediate AND i.indisvalid
  AND i.indpred IS NULL AND i.indexprs IS NULL
"""
_RELATION = """
SELECT c.oid, c.relkind::text AS kind, pg_get_partkeydef(c.oid) AS partkey
FROM pg_class c WHERE c.oid = to_regclass(quote_ident($1))
"""


async def inspect(conn: asyncpg.Connection, table: str) -> TableLayout | str | None:
    """The layout of an existing table, what differs from streamd's (one phrase), or None when
    there is no such table."""
    rel = await conn.fetchrow(_RELATION, table)
    if rel is None:
        return None
    if rel["kind"] not in ("r", "p"):
        what = {"v": "a view", "m": "a materialized view", "f": "a foreign table"}
        return f"it is {what.get(rel['kind'], 'not a table')}"
    columns = {r["name"]: r for r in await conn.fetch(_COLUMNS, rel["oid"])}
    keys = [set(r["columns"]) for r in await conn.fetch(_KEYS, rel["oid"])]
    kind = "ids" if "entry_ms" in columns or "entry_seq" in columns else "text"
    wanted = {**_WRITTEN, **(_IDS if kind == "ids" else {})}
    problems = _column_problems(columns, wanted)
    if set(KEYS[kind]) not in keys:
        problems.append(
            f"no unique key on ({', '.join(KEYS[kind])}), which refuses a replayed entry"
        )
    interval = ""
    if rel["kind"] == "p":
        if kind != "ids" or rel["partkey"] != "RANGE (entry_ms)":
            problems.append(f"partitioned by {rel['partkey']}, not RANGE (entry_ms)")
        else:
            interval = await partitions.table_interval(conn, table, "day")
    if problems:
        return "; ".join(problems)
    return TableLayout(table, kind, interval)


def _column_problems(columns: dict[str, asyncpg.Record], wanted: dict[str, str]) -> list[str]:
    missing = [name for name in wanted if name not in columns]
    problems = (
        [f"no column{'s' if len(missing) > 1 else ''} {', '.join(missing)}"] if missing else []
    )
    for name, pg_type in wanted.items():
        col = columns.get(name)
        if col is None:
            continue
        if col["type"] != pg_type:
            problems.append(f"{name} is {col['type']}, not {pg_type}")
        elif col["generated"]:
            problems.append(f"{name} is a generated column")
    for name, col in columns.items():
        if name not in wanted and col["notnull"] and not col["defaulted"]:
            problems.append(f"{name} is NOT NULL with no default (streamd does not write it)")
    return problems


def refusal(table: str, problem: str, setting: str = "events_table") -> BootError:
    return BootError(
        f"table {table!r} exists with another layout than streamd's: {problem}; streamd writes "
        f"nothing into it (rename it, or set {setting} to another name; "
        "docs/partitions.md#tables-that-exist)"
    )


async def ensure_events_table(
    conn: asyncpg.Connection, table: str, settings: Settings
) -> TableLayout:
    """Create the events table `table` if it is missing; check it if it exists (BootError, exit
    78, naming what differs); create its current and next partitions. Idempotent, and safe from
    several processes at once (the schema's advisory transaction lock)."""
    async with transaction(conn):
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext('streamd.schema'))")
        found = await inspect(conn, table)
        if found is None:
            for statement in create_sql(table, settings.partition_interval):
                await conn.execute(statement)
            found = TableLayout(table, "ids", settings.partition_interval)
    if isinstance(found, str):
        raise refusal(table, found)
    if found.partitioned:
        await partitions.create_ranges(
            conn, table, found.interval, partitions.ahead(found.interval, _now_ms(), 2)
        )
    return found


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


_DLQ_WRITTEN = {
    "stream": "text",
    "entry_id": "text",
    "event_type": "text",
    "fields": "jsonb",
    "reason": "text",
    "error": "text",
    "deliveries": "integer",
}


async def check_dlq_table(conn: asyncpg.Connection, table: str) -> None:
    """An existing dead-letter table must take the rows streamd writes, under a unique key on
    (stream, entry_id) (a dead letter recorded twice is refused by it); BootError otherwise."""
    rel = await conn.fetchrow(_RELATION, table)
    if rel is None:
        return
    if rel["kind"] not in ("r", "p"):
        raise refusal(table, "it is not a table", setting="dlq_table")
    columns = {r["name"]: r for r in await conn.fetch(_COLUMNS, rel["oid"])}
    problems = _column_problems(columns, _DLQ_WRITTEN)
    keys = [set(r["columns"]) for r in await conn.fetch(_KEYS, rel["oid"])]
    if {"stream", "entry_id"} not in keys:
        problems.append("no unique key on (stream, entry_id), which refuses a repeated dead letter")
    if problems:
        raise refusal(table, "; ".join(problems), setting="dlq_table")
