"""Prometheus metrics: the batch histogram arithmetic, and the real `streamd serve` endpoints
(/metrics aggregated over worker processes, /healthz, /readyz) against real Redis and Postgres."""

from __future__ import annotations

import os
import signal
import socket
import urllib.error
import urllib.request
from collections.abc import Callable

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from streamd.config.settings import Settings
from streamd.dev.servers import PostgresServer
from streamd.observability.metrics import LATENCY_BUCKETS, WorkerMetrics, worker_observer
from streamd.observability.status_file import read_status_files
from streamd.pipeline.batch import BatchReport
from streamd.pipeline.envelope import PG_EPOCH_MS, Rejection
from tests.support.helpers import ServeProcess, event, wait_until, xadd

pytestmark = pytest.mark.timeout(120)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def samples(text: str) -> dict[str, float]:
    """'name{label="v",...}' -> value, for every sample of a Prometheus text page."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


# --- the worker side, in process -----------------------------------------------------------


def report(produced_us: list[int], committed_at: float, dead: list[Rejection]) -> BatchReport:
    return BatchReport(
        consumer="c",
        entries=len(produced_us) + len(dead),
        inserted=len(produced_us),
        duplicates=1,
        dead=dead,
        write_s=0.004,
        total_s=0.006,
        produced_us=produced_us,
        committed_at=committed_at,
        stream="events",
    )


def latency_samples(registry: CollectorRegistry) -> dict[str, float]:
    page = samples(generate_latest(registry).decode())
    return {k: v for k, v in page.items() if "latency" in k and not k.endswith("_created")}


def test_latency_histogram_per_batch_equals_one_observation_per_event() -> None:
    committed_at = 1_800_000_000.0
    committed_us = int(committed_at * 1e6) - PG_EPOCH_MS * 1000
    latencies_ms = [0.4, 1.0, 1.0, 3.2, 7.0, 60.0, 999.0, 2500.0, 400_000.0, -5.0]  # -5: skew
    produced = [committed_us - int(ms * 1000) for ms in latencies_ms]
    bulk = CollectorRegistry()
    metrics = WorkerMetrics(registry=bulk)
    metrics.observe(report(produced, committed_at, [Rejection(b"1-1", [], "invalid_json", "x")]))
    plain = CollectorRegistry()
    reference = Histogram(
        "streamd_end_to_end_latency_seconds", "ref", buckets=LATENCY_BUCKETS, registry=plain
    )
    for ms in latencies_ms:
        reference.observe(max(0.0, ms) / 1000)
    got = latency_samples(bulk)
    want = latency_samples(plain)
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-6), key
    counters = samples(generate_latest(bulk).decode())
    assert counters['streamd_events_ingested_total{stream="events"}'] == 10
    assert counters['streamd_events_duplicate_total{stream="events"}'] == 1
    assert counters["streamd_batches_total"] == 1
    assert counters['streamd_dead_letters_total{reason="invalid_json",stream="events"}'] == 1
    assert counters["streamd_batch_duration_seconds_count"] == 1


def test_no_observer_when_metrics_are_off(settings: Settings) -> None:
    assert settings.metrics_port == 0
    assert worker_observer(settings) is None


# --- the real serve ------------------------------------------------------------------------


def metric_env(env: dict[str, str], port: int, procs: int = 2) -> dict[str, str]:
    return {**env, "STREAMD_METRICS_PORT": str(port), "STREAMD_PROCS": str(procs)}


def test_serve_exposes_metrics_health_and_readiness(
    env: dict[str, str], settings: Settings, start_serve: Callable[..., ServeProcess]
) -> None:
    port = free_port()
    serve = start_serve(environ=metric_env(env, port))
    serve.wait_ready(2)
    wait_until(lambda: get(port, "/readyz")[0] == 200, timeout=30, ignore=(OSError,))
    assert get(port, "/healthz") == (200, "ok\n")

    url = settings.redis_url
    xadd(url, [event("order_placed", {"order_id": i}) for i in range(300)])
    xadd(url, [{"data": "{}"}, event("t", {"x": 1}) | {"data": b"{broken"}])

    def ingested() -> dict[str, float] | None:
        page = samples(get(port, "/metrics")[1])
        return page if page.get('streamd_events_ingested_total{stream="events"}') == 300 else None

    wait_until(ingested, timeout=30)

    def dead_counted() -> dict[str, float] | None:
        page = samples(get(port, "/metrics")[1])
        reasons = ("missing_type", "invalid_json")
        name = "streamd_dead_letters_total"
        counted = all(page.get(f'{name}{{reason="{r}",stream="events"}}') == 1 for r in reasons)
        return page if counted else None

    page = wait_until(dead_counted, timeout=30)
    assert page["streamd_batches_total"] >= 1
    assert page["streamd_batch_duration_seconds_count"] == page["streamd_batches_total"]
    assert page["streamd_batch_write_seconds_count"] == page["streamd_batches_total"]
    assert page["streamd_end_to_end_latency_seconds_count"] >= 300
    assert page['streamd_end_to_end_latency_seconds_bucket{le="+Inf"}'] >= 300
    assert page['streamd_consumer_lag{group="streamd",stream="events"}'] == 0
    assert page['streamd_pending_entries{group="streamd",stream="events"}'] == 0
    assert page['streamd_dead_stream_length{stream="events:dead"}'] == 2
    assert page["streamd_child_restarts_total"] == 0
    assert page["streamd_workers_ready"] == 2
    assert page["streamd_redis_up"] == 1
    assert get(port, "/nope")[0] == 404


def test_counts_survive_a_worker_crash_and_restarts_are_counted(
    env: dict[str, str], settings: Settings, start_serve: Callable[..., ServeProcess]
) -> None:
    port = free_port()
    serve = start_serve(environ=metric_env(env, port))
    serve.wait_ready(2)
    url = settings.redis_url
    xadd(url, [event("t", {"i": i}) for i in range(200)])
    total = 'streamd_events_ingested_total{stream="events"}'
    wait_until(lambda: samples(get(port, "/metrics")[1]).get(total) == 200, timeout=30)

    status = read_status_files(settings.resolved_state_dir())[0]
    os.kill(status["children"][0]["pid"], signal.SIGKILL)
    restarted = "streamd_child_restarts_total"
    wait_until(lambda: samples(get(port, "/metrics")[1]).get(restarted) == 1, timeout=30)
    wait_until(lambda: get(port, "/readyz")[0] == 200, timeout=30)

    xadd(url, [event("t", {"i": i}) for i in range(200, 300)])
    # The dead worker's counts stay in the sum: a counter never goes backwards on a crash.
    wait_until(lambda: samples(get(port, "/metrics")[1]).get(total) == 300, timeout=30)


def test_readyz_fails_when_postgres_is_down_and_healthz_stays_up(
    env: dict[str, str],
    make_postgres: Callable[..., PostgresServer],
    start_serve: Callable[..., ServeProcess],
) -> None:
    pg = make_postgres()
    port = free_port()
    environ = metric_env(env, port, procs=1) | {"STREAMD_POSTGRES_DSN": pg.dsn}
    serve = start_serve(environ=environ)
    serve.wait_ready(1)
    wait_until(lambda: get(port, "/readyz")[0] == 200, timeout=30, ignore=(OSError,))
    pg.kill()
    _, body = wait_until(lambda: (r := get(port, "/readyz"))[0] == 503 and r, timeout=30)
    assert "postgres" in body
    assert get(port, "/healthz")[0] == 200


def test_the_metrics_child_goes_away_with_the_supervisor(
    env: dict[str, str], start_serve: Callable[..., ServeProcess]
) -> None:
    port = free_port()
    serve = start_serve(environ=metric_env(env, port, procs=1))
    serve.wait_ready(1)
    wait_until(lambda: get(port, "/healthz")[0] == 200, timeout=30, ignore=(OSError,))
    os.kill(serve.pid, signal.SIGKILL)

    def port_closed() -> bool:
        try:
            get(port, "/healthz")
        except OSError:
            return True
        return False

    wait_until(port_closed, timeout=30)


def test_metrics_on_ipv6_loopback(
    env: dict[str, str], start_serve: Callable[..., ServeProcess]
) -> None:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
            port = int(s.getsockname()[1])
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    serve = start_serve(environ=metric_env(env, port, procs=1) | {"STREAMD_METRICS_HOST": "::1"})
    serve.wait_ready(1)

    def healthy() -> bool:
        with urllib.request.urlopen(f"http://[::1]:{port}/healthz", timeout=10) as resp:
            return bool(resp.status == 200)

    wait_until(healthy, timeout=30, ignore=(OSError,))
