"""`streamd monitor` and the monitor API against real Redis, Postgres and a real `streamd serve`."""

from __future__ import annotations

import asyncio
import os
import pty
import select
import socket
import subprocess
import sys
import time
from collections.abc import Callable

import asyncpg
import orjson
import pytest

import streamd.observability.monitor
from streamd.config.settings import Settings
from streamd.dev.servers import PostgresServer
from streamd.observability.frame import render
from streamd.observability.monitor import Monitor, Snapshot
from tests.support.helpers import ServeProcess, count_rows, event, pg_execute, wait_until, xadd
from tests.support.streamd_cli import explain, run_streamd

pytestmark = pytest.mark.timeout(120)

JSON_KEYS = {
    "stream_length",
    "pending",
    "dlq_length",
    "total_events",
    "events_last_minute",
    "table_size_bytes",
    "events_by_type",
    "lag",
}


def fill(settings: Settings, serve: ServeProcess) -> None:
    """300 good events of two types and one dead letter, all ingested by serve."""
    serve.wait_ready(1)
    url = settings.redis_url
    xadd(url, [event("order_placed", {"i": i}) for i in range(200)])
    xadd(url, [event("user_created", {"i": i}) for i in range(100)])
    xadd(url, [{"data": "{}"}])  # no type: a dead letter
    dsn = settings.postgres_dsn
    wait_until(lambda: count_rows(dsn, missing_ok=True) == 300, timeout=30)
    wait_until(lambda: count_rows(dsn, settings.dlq_table) == 1, timeout=30)


def test_monitor_once_json_with_serve_running(
    env: dict[str, str], settings: Settings, start_serve: Callable[..., ServeProcess]
) -> None:
    serve = start_serve()
    fill(settings, serve)
    result = run_streamd(env, "monitor", "--once", "--json")
    assert result.returncode == 0, explain(result)
    lines = result.stdout.splitlines()
    assert len(lines) == 1  # exactly one JSON object
    snap = orjson.loads(lines[0])
    assert snap.keys() >= JSON_KEYS
    assert snap["total_events"] == 300
    assert snap["total_events_estimated"] is False
    assert snap["events_by_type"] == {"order_placed": 200, "user_created": 100}
    assert snap["events_last_minute"] == 300
    assert snap["dlq_length"] == 1
    assert snap["dlq_count"] == 1
    assert snap["pending"] == 0
    assert snap["lag"] == 0
    assert snap["stream_length"] <= 301
    assert snap["table_size_bytes"] > 0
    assert snap["ingest_rate"] == pytest.approx(300 / 60, abs=0.1)  # first frame: last minute
    assert snap["errors"] == {}
    (serving,) = snap["serve"]
    assert serving["pid"] == serve.pid
    assert serving["ready"] is True
    assert serving["restarts"] == 0
    roles = {p["role"]: p for p in serving["processes"]}
    assert {"supervisor", "worker 0"} <= roles.keys()
    assert roles["worker 0"]["rss_bytes"] > 1_000_000
    assert roles["worker 0"]["cpu_percent"] is not None


def test_monitor_text_has_the_seed_dashboard(
    env: dict[str, str], settings: Settings, start_serve: Callable[..., ServeProcess]
) -> None:
    serve = start_serve()
    fill(settings, serve)
    result = run_streamd(env, "monitor", "--once")
    assert result.returncode == 0, explain(result)
    out = result.stdout
    for line in (
        "STREAMING PIPELINE DASHBOARD",
        "  Stream Length: ",
        "  Pending Messages: 0",
        "  Group Lag: 0",
        "  DLQ Length: 1",
        "  Total Events: 300",
        "  Events (last minute): 300",
        "  DLQ Count: 1",
        "  Table Size: ",
        "Events by Type:",
        "  order_placed: 200",
        "  user_created: 100",
        f"Serve Processes: (supervisor {serve.pid}, running, ready",
        "supervisor",
        "worker 0",
    ):
        assert line in out, f"{line!r} missing from:\n{out}"
    # The test Postgres does not load pg_stat_statements: one line says how to get it.
    hint = [line for line in out.splitlines() if "Insert Latency" in line]
    assert len(hint) == 1 and "shared_preload_libraries" in hint[0]
    assert "\x1b[" not in out  # not a terminal: no screen control codes


