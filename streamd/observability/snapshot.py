"""What `streamd monitor` shows, as plain data: one Snapshot per refresh, a StreamView per
configured stream. The dashboard's renderer (frame.py) and `--json` (Snapshot.to_json) read
nothing else, so both are pure functions of a snapshot."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from streamd.observability.redis_stats import RedisStats


@dataclass(slots=True)
class InsertLatency:
    calls: int
    mean_ms: float
    max_ms: float
    rows_per_call: float
    interval_calls: int | None = None  # since the previous refresh (None: first refresh)
    interval_mean_ms: float | None = None


@dataclass(slots=True)
class PostgresStats:
    """Totals over the configured streams only (`stream = ANY(...)` in each routed table)."""

    total_events: int = 0
    total_estimated: bool = False
    events_last_minute: int | None = None
    last_minute_estimated: bool = False
    events_by_type: dict[str, int] = field(default_factory=dict)
    by_type_estimated: bool = False
    types_total: int = 0  # distinct event types (events_by_type holds the top TOP_TYPES)
    dlq_count: int = 0
    dlq_by_reason: dict[str, int] = field(default_factory=dict)
    table_size_bytes: int = 0  # of the routed tables, whole (a size cannot be scoped)
    tables: list[str] = field(default_factory=list)
    latency_p50_ms: float | None = None  # produced -> ingested, rows of the last minute
    latency_p99_ms: float | None = None
    last_batch_age_s: float | None = None  # since the newest row was ingested
    insert_latency: InsertLatency | None = None
    insert_latency_hint: str | None = None


@dataclass(slots=True)
class StreamView:
    """One configured stream: Redis' figures and its rows in its table."""

    name: str
    table: str
    dead_stream: str
    redis: RedisStats | None = None
    rows: int | None = None
    rows_estimated: bool = False
    last_minute: int | None = None
    dlq_rows: int | None = None
    rate: float | None = None  # entries done per second over the last interval
    last_batch_age_s: float | None = None
    latency_p50_ms: float | None = None
    latency_p99_ms: float | None = None
    redelivered: int | None = None  # oldest pending entries delivered more than once
    table_exists: bool | None = None  # None: Postgres not read
    active_consumers: int | None = None  # consumers that read lately (a dead serve's do not)

    @property
    def missing(self) -> bool:
        """No such key in Redis, and no rows in its table although the table is there: most
        likely a typo in the config. (Before the schema exists nothing has run yet.)"""
        return (
            self.redis is not None
            and not self.redis.exists
            and self.table_exists is True
            and not self.rows
            and not self.dlq_rows
        )

    @property
    def not_started(self) -> bool:
        """No such key in Redis and no table yet: serve has not run with this config."""
        return self.redis is not None and not self.redis.exists and self.table_exists is False

    def to_json(self) -> dict[str, Any]:
        r = self.redis
        return {
            "table": self.table,
            "dead_stream": self.dead_stream,
            "exists": None if r is None or self.table_exists is None else not self.missing,
            "stream_length": r.stream_length if r else None,
            "lag": r.lag if r else None,
            "pending": r.pending if r else None,
            "consumers": r.consumers if r else None,
            "dlq_length": r.dlq_length if r else None,
            "error": r.error if r else None,
            "rows": self.rows,
            "rows_estimated": self.rows_estimated,
            "events_last_minute": self.last_minute,
            "dlq_count": self.dlq_rows,
            "rate": None if self.rate is None else round(self.rate, 1),
            "last_batch_age_s": _round(self.last_batch_age_s),
            "latency_p50_ms": _round(self.latency_p50_ms),
            "latency_p99_ms": _round(self.latency_p99_ms),
            "redelivered": self.redelivered,
            "active_consumers": self.active_consumers,
        }


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
class ServeLatency:
    """Percentiles from serve's own histogram (producer time to COMMIT), as bucket bounds:
    p99_ms = 25.0 means p99 <= 25 ms; inf: above the last bound."""

    p50_ms: float | None
    p99_ms: float | None
    window: str  # "last interval" or "since start"
    write_retries: int = 0  # faults the batches' writes and acks waited out, in the same window

    def to_json(self) -> dict[str, Any]:
        def finite(value: float | None) -> float | None:
            return None if value is None or math.isinf(value) else value

        return {"p50_at_most": finite(self.p50_ms), "p99_at_most": finite(self.p99_ms)} | {
            "window": self.window,
            "write_retries": self.write_retries,
        }


@dataclass(slots=True)
class Snapshot:
    taken_at: float
    stream: str  # the configured names and patterns, comma-separated
    group: str
    redis: RedisStats | None  # summed over the configured streams
    postgres: PostgresStats | None
    ingest_rate: float | None
    ingest_rate_window_s: float | None
    serve: list[ServeStats]
    errors: dict[str, str]
    streams: list[StreamView] = field(default_factory=list)
    streams_left_out: int = 0  # beyond the cap of streams read
    warnings: list[str] = field(default_factory=list)
    serve_latency: ServeLatency | None = None  # None: no serve with metrics on this host

    @property
    def active_consumers(self) -> int | None:
        known = [v.active_consumers for v in self.streams if v.active_consumers is not None]
        return sum(known) if known else None

    @property
    def missing_streams(self) -> list[str]:
        return [view.name for view in self.streams if view.missing]

    def to_json(self) -> dict[str, Any]:
        """The `--json` form: flat keys first, named as in the original pipeline's dashboard
        (totals over the configured streams), then an entry per stream, then the details."""
        r, p = self.redis, self.postgres
        out: dict[str, Any] = {
            "stream": self.stream,
            "group": self.group,
            "stream_length": r.stream_length if r else None,
            "pending": r.pending if r else None,
            "lag": r.lag if r else None,
            "dlq_length": r.dlq_length if r else None,
            "consumers": r.consumers if r else None,
            "active_consumers": self.active_consumers,
            "total_events": p.total_events if p else None,
            "total_events_estimated": p.total_estimated if p else None,
            "events_last_minute": p.events_last_minute if p else None,
            "events_last_minute_estimated": p.last_minute_estimated if p else None,
            "ingest_rate": None if self.ingest_rate is None else round(self.ingest_rate, 1),
            "ingest_rate_window_s": self.ingest_rate_window_s,
            "dlq_count": p.dlq_count if p else None,
            "dlq_by_reason": p.dlq_by_reason if p else None,
            "table_size_bytes": p.table_size_bytes if p else None,
            "tables": p.tables if p else None,
            "events_by_type": p.events_by_type if p else None,
            "events_by_type_estimated": p.by_type_estimated if p else None,
            "event_types": p.types_total if p else None,
            "latency_ms": {"p50": p.latency_p50_ms, "p99": p.latency_p99_ms} if p else None,
            "last_batch_age_s": _round(p.last_batch_age_s) if p else None,
            "serve_latency_ms": self.serve_latency.to_json() if self.serve_latency else None,
            "insert_latency": dataclasses.asdict(p.insert_latency)
            if p and p.insert_latency
            else None,
            "insert_latency_hint": p.insert_latency_hint if p else None,
            "restarts": sum(s.restarts for s in self.serve),
            "streams": {view.name: view.to_json() for view in self.streams},
            "streams_left_out": self.streams_left_out,
            "missing_streams": self.missing_streams,
            "warnings": self.warnings,
            "serve": [dataclasses.asdict(s) for s in self.serve],
            "errors": self.errors,
            "taken_at": self.taken_at,
        }
        return out


def _round(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)
