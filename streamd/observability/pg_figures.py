"""Postgres figures of the monitor that are plain queries: a table's size and statistics, the
planner's estimates of rows per stream and per type on a big table, and the latency percentiles
of recent rows across tables."""

from __future__ import annotations

import asyncpg

from streamd.backends.sql import quote_ident

TOP_TYPES = 20
# Latency of a row: produced -> ingested (a producer clock ahead of Postgres' counts as 0).
LATENCY_SQL = "greatest(0, extract(epoch FROM ingested_at - produced_at))"


async def table_info(conn: asyncpg.Connection, table: str) -> asyncpg.Record | None:
    """A table's statistics and sizes; of a partitioned table, summed over its partitions (the
    parent itself holds no rows: its own size and reltuples are 0 and -1)."""
    return await conn.fetchrow(
        "SELECT c.oid, n.nspname, c.relname, current_setting('block_size')::int AS block_size,"
        " s.reltuples, s.relpages, s.heap_bytes, s.total_bytes"
        " FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace, LATERAL ("
        "  SELECT coalesce(CASE WHEN bool_and(l.reltuples < 0) THEN -1"
        "   ELSE sum(greatest(l.reltuples, 0)) END, -1)::float8 AS reltuples,"
        "   coalesce(sum(l.relpages), 0)::bigint AS relpages,"
        "   coalesce(sum(pg_relation_size(l.oid)), 0)::bigint AS heap_bytes,"
        "   coalesce(sum(pg_total_relation_size(l.oid)), 0)::bigint AS total_bytes"
        "  FROM pg_partition_tree(c.oid) t JOIN pg_class l ON l.oid = t.relid WHERE t.isleaf"
        " ) s WHERE c.oid = to_regclass($1)",
        quote_ident(table),
    )


def current_rows(info: asyncpg.Record) -> int:
    """The planner's row count scaled to the table's current size (it grows between ANALYZEs)."""
    pages = info["heap_bytes"] / info["block_size"]
    return int(info["reltuples"] / info["relpages"] * pages)


async def _column_stats(
    conn: asyncpg.Connection, info: asyncpg.Record, column: str
) -> asyncpg.Record | None:
    return await conn.fetchrow(
        "SELECT most_common_vals::text::text[] AS vals, most_common_freqs AS freqs, "
        "n_distinct, null_frac FROM pg_stats "
        "WHERE schemaname = $1 AND tablename = $2 AND attname = $3",
        info["nspname"],
        info["relname"],
        column,
    )


async def stream_estimates(
    conn: asyncpg.Connection, info: asyncpg.Record, names: list[str], total: int
) -> dict[str, int]:
    """Rows per stream as the planner would estimate `stream = $1`: a common value's frequency,
    else the rest spread evenly over the other distinct values."""
    row = await _column_stats(conn, info, "stream")
    if row is None or row["vals"] is None:
        return {}
    freqs = dict(zip(row["vals"], row["freqs"], strict=True))
    distinct = row["n_distinct"] if row["n_distinct"] > 0 else -row["n_distinct"] * total
    others = max(1.0, distinct - len(freqs))
    rest = max(0.0, 1.0 - sum(freqs.values()) - (row["null_frac"] or 0.0)) / others
    return {name: int(freqs.get(name, rest) * total) for name in names}


async def types_from_stats(
    conn: asyncpg.Connection, info: asyncpg.Record, scoped: int
) -> tuple[dict[str, int], int]:
    """Rows per type estimated from ANALYZE's most common values (no scan of a big table),
    scaled to the configured streams' share of it."""
    row = await _column_stats(conn, info, "event_type")
    if row is None or row["vals"] is None:
        return {}, 0
    pairs = sorted(zip(row["vals"], row["freqs"], strict=True), key=lambda p: -p[1])
    distinct = row["n_distinct"]
    types = int(distinct if distinct > 0 else -distinct * current_rows(info))
    return {value: int(freq * scoped) for value, freq in pairs[:TOP_TYPES]}, max(types, len(pairs))


async def overall_latency(
    conn: asyncpg.Connection, tables: list[tuple[str, list[str], str]]
) -> tuple[float | None, float | None]:
    """p50 and p99 of produced -> ingested over the recent rows of every stream."""
    if not tables:
        return None, None
    parts, args = [], []
    for i, (table, names, recent) in enumerate(tables, start=1):
        parts.append(
            f"SELECT {LATENCY_SQL} AS s FROM {table} WHERE {recent} AND stream = ANY(${i}::text[])"
        )
        args.append(names)
    pcts = await conn.fetchval(
        "SELECT percentile_cont(ARRAY[0.5, 0.99]) WITHIN GROUP (ORDER BY s) "
        f"FROM ({' UNION ALL '.join(parts)}) AS recent",
        *args,
    )
    if pcts is None:
        return None, None
    return round(pcts[0] * 1000, 2), round(pcts[1] * 1000, 2)
