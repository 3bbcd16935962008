"""Prometheus metrics for `streamd serve`: written by every worker, served by one metrics child.

Workers write counters and histograms through prometheus_client's multiprocess mode (one mmap file
per process under PROMETHEUS_MULTIPROC_DIR, which the supervisor sets before fork); the metrics
child merges them on every scrape of `/metrics` and adds what is cheaper to ask Redis for at scrape
time than to track per batch: lag, pending, stream lengths, plus restarts and readiness from the
supervisor's status file.

    /metrics  Prometheus text, all processes aggregated
    /healthz  200 while the supervisor (this process's parent) is alive
    /readyz   200 when the supervisor reports every worker consuming AND Redis and Postgres answer

The per-batch cost in a worker is a handful of mmap writes; the end-to-end latency histogram is
filled per batch, not per event: the producer times are sorted (they arrive nearly sorted, so this
is linear) and each bucket's count is one bisection.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import os
import platform
import signal
import socket
import threading
import time
from collections import Counter as Tally
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import prometheus_client
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry, Counter, Histogram, values
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from streamd.backends.connections import postgres_connect, redis_client, resolve_cluster
from streamd.backends.faults import describe
from streamd.common.procs import pid_alive
from streamd.config.settings import Settings
from streamd.config.tables import is_pattern
from streamd.errors import BootError
from streamd.observability.latency import cumulative_counts
from streamd.observability.log import get_logger
from streamd.observability.redis_stats import (
    BacklogAges,
    RedisStats,
    configured_streams,
    dead_stream_of,
    read_streams_ages,
    read_streams_stats,
)
from streamd.observability.status_file import read_status
from streamd.pipeline.batch import BatchObserver, BatchReport
from streamd.pipeline.envelope import DEAD_LETTER_REASONS

PROBE_TIMEOUT_S = 2.0  # a probe or scrape must answer quickly even when a service hangs
BATCH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
LATENCY_BUCKETS = (
    *(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5),
    *(1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0),
)


# ---------------------------------------------------------------------------------------------
# worker side


class BulkHistogram(Histogram):
    """A Histogram that takes a whole batch of observations in O(buckets) Python steps."""

    @property
    def upper_bounds(self) -> list[float]:
        return list(self._upper_bounds)

    def observe_cumulative(self, at_most: list[int], total: float) -> None:
        """Observe a batch given, per bucket bound (in order, +Inf last), how many of its values
        are <= that bound, and the sum of its values."""
        self._raise_if_not_observable()  # type: ignore[no-untyped-call]
        if not at_most or at_most[-1] == 0:
            return
        self._sum.inc(total)
        below = 0
        for i, upto in enumerate(at_most):
            if upto > below:
                self._buckets[i].inc(upto - below)
                below = upto


class WorkerMetrics:
    """The metrics one worker process writes, and the batch observer that writes them."""

    def __init__(
        self, registry: CollectorRegistry | None = None, streams: Iterable[str] = ()
    ) -> None:
        # prometheus_client picks its value store when first imported; the supervisor may have
        # imported it before setting PROMETHEUS_MULTIPROC_DIR, so pick again, after fork.
        values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]
        self.ingested = Counter(
            "streamd_events_ingested",
            "Events committed to Postgres, by stream.",
            ["stream"],
            registry=registry,
        )
        self.duplicates = Counter(
            "streamd_events_duplicate",
            "Events skipped because Postgres already had them (a replayed batch), by stream.",
            ["stream"],
            registry=registry,
        )
        self.batches = Counter("streamd_batches", "Batches flushed.", registry=registry)
        self.dead = Counter(
            "streamd_dead_letters",
            "Entries sent to the dead-letter queue, by reason and stream.",
            ["reason", "stream"],
            registry=registry,
        )
        # Every reason at 0 from the start (or from a discovered stream's first batch): rate()
        # and increase() then see the first one.
        self._streams: set[str] = set()
        for stream in streams:
            self._add_stream(stream)
        self.retries = Counter(
            "streamd_write_retries",
            "Transient faults (Postgres or Redis) a batch's write and acknowledgement waited out.",
            registry=registry,
        )
        self.batch_seconds = Histogram(
            "streamd_batch_duration_seconds",
            "One batch from parsing to acknowledgement, including retries.",
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.write_seconds = Histogram(
            "streamd_batch_write_seconds",
            "One batch's Postgres transaction (COPY and COMMIT).",
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.latency = BulkHistogram(
            "streamd_end_to_end_latency_seconds",
            "Producer time (the entry's ts, else its ID) to COMMIT, per event.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self._bounds = self.latency.upper_bounds

    def _add_stream(self, stream: str) -> None:
        self._streams.add(stream)
        self.ingested.labels(stream)
        self.duplicates.labels(stream)
        for reason in DEAD_LETTER_REASONS:
            self.dead.labels(reason, stream)

    def observe(self, report: BatchReport) -> None:
        if report.stream not in self._streams:
            self._add_stream(report.stream)
        if report.inserted:
            self.ingested.labels(report.stream).inc(report.inserted)
        if report.duplicates:
            self.duplicates.labels(report.stream).inc(report.duplicates)
        if report.dead:
            for reason, count in Tally(r.reason for r in report.dead).items():
                self.dead.labels(reason, report.stream).inc(count)
        if not report.leads:  # another stream's share of a batch already counted
            return
        self.batches.inc()
        if report.retries:
            self.retries.inc(report.retries)
        self.batch_seconds.observe(report.total_s)
        self.write_seconds.observe(report.write_s)
        if report.produced_us and report.committed_at:
            self._observe_latency(report.produced_us, report.committed_at)

    def _observe_latency(self, produced_us: list[int], committed_at: float) -> None:
        at_most, total_s = cumulative_counts(produced_us, committed_at, self._bounds)
        self.latency.observe_cumulative(at_most, total_s)


def worker_observer(settings: Settings) -> BatchObserver | None:
    """The observer a worker child passes to WorkerHooks; None when metrics are off."""
    if settings.metrics_port == 0 or not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return None
    named = [name for name in settings.stream_names if not is_pattern(name)]
    return WorkerMetrics(streams=named).observe


# ---------------------------------------------------------------------------------------------
# metrics child: what is read at scrape time


@dataclass(slots=True)
class RedisRead:
    """One scrape's Redis figures: per configured stream, its stats and its backlog's ages."""

    stats: dict[str, RedisStats]
    ages: dict[str, BacklogAges]


class StreamList:
    """The configured streams, resolved again (SCAN) at most every discover_interval_s: a scrape
    every few seconds must not walk a big keyspace every time."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._streams: tuple[str, ...] = ()
        self._resolved_at: float | None = None

    async def get(self, client: aioredis.Redis) -> tuple[str, ...]:
        now = time.monotonic()
        due = (
            self._resolved_at is None
            or now - self._resolved_at >= self.settings.discover_interval_s
        )
        if due:
            self._streams = (await configured_streams(client, self.settings)).streams
            self._resolved_at = now
        return self._streams


