"""The pipeline dashboard (`streamd monitor`) and its Python API.

    async with Monitor(settings) as m:
        await m.stream_length(); await m.pending(); await m.lag()
        await m.postgres_stats(); snap = await m.snapshot()

Every figure is cheap to get on a big table, since a dashboard asks every few seconds: total rows
and rows by type are exact on small tables and estimates from the planner's statistics
(pg_class.reltuples scaled to the table's current size, pg_stats' most common values) on big
ones; "last minute" is served by the BRIN index on ingested_at (on a big table, once the monitor
has watched for a minute, by the change of pg_stat_user_tables.n_tup_ins instead); the ingest rate
is the change of n_tup_ins between two refreshes. Every query runs under a short
statement_timeout, so a slow Postgres shows up as a gap, not as a frozen dashboard.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Self

import asyncpg
import psutil
import redis.asyncio as aioredis

from streamd.backends.connections import postgres_connect, redis_client, resolve_cluster
from streamd.backends.faults import describe
from streamd.backends.sql import quote_ident
from streamd.config.settings import Settings
from streamd.observability.redis_stats import RedisStats, read_redis_stats
from streamd.observability.status_file import read_status_files

EXACT_MAX_BYTES = 32 * 1024 * 1024  # count(*) below this heap size: tens of milliseconds
QUERY_TIMEOUT_MS = 5000
TOP_TYPES = 20
CPU_SAMPLE_MIN_S = 0.5  # a CPU percentage over less time than this is mostly noise

PGSS_HINT = (
    "insert latency: pg_stat_statements is not loaded (add it to shared_preload_libraries, "
    "then CREATE EXTENSION pg_stat_statements)"
)


@dataclass(slots=True)
class InsertLatency:
    calls: int
    mean_ms: float
    max_ms: float
    rows_per_call: float


@dataclass(slots=True)
class PostgresStats:
    total_events: int = 0
    total_estimated: bool = False
    events_last_minute: int | None = None
    last_minute_estimated: bool = False
    events_by_type: dict[str, int] = field(default_factory=dict)
    by_type_estimated: bool = False
    dlq_count: int = 0
    table_size_bytes: int = 0
    rows_inserted: int | None = None  # pg_stat_user_tables.n_tup_ins, for the ingest rate
    insert_latency: InsertLatency | None = None
    insert_latency_hint: str | None = None


@dataclass(slots=True)
class ProcessStats:
    pid: int
    role: str
    cpu_percent: float | None
    rss_bytes: int | None


@dataclass(slots=True)
class ServeStats:
    pid: int
    state: str
    ready: bool
    restarts: int
    uptime_s: float
    processes: list[ProcessStats]


@dataclass(slots=True)
class Snapshot:
    taken_at: float
    stream: str
    group: str
    redis: RedisStats | None
    postgres: PostgresStats | None
    ingest_rate: float | None
    ingest_rate_window_s: float | None
    serve: list[ServeStats]
    errors: dict[str, str]

    def to_json(self) -> dict[str, Any]:
        """The `--json` form: flat keys first, named as in the original pipeline's dashboard, then
        the details."""
        r, p = self.redis, self.postgres
        out: dict[str, Any] = {
            "stream": self.stream,
            "group": self.group,
            "stream_length": r.stream_length if r else None,
            "pending": r.pending if r else None,
            "lag": r.lag if r else None,
            "dlq_length": r.dlq_length if r else None,
            "consumers": r.consumers if r else None,
            "total_events": p.total_events if p else None,
            "total_events_estimated": p.total_estimated if p else None,
            "events_last_minute": p.events_last_minute if p else None,
            "events_last_minute_estimated": p.last_minute_estimated if p else None,
            "ingest_rate": None if self.ingest_rate is None else round(self.ingest_rate, 1),
            "ingest_rate_window_s": self.ingest_rate_window_s,
            "dlq_count": p.dlq_count if p else None,
            "table_size_bytes": p.table_size_bytes if p else None,
            "events_by_type": p.events_by_type if p else None,
            "events_by_type_estimated": p.by_type_estimated if p else None,
            "insert_latency": dataclasses.asdict(p.insert_latency)
            if p and p.insert_latency
            else None,
            "insert_latency_hint": p.insert_latency_hint if p else None,
            "restarts": sum(s.restarts for s in self.serve),
            "serve": [dataclasses.asdict(s) for s in self.serve],
            "errors": self.errors,
            "taken_at": self.taken_at,
        }
        return out


# ---------------------------------------------------------------------------------------------
# processes (psutil, from the supervisors' status files)


class ProcessSampler:
    """CPU percentages need two readings: keep psutil handles from one snapshot to the next."""

    def __init__(self) -> None:
        self._procs: dict[int, psutil.Process] = {}

    def prime(self, pids: list[int]) -> None:
        for pid in pids:
            if pid not in self._procs:
                try:
                    proc = psutil.Process(pid)
                    proc.cpu_percent(None)
                except psutil.Error:
                    continue
                self._procs[pid] = proc

    def sample(self, pid: int, role: str) -> ProcessStats:
        proc = self._procs.get(pid)
        if proc is None:
            return ProcessStats(pid, role, None, None)
        try:
            with proc.oneshot():
                return ProcessStats(pid, role, proc.cpu_percent(None), proc.memory_info().rss)
        except psutil.Error:
            self._procs.pop(pid, None)
            return ProcessStats(pid, role, None, None)

    def forget_except(self, pids: set[int]) -> None:
        for pid in set(self._procs) - pids:
            del self._procs[pid]


def _serve_statuses(settings: Settings) -> list[dict[str, Any]]:
    return [
        s
        for s in read_status_files(settings.resolved_state_dir())
        if s.get("stream") == settings.stream and s.get("group") == settings.group
    ]


def _roles(status: dict[str, Any]) -> list[tuple[int, str]]:
    roles = [(int(status["pid"]), "supervisor")]
    for child in status.get("children") or []:
        roles.append((int(child["pid"]), f"worker {child.get('index', '?')}"))
    if status.get("metrics_pid"):
        roles.append((int(status["metrics_pid"]), "metrics"))
    return roles


# ---------------------------------------------------------------------------------------------
# the monitor


class Monitor:
    """Read-only views of the pipeline. Keeps one Redis client and one Postgres connection."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._redis: aioredis.Redis | None = None
        self._pg: asyncpg.Connection | None = None
        self._sampler = ProcessSampler()
        self._last_inserted: tuple[float, int] | None = None
        self._inserted_history: deque[tuple[float, int]] = deque()
        events, dlq = quote_ident(settings.events_table), quote_ident(settings.dlq_table)
        self._events_sql, self._dlq_sql = events, dlq

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

    async def redis_stats(self) -> RedisStats:
        return await read_redis_stats(self.redis, self.settings)

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

    async def postgres_stats(self) -> PostgresStats:
        conn = await self._conn()
        stats = PostgresStats()
        table = await _table_info(conn, self.settings.events_table)
        if table is None:
            return stats  # no schema yet: nothing ingested
        stats.table_size_bytes = table["total_bytes"]
        stats.total_events, stats.total_estimated = await self._count(conn, self._events_sql, table)
        stats.rows_inserted = await conn.fetchval(
            "SELECT n_tup_ins FROM pg_stat_user_tables WHERE relid = $1", table["oid"]
        )
        recent = self._inserted_last_minute(stats.rows_inserted)
        if stats.total_estimated and recent is not None:
            # A big table at a high rate: even an index scan of the last minute is heavy.
            stats.events_last_minute, stats.last_minute_estimated = recent, True
        else:
            stats.events_last_minute = await conn.fetchval(
                f"SELECT count(*) FROM {self._events_sql} "
                "WHERE ingested_at > now() - interval '1 minute'"
            )
        if stats.total_estimated:
            stats.events_by_type = await _types_from_stats(conn, table, stats.total_events)
            stats.by_type_estimated = True
        else:
            rows = await conn.fetch(
                f"SELECT event_type, count(*) AS n FROM {self._events_sql} "
                f"GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT {TOP_TYPES}"
            )
            stats.events_by_type = {r["event_type"]: r["n"] for r in rows}
        dlq = await _table_info(conn, self.settings.dlq_table)
        if dlq is not None:
            stats.dlq_count = (await self._count(conn, self._dlq_sql, dlq))[0]
        stats.insert_latency, stats.insert_latency_hint = await self._insert_latency(conn)
        return stats

    get_postgres_stats = postgres_stats

    def _inserted_last_minute(self, inserted: int | None) -> int | None:
        """Rows inserted in the last minute from n_tup_ins samples this monitor took, once it
        has one at least a minute old (scaled to exactly 60 s); None before that."""
        now = time.monotonic()
        history = self._inserted_history
        if inserted is None:
            return None
        history.append((now, inserted))
        while len(history) > 2 and now - history[1][0] >= 60:
            history.popleft()  # keep one sample a minute old or older, and everything newer
        then, before = history[0]
        if now - then < 60:
            return None
        return max(0, round((inserted - before) * 60 / (now - then)))

    async def _count(
        self, conn: asyncpg.Connection, table_sql: str, info: asyncpg.Record
    ) -> tuple[int, bool]:
        """(rows, estimated): exact for small tables, the planner's estimate for big ones."""
        if info["heap_bytes"] > EXACT_MAX_BYTES and info["reltuples"] >= 0 and info["relpages"]:
            pages = info["heap_bytes"] / info["block_size"]
            return int(info["reltuples"] / info["relpages"] * pages), True
        return int(await conn.fetchval(f"SELECT count(*) FROM {table_sql}")), False

    async def _insert_latency(
        self, conn: asyncpg.Connection
    ) -> tuple[InsertLatency | None, str | None]:
        installed = await conn.fetchval(
            "SELECT to_regclass('pg_stat_statements') IS NOT NULL "
            "AND current_setting('shared_preload_libraries') LIKE '%pg_stat_statements%'"
        )
        if not installed:
            return None, PGSS_HINT
        try:
            row = await conn.fetchrow(
                "SELECT sum(calls)::bigint AS calls, "
                "sum(total_exec_time) / nullif(sum(calls), 0) AS mean_ms, "
                "max(max_exec_time) AS max_ms, sum(rows) / nullif(sum(calls), 0) AS per_call "
                "FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database "
                "WHERE datname = current_database()) "
                "AND (query LIKE 'COPY ' || $1 || '%' OR query LIKE 'INSERT INTO ' || $1 || '%')",
                self._events_sql,
            )
        except asyncpg.PostgresError as exc:
            return None, f"insert latency: pg_stat_statements: {describe(exc)}"
        if row is None or not row["calls"]:
            return None, "insert latency: no inserts recorded by pg_stat_statements yet"
        latency = InsertLatency(
            calls=int(row["calls"]),
            mean_ms=round(float(row["mean_ms"]), 3),
            max_ms=round(float(row["max_ms"]), 3),
            rows_per_call=round(float(row["per_call"] or 0), 1),
        )
        return latency, None

    # --- everything ----------------------------------------------------------------------

    async def snapshot(self, *, min_cpu_sample_s: float = 0.0) -> Snapshot:
        """All figures at once; a failing source is reported in `errors`, not raised."""
        started = time.monotonic()
        statuses = _serve_statuses(self.settings)
        pids = [pid for status in statuses for pid, _ in _roles(status)]
        self._sampler.prime(pids)
        self._sampler.forget_except(set(pids))
        errors: dict[str, str] = {}
        redis_stats = await _guard(self.redis_stats(), "redis", errors)
        pg_stats = await _guard(self.postgres_stats(), "postgres", errors)
        if pg_stats is None:
            await self._drop_pg()
        rate, window = self._ingest_rate(pg_stats)
        remaining = min_cpu_sample_s - (time.monotonic() - started)
        if remaining > 0 and pids:
            await asyncio.sleep(remaining)
        return Snapshot(
            taken_at=time.time(),
            stream=self.settings.stream,
            group=self.settings.group,
            redis=redis_stats,
            postgres=pg_stats,
            ingest_rate=rate,
            ingest_rate_window_s=window,
            serve=[self._serve_stats(status) for status in statuses],
            errors=errors,
        )

    def _ingest_rate(self, pg: PostgresStats | None) -> tuple[float | None, float | None]:
        """Rows/s since the previous snapshot; the first time, the last minute's average."""
        if pg is None:
            return None, None
        now = time.monotonic()
        previous, inserted = self._last_inserted, pg.rows_inserted
        if inserted is not None:
            self._last_inserted = (now, inserted)
        if previous is not None and inserted is not None and now > previous[0]:
            window = now - previous[0]
            return max(0.0, (inserted - previous[1]) / window), round(window, 1)
        if pg.events_last_minute is None:
            return None, None
        return pg.events_last_minute / 60.0, 60.0

    def _serve_stats(self, status: dict[str, Any]) -> ServeStats:
        return ServeStats(
            pid=int(status["pid"]),
            state=str(status.get("state", "")),
            ready=bool(status.get("ready")),
            restarts=int(status.get("restarts") or 0),
            uptime_s=round(max(0.0, time.time() - float(status.get("started_at") or 0)), 1),
            processes=[self._sampler.sample(pid, role) for pid, role in _roles(status)],
        )

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


async def _table_info(conn: asyncpg.Connection, table: str) -> asyncpg.Record | None:
    return await conn.fetchrow(
        "SELECT c.oid, c.reltuples, c.relpages, n.nspname, c.relname, "
        "pg_relation_size(c.oid) AS heap_bytes, pg_total_relation_size(c.oid) AS total_bytes, "
        "current_setting('block_size')::int AS block_size "
        "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE c.oid = to_regclass($1)",
        quote_ident(table),
    )


async def _types_from_stats(
    conn: asyncpg.Connection, table: asyncpg.Record, total: int
) -> dict[str, int]:
    """Rows per type estimated from ANALYZE's most common values (no scan of a big table)."""
    row = await conn.fetchrow(
        "SELECT most_common_vals::text::text[] AS vals, most_common_freqs AS freqs "
        "FROM pg_stats WHERE schemaname = $1 AND tablename = $2 AND attname = 'event_type'",
        table["nspname"],
        table["relname"],
    )
    if row is None or row["vals"] is None:
        return {}
    pairs = sorted(zip(row["vals"], row["freqs"], strict=True), key=lambda p: -p[1])
    return {value: int(freq * total) for value, freq in pairs[:TOP_TYPES]}