def test_monitor_reports_insert_latency_from_pg_stat_statements(
    env: dict[str, str],
    make_postgres: Callable[..., PostgresServer],
    start_serve: Callable[..., ServeProcess],
) -> None:
    pg = make_postgres(settings={"shared_preload_libraries": "pg_stat_statements"})
    pg_execute(pg.dsn, "CREATE EXTENSION pg_stat_statements")
    environ = {**env, "STREAMD_POSTGRES_DSN": pg.dsn}
    serve = start_serve(environ=environ)
    serve.wait_ready(1)
    xadd(env["STREAMD_REDIS_URL"], [event("t", {"i": i}) for i in range(50)])
    wait_until(lambda: count_rows(pg.dsn, missing_ok=True) == 50, timeout=30)
    result = run_streamd(environ, "monitor", "--once", "--json")
    assert result.returncode == 0, explain(result)
    snap = orjson.loads(result.stdout)
    assert snap["insert_latency_hint"] is None
    latency = snap["insert_latency"]
    assert latency["calls"] >= 1
    assert latency["mean_ms"] > 0
    assert latency["rows_per_call"] > 0


def test_monitor_without_serve_or_schema_still_answers(env: dict[str, str]) -> None:
    result = run_streamd(env, "monitor", "--once", "--json")
    assert result.returncode == 0, explain(result)
    snap = orjson.loads(result.stdout)
    assert snap["total_events"] == 0
    assert snap["stream_length"] == 0
    assert snap["pending"] is None  # no group yet
    assert snap["serve"] == []


def test_monitor_reports_an_unreachable_service_and_fails_once(env: dict[str, str]) -> None:
    down = {**env, "STREAMD_REDIS_URL": "redis://127.0.0.1:1/0", "STREAMD_REDIS_TIMEOUT_S": "1"}
    result = run_streamd(down, "monitor", "--once")
    assert result.returncode == 1, explain(result)
    assert "Redis unavailable: ConnectionError" in result.stdout
    assert "Total Events: 0" in result.stdout  # Postgres is still shown
    assert "Traceback" not in result.stderr


def test_monitor_refreshes_in_place_on_a_terminal(env: dict[str, str]) -> None:
    """On a TTY every frame starts by clearing the screen; it runs until interrupted."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamd", "monitor", "--interval", "0.2"],
        env=env,
        stdin=follower,
        stdout=follower,
        stderr=follower,
    )
    os.close(follower)
    output = b""
    deadline = time.monotonic() + 30
    try:
        while output.count(b"STREAMING PIPELINE DASHBOARD") < 3 and time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 0.5)
            if ready:
                output += os.read(leader, 65536)
        proc.send_signal(2)  # Ctrl-C
        assert proc.wait(15) == 0
    finally:
        proc.kill()
        os.close(leader)
    frames = output.split(b"\x1b[H\x1b[2J")
    assert len(frames) >= 4, output[-2000:]
    assert all(b"STREAMING PIPELINE DASHBOARD" in frame for frame in frames[1:])


async def test_monitor_api_estimates_on_big_tables(
    settings: Settings, start_serve: Callable[..., ServeProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    serve = start_serve()
    await asyncio.to_thread(fill, settings, serve)
    pg_execute(settings.postgres_dsn, "ANALYZE events")
    async with Monitor(settings) as m:
        assert await m.stream_length() >= 0
        assert await m.pending() == 0
        assert await m.lag() == 0
        assert await m.dlq_length() == 1
        exact = await m.postgres_stats()
        assert (exact.total_events, exact.total_estimated) == (300, False)
        monkeypatch.setattr(
            streamd.observability.monitor, "EXACT_MAX_BYTES", 0
        )  # every table is "big" now
        estimated = await m.get_postgres_stats()
    assert estimated.total_estimated and estimated.by_type_estimated
    assert estimated.total_events == pytest.approx(300, rel=0.2)
    assert estimated.events_by_type.keys() == {"order_placed", "user_created"}
    assert estimated.events_by_type["order_placed"] == pytest.approx(200, rel=0.2)


def test_last_minute_from_insert_counters_once_a_minute_was_watched(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a big table the dashboard stops counting the last minute's rows once it has its own
    n_tup_ins samples a minute apart."""
    clock = [1000.0]
    monkeypatch.setattr(streamd.observability.monitor.time, "monotonic", lambda: clock[0])
    m = Monitor(settings)
    seen = []
    for inserted in range(0, 100_000, 5_000):  # 5,000 rows every 5 s: 1,000 rows/s
        seen.append(m._inserted_last_minute(inserted))
        clock[0] += 5
    assert seen[:12] == [None] * 12  # less than a minute watched
    assert seen[12:] == [60_000] * 8