async def _read_redis(settings: Settings, streams: StreamList) -> RedisRead:
    settings = resolve_cluster(settings)  # a cluster's dead stream is named by its slot
    client = redis_client(settings)
    try:
        names = await streams.get(client)
        stats = await read_streams_stats(client, settings, names)
        ok = {name: s for name, s in stats.items() if s.error is None}
        return RedisRead(stats, await read_streams_ages(client, settings, ok))
    finally:
        await client.aclose()


async def _postgres_answers(settings: Settings) -> bool:
    conn = await postgres_connect(settings)
    try:
        await conn.fetchval("SELECT 1")
    finally:
        await conn.close(timeout=PROBE_TIMEOUT_S)
    return True


async def _scrape(
    settings: Settings, streams: StreamList
) -> tuple[RedisRead | BaseException, bool | BaseException]:
    """Redis' figures and whether Postgres answers, side by side, each within PROBE_TIMEOUT_S."""
    redis_side, postgres_side = await asyncio.gather(
        asyncio.wait_for(_read_redis(settings, streams), PROBE_TIMEOUT_S),
        asyncio.wait_for(_postgres_answers(settings), PROBE_TIMEOUT_S),
        return_exceptions=True,
    )
    return redis_side, postgres_side


def build_info() -> tuple[str, str]:
    """(streamd's version, Python's), for streamd_build_info."""
    try:
        version = importlib.metadata.version("streamd")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return version, platform.python_version()


