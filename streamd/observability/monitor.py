"""The pipeline dashboard's figures (`streamd monitor`) and its Python API.

    async with Monitor(settings) as m:
        await m.stream_length(); await m.pending(); await m.lag()
        await m.postgres_stats(); snap = await m.snapshot()

A snapshot has a StreamView per configured stream (names, and patterns resolved with SCAN TYPE
stream, at most 1000) and totals over those streams only: every Postgres figure is restricted to
`stream = ANY(...)` in the table each stream is routed to, never the whole table.

Every figure is cheap to get on a big table, since a dashboard asks every few seconds: rows per
stream and per type are exact on small tables and estimates from the planner's statistics
(pg_stats on `stream` and `event_type`, scaled to the table's current size) on big ones; "last
minute", its latency percentiles and the newest row are served by the BRIN index on ingested_at;
the rate per stream is the change of the group's entries done (entries-read minus pending) between
two refreshes. Every query runs under a short statement_timeout, so a slow Postgres shows up as a
gap, not as a frozen dashboard.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from collections.abc import Sequence
from typing import Any, Self

import asyncpg
import redis.asyncio as aioredis

from streamd.backends.connections import postgres_connect, redis_client, resolve_cluster
from streamd.backends.discovery import Resolved
from streamd.backends.faults import describe
from streamd.backends.sql import quote_ident
from streamd.config.settings import Settings
from streamd.config.tables import is_pattern
from streamd.observability.pg_figures import (
    LATENCY_SQL,
    TOP_TYPES,
    current_rows,
    overall_latency,
    stream_estimates,
    table_info,
    types_from_stats,
)
from streamd.observability.redis_stats import (
    RedisStats,
    configured_streams,
    dead_stream_of,
    read_group_details,
    read_redis_stats,
    read_streams_stats,
    sum_stats,
)
from streamd.observability.serve_latency import LatencyWatch
from streamd.observability.serve_view import ProcessSampler, roles, serve_stats, serve_statuses
from streamd.observability.snapshot import (
    InsertLatency,
    PostgresStats,
    ProcessStats,
    ServeStats,
    Snapshot,
    StreamView,
)

__all__ = ["InsertLatency", "Monitor", "PostgresStats", "ProcessStats", "ServeStats", "Snapshot"]

EXACT_MAX_BYTES = 32 * 1024 * 1024  # count(*) below this heap size: tens of milliseconds
QUERY_TIMEOUT_MS = 5000

PGSS_HINT = (
    "insert latency: pg_stat_statements is not loaded (add it to shared_preload_libraries, "
    "then CREATE EXTENSION pg_stat_statements)"
)
_RECENT = "ingested_at > now() - interval '1 minute'"
# On a big table, once the monitor has watched a minute of entries done in Redis, the last
# minute's count comes from there and the scan for latency and the newest row shrinks to this.
_RECENT_SHORT = "ingested_at > now() - interval '10 seconds'"


class Monitor:
    """Read-only views of the pipeline. Keeps one Redis client and one Postgres connection."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._redis: aioredis.Redis | None = None
        self._pg: asyncpg.Connection | None = None
        self._sampler = ProcessSampler()
        # Until Redis resolves the patterns: the exact names.
        self._names: tuple[str, ...] = tuple(n for n in settings.stream_names if not is_pattern(n))
        self._done: dict[str, tuple[float, int]] = {}  # stream -> (monotonic, entries done)
        self._insert_totals: tuple[int, float] | None = None  # pg_stat_statements calls, ms
        self._done_history: deque[tuple[float, int]] = deque()
        self._watched_minute: int | None = None  # entries done in the last minute, once known
        self._latency = LatencyWatch(settings.resolved_state_dir())

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *_exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        redis_conn, self._redis = self._redis, None
        pg, self._pg = self._pg, None
        if redis_conn is not None:
            await redis_conn.aclose()
        if pg is not None and not pg.is_closed():
            await pg.close(timeout=5)

    # --- Redis ---------------------------------------------------------------------------

    @property
    def redis(self) -> aioredis.Redis:
        if self._redis is None:
            # In a cluster the dead stream's name depends on it (config/sharding.py).
            self.settings = resolve_cluster(self.settings)
            self._redis = redis_client(self.settings, client_name="streamd-monitor")
        return self._redis

    async def resolve(self) -> Resolved:
        """The configured streams (patterns resolved), remembered for postgres_stats()."""
        resolved = await configured_streams(self.redis, self.settings)
        self._names = resolved.streams
        return resolved

    async def redis_stats(self, stream: str | None = None) -> RedisStats:
        """One stream's figures (settings.stream unless given)."""
        return await read_redis_stats(self.redis, self.settings, stream=stream)

    async def stream_length(self) -> int:
        return (await self.redis_stats()).stream_length

    async def pending(self) -> int | None:
        """Entries delivered to the group and not yet acknowledged (None: no group yet)."""
        return (await self.redis_stats()).pending

    async def lag(self) -> int | None:
        """Entries not yet delivered to the group (None: no group yet, or Redis cannot tell)."""
        return (await self.redis_stats()).lag

    async def dlq_length(self) -> int | None:
        return (await self.redis_stats()).dlq_length

    # The original pipeline's Monitor method names, for code written against it.
    get_stream_length = stream_length
    get_pending_messages = pending

    # --- Postgres ------------------------------------------------------------------------

    async def _conn(self) -> asyncpg.Connection:
        if self._pg is None or self._pg.is_closed():
            self._pg = await postgres_connect(self.settings)
            await self._pg.execute(f"SET statement_timeout = {QUERY_TIMEOUT_MS}")
        return self._pg

    async def postgres_stats(self, streams: Sequence[str] | None = None) -> PostgresStats:
        """Totals over these streams (default: the configured ones, as last resolved)."""
        names = self._names if streams is None else tuple(streams)
        views = {n: self._view(n) for n in names}
        return await self._postgres(views)

    get_postgres_stats = postgres_stats

    def _view(self, name: str) -> StreamView:
        s = self.settings
        return StreamView(name, s.table_for(name), dead_stream_of(s, name))

    async def _postgres(self, views: dict[str, StreamView]) -> PostgresStats:
        """Fill each view's rows from its table and return the totals over them."""
        conn = await self._conn()
        stats = PostgresStats()
        by_table: dict[str, list[str]] = {}
        for view in views.values():
            by_table.setdefault(view.table, []).append(view.name)
        types: Counter[str] = Counter()
        recent_tables: list[tuple[str, list[str], str]] = []
        for table, names in by_table.items():
            info = await table_info(conn, table)
            stats.tables.append(table)
            for name in names:
                views[name].rows = 0
                views[name].table_exists = info is not None
            if info is None:
                continue  # no schema yet: nothing ingested
            recent_tables.append(
                (quote_ident(table), names, _recent_window(info, self._watched_minute))
            )
            stats.table_size_bytes += info["total_bytes"]
            table_types, distinct = await self._table_rows(conn, info, names, views)
            types.update(table_types)
            stats.types_total += distinct
        scoped = [views[n] for n in views]
        stats.total_events = sum(v.rows or 0 for v in scoped)
        stats.total_estimated = any(v.rows_estimated for v in scoped)
        stats.by_type_estimated = stats.total_estimated
        stats.events_by_type = dict(
            sorted(types.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_TYPES]
        )
        stats.types_total = (
            max(stats.types_total, len(types)) if len(by_table) > 1 else stats.types_total
        )
        stats.events_last_minute = sum(v.last_minute or 0 for v in scoped)
        if any(window != _RECENT for _, _, window in recent_tables):
            stats.events_last_minute, stats.last_minute_estimated = self._watched_minute, True
        ages = [v.last_batch_age_s for v in scoped if v.last_batch_age_s is not None]
        stats.last_batch_age_s = min(ages) if ages else None
        stats.latency_p50_ms, stats.latency_p99_ms = await overall_latency(conn, recent_tables)
        await self._dead_letters(conn, views, stats)
        stats.insert_latency, stats.insert_latency_hint = await self._insert_latency(
            conn, list(by_table)
        )
        return stats

    async def _table_rows(
        self,
        conn: asyncpg.Connection,
        info: asyncpg.Record,
        names: list[str],
        views: dict[str, StreamView],
    ) -> tuple[dict[str, int], int]:
        """Rows per stream (exact or estimated), the last minute's, and the top types of these
        streams in one table. Returns (top types, how many types there are)."""
        table = f"{quote_ident(info['nspname'])}.{quote_ident(info['relname'])}"
        big = _is_big(info)
        recent = _recent_window(info, self._watched_minute)
        rows = await conn.fetch(
            f"SELECT stream, count(*) AS n, count(*) FILTER (WHERE {recent}) AS recent, "
            "extract(epoch FROM now() - max(ingested_at))::float8 AS age, "
            f"percentile_cont(ARRAY[0.5, 0.99]) WITHIN GROUP (ORDER BY {LATENCY_SQL}) "
            f"FILTER (WHERE {recent}) AS pcts "
            f"FROM {table} WHERE stream = ANY($1::text[]) "
            f"{'AND ' + recent if big else ''} GROUP BY stream",
            names,
        )
        for row in rows:
            view = views[row["stream"]]
            view.rows = int(row["n"])
            view.last_minute = int(row["recent"]) if recent == _RECENT else None
            view.last_batch_age_s = row["age"]
            pcts = row["pcts"]
            if pcts is not None:
                view.latency_p50_ms, view.latency_p99_ms = (round(p * 1000, 2) for p in pcts)
        if not big:
            top = await conn.fetch(
                "SELECT event_type, count(*) AS n, count(*) OVER () AS types "
                f"FROM {table} WHERE stream = ANY($1::text[]) "
                f"GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT {TOP_TYPES}",
                names,
            )
            return {r["event_type"]: r["n"] for r in top}, int(top[0]["types"]) if top else 0
        # A big table: rows from the planner's statistics, the last minute's from the scan above.
        total = current_rows(info)
        estimates = await stream_estimates(conn, info, names, total)
        for name in names:
            view = views[name]
            # Nothing in the last minute leaves last_batch_age_s None: older, not looked for.
            view.rows, view.rows_estimated = max(view.rows or 0, estimates.get(name, 0)), True
        scoped = sum(views[n].rows or 0 for n in names)
        return await types_from_stats(conn, info, scoped)

    async def _dead_letters(
        self, conn: asyncpg.Connection, views: dict[str, StreamView], stats: PostgresStats
    ) -> None:
        if await table_info(conn, self.settings.dlq_table) is None:
            return
        rows = await conn.fetch(
            f"SELECT stream, reason, count(*) AS n FROM {quote_ident(self.settings.dlq_table)} "
            "WHERE stream = ANY($1::text[]) GROUP BY 1, 2",
            list(views),
        )
        for view in views.values():
            view.dlq_rows = 0
        reasons: Counter[str] = Counter()
        for row in rows:
            views[row["stream"]].dlq_rows = (views[row["stream"]].dlq_rows or 0) + row["n"]
            reasons[row["reason"]] += row["n"]
        stats.dlq_count = sum(reasons.values())
        stats.dlq_by_reason = dict(reasons.most_common())

    async def _insert_latency(
        self, conn: asyncpg.Connection, tables: list[str]
    ) -> tuple[InsertLatency | None, str | None]:
        installed = await conn.fetchval(
            "SELECT to_regclass('pg_stat_statements') IS NOT NULL "
            "AND current_setting('shared_preload_libraries') LIKE '%pg_stat_statements%'"
        )
        if not installed:
            return None, PGSS_HINT
        patterns = [f"{verb} {quote_ident(t)}%" for t in tables for verb in ("COPY", "INSERT INTO")]
        # A batch within one partition is copied straight into it (pipeline/sink.py).
        patterns += [f"COPY {quote_ident(t + '_p')[:-1]}%" for t in tables]
        try:
            row = await conn.fetchrow(
                "SELECT sum(calls)::bigint AS calls, sum(total_exec_time) AS total_ms, "
                "max(max_exec_time) AS max_ms, sum(rows) AS rows "
                "FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database "
                "WHERE datname = current_database()) AND query LIKE ANY($1::text[])",
                patterns,
            )
        except asyncpg.PostgresError as exc:
            return None, f"insert latency: pg_stat_statements: {describe(exc)}"
        if row is None or not row["calls"]:
            return None, "insert latency: no inserts recorded by pg_stat_statements yet"
        calls, total_ms = int(row["calls"]), float(row["total_ms"])
        latency = InsertLatency(
            calls=calls,
            mean_ms=round(total_ms / calls, 3),
            max_ms=round(float(row["max_ms"]), 3),
            rows_per_call=round(float(row["rows"] or 0) / calls, 1),
        )
        previous, self._insert_totals = self._insert_totals, (calls, total_ms)
        if previous is not None and calls >= previous[0]:
            latency.interval_calls = calls - previous[0]
            if latency.interval_calls:
                latency.interval_mean_ms = round(
                    (total_ms - previous[1]) / latency.interval_calls, 3
                )
        return latency, None

    # --- everything ----------------------------------------------------------------------

    async def snapshot(self, *, min_cpu_sample_s: float = 0.0) -> Snapshot:
        """All figures at once; a failing source is reported in `errors`, not raised."""
        started = time.monotonic()
        statuses = serve_statuses(self.settings)
        pids = [pid for status in statuses for pid, _ in roles(status)]
        self._sampler.prime(pids)
        self._sampler.forget_except(set(pids))
        errors: dict[str, str] = {}
        warnings: list[str] = []
        resolved = await _guard(self.resolve(), "redis", errors)
        views = {name: self._view(name) for name in self._names}
        if resolved is not None:
            warnings += [f"pattern {p!r} matches no stream" for p in resolved.unmatched]
            if resolved.truncated:
                warnings.append(f"{resolved.truncated} more streams match: only 1000 are read")
            await _guard(self._redis_views(views), "redis", errors)
        done = [v.redis.done if v.redis is not None else None for v in views.values()]
        known = [d for d in done if d is not None]
        self._watched_minute = (
            self._inserted_last_minute(sum(known)) if known and len(known) == len(done) else None
        )
        pg_stats = await _guard(self._postgres(views), "postgres", errors)
        if pg_stats is None:
            await self._drop_pg()
        rate, window = self._rates(views, pg_stats)
        for view in views.values():
            if view.redis is not None and view.redis.error:
                warnings.append(f"stream {view.name}: {view.redis.error}")
            elif view.missing:
                warnings.append(
                    f"stream {view.name} does not exist: no such key in Redis, "
                    f"no rows in {view.table} (a typo in the config?)"
                )
            elif view.not_started:
                warnings.append(
                    f"stream {view.name} does not exist yet, nor table {view.table}: "
                    "has serve run with this config?"
                )
        remaining = min_cpu_sample_s - (time.monotonic() - started)
        if remaining > 0 and pids:
            await asyncio.sleep(remaining)
        serve_latency = self._latency.read([int(status["pid"]) for status in statuses])
        return Snapshot(
            taken_at=time.time(),
            stream=",".join(self.settings.stream_names),
            group=self.settings.group,
            redis=sum_stats([v.redis for v in views.values()]) if resolved else None,
            postgres=pg_stats,
            ingest_rate=rate,
            ingest_rate_window_s=window,
            serve=[serve_stats(status, self._sampler) for status in statuses],
            errors=errors,
            streams=list(views.values()),
            streams_left_out=resolved.truncated if resolved else 0,
            warnings=warnings,
            serve_latency=serve_latency,
        )

    async def _redis_views(self, views: dict[str, StreamView]) -> None:
        stats = await read_streams_stats(self.redis, self.settings, list(views))
        redelivered, active = await read_group_details(self.redis, self.settings.group, stats)
        for name, view in views.items():
            view.redis = stats[name]
            known = stats[name].pending is not None
            view.redelivered = redelivered.get(name, 0 if known else None)
            view.active_consumers = active.get(name, 0 if known else None)

    def _rates(
        self, views: dict[str, StreamView], pg: PostgresStats | None
    ) -> tuple[float | None, float | None]:
        """Entries done per second since the previous snapshot, per stream and in all; the
        first time (or when Redis cannot tell), the last minute's average."""
        now = time.monotonic()
        windows: list[float] = []
        for view in views.values():
            done = view.redis.done if view.redis is not None else None
            previous = self._done.get(view.name)
            if done is not None:
                self._done[view.name] = (now, done)
            if previous is not None and done is not None and now > previous[0]:
                view.rate = max(0.0, (done - previous[1]) / (now - previous[0]))
                windows.append(now - previous[0])
            elif view.last_minute is not None:
                view.rate = view.last_minute / 60.0
        if views and len(windows) == len(views):
            return sum(v.rate or 0.0 for v in views.values()), round(max(windows), 1)
        if pg is None or pg.events_last_minute is None:
            return None, None
        return pg.events_last_minute / 60.0, 60.0

    def _inserted_last_minute(self, inserted: int | None) -> int | None:
        """Entries done in the last minute from samples of a counter this monitor took (the
        configured streams' entries done), once it has one at least a minute old (scaled to
        exactly 60 s); None before that."""
        now = time.monotonic()
        history = self._done_history
        if inserted is None:
            return None
        history.append((now, inserted))
        while len(history) > 2 and now - history[1][0] >= 60:
            history.popleft()  # keep one sample a minute old or older, and everything newer
        then, before = history[0]
        if now - then < 60:
            return None
        return max(0, round((inserted - before) * 60 / (now - then)))

    async def _drop_pg(self) -> None:
        pg, self._pg = self._pg, None
        if pg is not None:
            pg.terminate()


async def _guard(work: Any, name: str, errors: dict[str, str]) -> Any:
    try:
        return await work
    except Exception as exc:
        errors[name] = describe(exc)
        return None


def _is_big(info: asyncpg.Record) -> bool:
    return bool(
        info["heap_bytes"] > EXACT_MAX_BYTES and info["reltuples"] >= 0 and info["relpages"]
    )


def _recent_window(info: asyncpg.Record, watched_minute: int | None) -> str:
    return _RECENT_SHORT if _is_big(info) and watched_minute is not None else _RECENT