def test_monitor_reads_serves_latency_histogram(
    env: dict[str, str], settings: Settings, start_serve: Callable[..., ServeProcess]
) -> None:
    """With metrics on, the end-to-end latency the workers measured (to COMMIT) is read from the
    serve's own histogram files: since it started on the first frame, then per interval."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    environ = {**env, "STREAMD_METRICS_PORT": str(port)}
    serve = start_serve(environ=environ)
    serve.wait_ready(1)
    url, dsn = settings.redis_url, settings.postgres_dsn
    xadd(url, [event("t", {"i": i}) for i in range(200)])
    wait_until(lambda: count_rows(dsn, missing_ok=True) == 200, timeout=30)

    async def frames() -> tuple[Snapshot, Snapshot, Snapshot]:
        async with Monitor(settings) as m:
            first, idle = await m.snapshot(), await m.snapshot()
            await asyncio.to_thread(xadd, url, [event("t", {"i": i}) for i in range(50)])
            await asyncio.to_thread(wait_until, lambda: count_rows(dsn) == 250, 30)
            return first, idle, await m.snapshot()

    first, idle, busy = asyncio.run(frames())
    assert first.serve_latency is not None and first.serve_latency.window == "since start"
    assert first.serve_latency.p50_ms is not None and first.serve_latency.p50_ms > 0
    assert first.serve_latency.p99_ms >= first.serve_latency.p50_ms  # type: ignore[operator]
    assert idle.serve_latency is not None and idle.serve_latency.window == "last interval"
    assert idle.serve_latency.p50_ms is None  # nothing committed between those two frames
    assert busy.serve_latency is not None and busy.serve_latency.p50_ms is not None
    assert "Latency (produced -> commit, serve's histogram, last interval): p50 <= " in render(busy)
    result = run_streamd(environ, "monitor", "--once", "--json")
    assert orjson.loads(result.stdout)["serve_latency_ms"]["window"] == "since start"


def test_monitor_counts_the_write_retries_serve_waited_out(
    env: dict[str, str], settings: Settings, start_serve: Callable[..., ServeProcess]
) -> None:
    """A table lock longer than the statement timeout makes serve's writes time out and retry;
    the monitor reads the retries from serve's own metrics files, per interval."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    environ = {**env, "STREAMD_METRICS_PORT": str(port), "STREAMD_POSTGRES_TIMEOUT_S": "0.5"}
    serve = start_serve(environ=environ)
    serve.wait_ready(1)
    url, dsn = settings.redis_url, settings.postgres_dsn
    xadd(url, [event("t", {"i": i}) for i in range(100)])
    wait_until(lambda: count_rows(dsn, missing_ok=True) == 100, timeout=30)

    async def frames() -> tuple[Snapshot, Snapshot]:
        async with Monitor(settings) as m:
            calm = await m.snapshot()
            locker = await asyncpg.connect(dsn)
            try:
                async with locker.transaction():
                    await locker.execute(f'LOCK TABLE "{settings.events_table}"')
                    await asyncio.to_thread(xadd, url, [event("t", {"i": i}) for i in range(50)])
                    await asyncio.to_thread(wait_until, lambda: serve.events("write_retrying"), 30)
            finally:
                await locker.close()
            await asyncio.to_thread(wait_until, lambda: count_rows(dsn) == 150, 30)
            return calm, await m.snapshot()

    calm, retried = asyncio.run(frames())
    assert calm.serve_latency is not None and calm.serve_latency.write_retries == 0
    assert retried.serve_latency is not None and retried.serve_latency.window == "last interval"
    assert retried.serve_latency.write_retries >= 1
    retries = retried.serve_latency.write_retries
    shown = f"Write retries (faults a batch waited out, last interval): {retries}"
    assert shown in render(retried)
    result = run_streamd(environ, "monitor", "--once", "--json")
    assert orjson.loads(result.stdout)["serve_latency_ms"]["write_retries"] >= 1