class PipelineCollector(Collector):
    """Gauges read on each scrape: Redis backlog figures, whether Postgres answers, and the
    supervisor's status."""

    def __init__(self, settings: Settings, state_file: Path) -> None:
        self.settings = settings
        self.state_file = state_file
        self.version, self.python = build_info()
        self.streams = StreamList(settings)

    def collect(self) -> Iterable[Metric]:
        info = GaugeMetricFamily(
            "streamd_build_info",
            "streamd's version and Python's; always 1.",
            labels=["version", "python"],
        )
        info.add_metric([self.version, self.python], 1.0)
        yield info
        yield from self._status_metrics()
        redis_side, postgres_side = asyncio.run(_scrape(self.settings, self.streams))
        up = GaugeMetricFamily("streamd_postgres_up", "Whether this scrape could run SELECT 1.")
        up.add_metric([], 1.0 if postgres_side is True else 0.0)
        yield up
        if isinstance(redis_side, BaseException):
            get_logger().warning("metrics_redis_failed", error=describe(redis_side))
            yield from self._redis_metrics(None)
        else:
            yield from self._redis_metrics(redis_side)

    def _status_metrics(self) -> Iterator[Metric]:
        status = read_status(self.state_file) or {}
        restarts = CounterMetricFamily(
            "streamd_child_restarts", "Worker processes restarted by the supervisor."
        )
        restarts.add_metric([], float(status.get("restarts") or 0))
        yield restarts
        children = status.get("children") or []
        ready = GaugeMetricFamily("streamd_workers_ready", "Worker processes consuming.")
        ready.add_metric([], float(sum(1 for c in children if c.get("ready"))))
        yield ready
        wanted = GaugeMetricFamily("streamd_workers", "Worker processes configured.")
        wanted.add_metric([], float(status.get("procs") or 0))
        yield wanted

    def _redis_metrics(self, read: RedisRead | None) -> Iterator[Metric]:
        up = GaugeMetricFamily("streamd_redis_up", "Whether this scrape could read Redis.")
        up.add_metric([], 0.0 if read is None else 1.0)
        yield up
        if read is None:
            return
        by_group, by_stream = ["stream", "group"], ["stream"]
        families = {
            name: GaugeMetricFamily(name, doc, labels=labels)
            for name, doc, labels in (
                (
                    "streamd_consumer_lag",
                    "Entries not yet delivered to the group (XINFO).",
                    by_group,
                ),
                (
                    "streamd_pending_entries",
                    "Entries delivered but not yet acknowledged.",
                    by_group,
                ),
                (
                    "streamd_consumer_lag_seconds",
                    "Age of the oldest entry not yet delivered to the group (its ID); 0: none.",
                    by_group,
                ),
                (
                    "streamd_pending_age_seconds",
                    "Age of the oldest entry delivered, not acknowledged (its entry ID); 0: none.",
                    by_group,
                ),
                ("streamd_stream_length", "Entries in the stream (XLEN).", by_stream),
                (
                    "streamd_dead_stream_length",
                    "Entries in the DLQ stream (labelled with the dead stream's name).",
                    by_stream,
                ),
            )
        }
        streams = GaugeMetricFamily(
            "streamd_streams", "Configured streams this scrape read (patterns resolved)."
        )
        streams.add_metric([], float(len(read.stats)))
        yield streams
        group = self.settings.group
        for stream, stats in read.stats.items():
            if stats.error is not None:
                continue  # a key of another type: nothing to say about it
            ages = read.ages.get(stream)
            lag_s = None if ages is None else ages.lag_s
            pending_age_s = None if ages is None else ages.pending_age_s
            figures = (
                ("streamd_consumer_lag", [stream, group], stats.lag),
                ("streamd_pending_entries", [stream, group], stats.pending),
                ("streamd_consumer_lag_seconds", [stream, group], lag_s),
                ("streamd_pending_age_seconds", [stream, group], pending_age_s),
                ("streamd_stream_length", [stream], stats.stream_length),
                (
                    "streamd_dead_stream_length",
                    [dead_stream_of(self.settings, stream)],
                    stats.dlq_length,
                ),
            )
            for name, labels, value in figures:
                if value is not None:  # unknown (no group yet, Redis < 7 for lag): absent, not 0
                    families[name].add_metric(labels, float(value))
        yield from families.values()


# ---------------------------------------------------------------------------------------------
# metrics child: probes


async def _check_services(settings: Settings) -> str | None:
    """None if Redis and Postgres both answer, else what failed."""
    client = redis_client(settings)
    try:
        await client.ping()
    except Exception as exc:
        return f"redis: {describe(exc)}"
    finally:
        await client.aclose()
    try:
        conn = await postgres_connect(settings)
        try:
            await conn.fetchval("SELECT 1")
        finally:
            await conn.close(timeout=PROBE_TIMEOUT_S)
    except Exception as exc:
        return f"postgres: {describe(exc)}"
    return None


def readiness(settings: Settings, state_file: Path) -> str | None:
    """None when ready, else why not (one line)."""
    status = read_status(state_file)
    if status is None:
        return "no status from the supervisor yet"
    if not status.get("ready"):
        return f"workers not all consuming (state {status.get('state', 'unknown')})"
    try:
        return asyncio.run(asyncio.wait_for(_check_services(settings), PROBE_TIMEOUT_S * 2))
    except TimeoutError:
        return "redis/postgres: no answer in time"


# ---------------------------------------------------------------------------------------------
# metrics child: the server


class MetricsServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, settings: Settings, state_file: Path, parent_pid: int) -> None:
        self.settings = settings
        self.state_file = state_file
        self.parent_pid = parent_pid
        self.registry = CollectorRegistry()
        multiproc_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if multiproc_dir:
            MultiProcessCollector(self.registry, path=multiproc_dir)  # type: ignore[no-untyped-call]
        self.registry.register(PipelineCollector(settings, state_file))
        if ":" in settings.metrics_host:  # an IPv6 address such as ::1
            self.address_family = socket.AF_INET6
        super().__init__((settings.metrics_host, settings.metrics_port), _Handler)


_TEXT = "text/plain; charset=utf-8"


class _Handler(BaseHTTPRequestHandler):
    server: MetricsServer
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            body = prometheus_client.generate_latest(self.server.registry)
            self._reply(200, body, prometheus_client.CONTENT_TYPE_LATEST)
        elif path == "/healthz":
            alive = pid_alive(self.server.parent_pid) and os.getppid() == self.server.parent_pid
            self._reply(200 if alive else 503, b"ok\n" if alive else b"supervisor gone\n")
        elif path == "/readyz":
            problem = readiness(self.server.settings, self.server.state_file)
            if problem is None:
                self._reply(200, b"ready\n")
            else:
                self._reply(503, f"not ready: {problem}\n".encode())
        else:
            self._reply(404, b"not found: try /metrics, /healthz or /readyz\n")

    def _reply(self, code: int, body: bytes, content_type: str = _TEXT) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # a scrape every few seconds is not worth a log line


def serve_metrics(settings: Settings, state_file: Path) -> None:
    """Serve /metrics, /healthz and /readyz until SIGTERM or the supervisor's death (blocking)."""
    log = get_logger(role="metrics", pid=os.getpid())
    parent = os.getppid()
    try:
        server = MetricsServer(settings, state_file, parent)
    except OSError as exc:
        address = f"{settings.metrics_host}:{settings.metrics_port}"
        raise BootError(f"metrics: cannot listen on {address}: {describe(exc)}") from None
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda _signum, _frame: stop.set())
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.5}, name="metrics-http"
    )
    thread.start()
    log.info("metrics_listening", host=settings.metrics_host, port=server.server_address[1])
    try:
        while not stop.wait(1.0):
            if os.getppid() != parent:
                break  # the supervisor died: whoever adopted us does not want our answers
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    log.info("metrics_stopped")
