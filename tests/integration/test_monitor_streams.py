"""`streamd monitor` over several streams against real Redis and Postgres: a line and a JSON entry
per configured stream (names and patterns), totals scoped to those streams in each routed table,
a warning and exit 1 for a stream that does not exist, and the real frame in a 100x30 tmux pane.

The rows are written here directly (not by serve), so the figures are known exactly."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator

import orjson
import pytest
import redis

import streamd.observability.redis_stats
from streamd.config.sources import load_settings
from streamd.observability.frame import render
from streamd.observability.monitor import Monitor, Snapshot
from tests.support.helpers import (
    ServeProcess,
    count_rows,
    event,
    pg_execute,
    wait_until,
    xadd,
)
from tests.support.helpers import redis_client as sync_redis
from tests.support.streamd_cli import explain, run_streamd

pytestmark = pytest.mark.timeout(120)

# orders -> orders_events; tenant:* -> events (the default table), where `other`, a stream this
# config does not name, also has rows and dead letters that must not be counted.
ROWS = {
    "orders": ("orders_events", "order_placed", 3),
    "tenant:a": ("events", "signup", 2),
    "tenant:b": ("events", "signup", 2),
    "other": ("events", "not_ours", 4),
}


@pytest.fixture
def pipeline(env: dict[str, str]) -> dict[str, str]:
    """Streams, a group on each, rows in two tables and dead letters; returns the monitor's env."""
    for table in ("events", "orders_events"):
        result = run_streamd(env, "--set", f"events_table={table}", "db", "init")
        assert result.returncode == 0, explain(result)
    url, dsn = env["STREAMD_REDIS_URL"], env["STREAMD_POSTGRES_DSN"]
    with sync_redis(url) as r:
        for stream, (table, event_type, n) in ROWS.items():
            ids = xadd(url, [event(event_type, {"i": i}) for i in range(n)], stream=stream)
            r.xgroup_create(stream, "streamd", id="0")
            r.xreadgroup("streamd", "c1", {stream: ">"})
            r.xack(stream, "streamd", *(ids[:-1] if stream == "tenant:b" else ids))  # 1 pending
            for entry_id in ids:
                pg_execute(
                    dsn,
                    f"INSERT INTO {table} (stream, entry_id, entry_ms, entry_seq, event_type,"
                    " payload, produced_at) VALUES ($1, $2, split_part($2, '-', 1)::bigint,"
                    " split_part($2, '-', 2)::bigint, $3, '{}', now() - interval '20 ms')",
                    stream,
                    entry_id,
                    event_type,
                )
        xadd(url, [{"data": "{}"}], stream="orders:dead")
    for stream, reason in (("orders", "missing_type"), ("other", "invalid_json"), ("other", "x")):
        pg_execute(
            dsn,
            "INSERT INTO dead_letter_queue (stream, entry_id, fields, reason, error) "
            "VALUES ($1, $2, '{}', $3, 'bad')",
            stream,
            f"{time.time_ns()}-0",
            reason,
        )
    r_list = sync_redis(url)
    r_list.rpush("tenant:list", "not a stream")  # matches the pattern: skipped
    r_list.close()
    return {**env, "STREAMD_STREAMS": "orders,tenant:*", "STREAMD_TABLES": "orders=orders_events"}


def test_json_has_an_entry_per_stream_and_scoped_totals(pipeline: dict[str, str]) -> None:
    result = run_streamd(pipeline, "monitor", "--once", "--json")
    assert result.returncode == 0, explain(result)
    snap = orjson.loads(result.stdout)
    streams = snap["streams"]
    assert list(streams) == ["orders", "tenant:a", "tenant:b"]
    assert streams["orders"]["table"] == "orders_events"
    assert streams["tenant:a"]["table"] == "events"
    assert {name: s["rows"] for name, s in streams.items()} == {
        "orders": 3,
        "tenant:a": 2,
        "tenant:b": 2,
    }
    assert {name: s["stream_length"] for name, s in streams.items()} == {
        "orders": 3,
        "tenant:a": 2,
        "tenant:b": 2,
    }
    assert streams["tenant:b"]["pending"] == 1
    assert streams["orders"]["dlq_count"] == 1
    assert streams["orders"]["dlq_length"] == 1
    assert streams["orders"]["exists"] is True
    assert streams["orders"]["latency_p50_ms"] >= 0
    # The flat keys of a single-stream monitor: totals over the configured streams only.
    assert snap["total_events"] == 7  # not `other`'s 4
    assert snap["events_by_type"] == {"signup": 4, "order_placed": 3}
    assert snap["dlq_count"] == 1
    assert snap["dlq_by_reason"] == {"missing_type": 1}
    assert snap["stream_length"] == 7
    assert snap["pending"] == 1
    assert snap["lag"] == 0
    assert snap["events_last_minute"] == 7
    assert snap["missing_streams"] == [] and snap["warnings"] == []
    assert sorted(snap["tables"]) == ["events", "orders_events"]


def test_text_has_a_line_per_stream(pipeline: dict[str, str]) -> None:
    result = run_streamd(pipeline, "monitor", "--once")
    assert result.returncode == 0, explain(result)
    lines = result.stdout.splitlines()
    assert len(lines) <= 30 and max(map(len, lines)) <= 100, result.stdout
    rows = {line.split()[0]: line.split() for line in lines if line.startswith("  ")}
    assert rows["orders"][1:5] == ["orders_events", "3", "0", "0"]  # table, length, lag, pending
    assert rows["tenant:b"][1:5] == ["events", "2", "0", "1"]
    assert "other" not in rows
    assert "  Total Events: 7" in result.stdout
    assert "DLQ Count: 1  by reason: missing_type 1" in result.stdout
    assert "\x1b[" not in result.stdout


def test_a_stream_that_does_not_exist_is_a_warning_and_exit_1(pipeline: dict[str, str]) -> None:
    typo = {k: v for k, v in pipeline.items() if k not in ("STREAMD_STREAMS", "STREAMD_TABLES")}
    result = run_streamd(typo, "--set", "stream=ordrs", "monitor", "--once")
    assert result.returncode == 1, explain(result)
    assert "Warning: stream ordrs does not exist" in result.stdout
    assert "  Total Events: 0" in result.stdout  # not another stream's totals
    assert "DLQ Count: 0" in result.stdout
    as_json = run_streamd(typo, "--set", "stream=ordrs", "monitor", "--once", "--json")
    assert as_json.returncode == 1, explain(as_json)
    snap = orjson.loads(as_json.stdout)
    assert snap["missing_streams"] == ["ordrs"]
    assert snap["total_events"] == 0 and snap["events_by_type"] == {}


def test_a_pattern_that_matches_nothing_is_only_a_warning(pipeline: dict[str, str]) -> None:
    env = {**pipeline, "STREAMD_STREAMS": "orders,nobody:*"}
    result = run_streamd(env, "monitor", "--once")
    assert result.returncode == 0, explain(result)
    assert "Warning: pattern 'nobody:*' matches no stream" in result.stdout
    assert "  Total Events: 3" in result.stdout


@pytest.fixture
def tmux() -> Iterator[str]:
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed")
    name = f"streamd-monitor-{time.monotonic_ns()}"
    yield name
    subprocess.run(["tmux", "kill-session", "-t", name], check=False, capture_output=True)


def test_the_frame_fits_a_100x30_terminal_with_colour(pipeline: dict[str, str], tmux: str) -> None:
    """Through tmux capture-pane: what a 100x30 terminal really shows, refreshed in place."""
    env = {**pipeline, "TERM": "xterm-256color"}
    env.pop("NO_COLOR", None)
    command = "python -m streamd monitor --interval 0.5"
    subprocess.run(
        ["tmux", "new-session", "-d", "-s", tmux, "-x", "100", "-y", "30", command],
        env=env,
        check=True,
    )

    def pane(*flags: str) -> str:
        out = subprocess.run(
            ["tmux", "capture-pane", "-p", *flags, "-t", tmux],
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout

    def framed() -> str | None:
        text = pane()
        return text if "tenant:b" in text and "Serve Processes" in text else None

    text = wait_until(framed, timeout=60)
    assert text is not None
    lines = text.rstrip("\n").split("\n")
    assert len(lines) <= 30 and lines[0].startswith("=====")
    assert sum(1 for line in lines if "STREAMING PIPELINE DASHBOARD" in line) == 1  # in place
    assert any(line.split()[:1] == ["orders"] for line in lines)
    coloured = pane("-e")
    assert "\x1b[31m" in coloured  # orders has a dead letter: red


def test_rate_over_the_interval_and_active_consumers(
    pipeline: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The API: a stream's rate is its entries done between two snapshots; a consumer that has
    not read for ACTIVE_CONSUMER_MS (a dead serve's) is listed but not active."""
    monkeypatch.setattr(streamd.observability.redis_stats, "ACTIVE_CONSUMER_MS", 500)
    settings = load_settings(environ=pipeline)[0]
    url = settings.redis_url
    with sync_redis(url) as r:
        r.xgroup_createconsumer("orders", "streamd", "ghost")
        wait_until(lambda: idle_ms(r, "orders", "ghost") > 600, timeout=30)

    async def two_snapshots() -> tuple[Snapshot, Snapshot]:
        async with Monitor(settings) as m:
            first = await m.snapshot()
            with sync_redis(url) as r:
                ids = xadd(url, [event("order_placed", {"i": i}) for i in range(10)], "orders")
                r.xreadgroup("streamd", "c1", {"orders": ">"})
                r.xack("orders", "streamd", *ids)
            return first, await m.snapshot()

    first, second = asyncio.run(two_snapshots())
    assert first.ingest_rate_window_s == 60.0  # the first one: the last minute's average
    rates = {v.name: v.rate for v in second.streams}
    assert rates["orders"] is not None and rates["orders"] > 0
    assert rates["tenant:a"] == 0.0
    assert second.ingest_rate_window_s is not None and second.ingest_rate_window_s < 60
    assert second.ingest_rate == pytest.approx(rates["orders"])
    orders = next(v for v in second.streams if v.name == "orders")
    assert (orders.redis.consumers, orders.active_consumers) == (2, 1)  # type: ignore[union-attr]
    # The other streams' consumers read last in the fixture, long enough ago too.
    assert "Consumers: 4 (1 active)" in render(second)


def idle_ms(r: redis.Redis, stream: str, consumer: str) -> int:
    found = [c for c in r.xinfo_consumers(stream, "streamd") if c["name"] == consumer.encode()]
    return int(found[0]["idle"]) if found else 0


def test_at_most_1000_streams_are_read_and_the_rest_are_counted(env: dict[str, str]) -> None:
    with sync_redis(env["STREAMD_REDIS_URL"]) as r, r.pipeline(transaction=False) as pipe:
        for i in range(1005):
            pipe.xadd(f"t:{i:04d}", {"type": "x", "data": "{}"})
        pipe.execute()
    result = run_streamd({**env, "STREAMD_STREAMS": "t:*"}, "monitor", "--once", "--json")
    assert result.returncode == 0, explain(result)
    snap = orjson.loads(result.stdout)
    assert len(snap["streams"]) == 1000
    assert snap["streams_left_out"] == 5
    assert snap["stream_length"] == 1000
    assert "5 more streams match: only 1000 are read" in snap["warnings"]
    text = run_streamd({**env, "STREAMD_STREAMS": "t:*"}, "monitor", "--once")
    lines = text.stdout.splitlines()
    assert len(lines) <= 30 and max(map(len, lines)) <= 100, text.stdout
    assert "  ... and " in text.stdout and " more streams (--json lists every one)" in text.stdout


def test_monitor_once_against_one_serve_of_several_streams(
    env: dict[str, str], start_serve: Callable[..., ServeProcess]
) -> None:
    """The real multi-stream serve: one serve consumes a name and a pattern into two tables; the
    monitor has a line and a JSON entry per stream, totals over them, the serve listed."""
    environ = {
        **env,
        "STREAMD_STREAMS": "orders,tenant:*",
        "STREAMD_TABLES": "orders=orders_events",
        "STREAMD_DISCOVER_INTERVAL_S": "0.5",
    }
    url, dsn = env["STREAMD_REDIS_URL"], env["STREAMD_POSTGRES_DSN"]
    xadd(url, [event("order_placed", {"i": i}) for i in range(30)], stream="orders")
    xadd(url, [event("signup", {"i": i}) for i in range(20)], stream="tenant:a")
    serve = start_serve(environ=environ)
    serve.wait_ready(1)
    xadd(url, [event("signup", {"i": i}) for i in range(10)], stream="tenant:b")  # found later
    xadd(url, [{"data": "{}"}], stream="tenant:b")  # a dead letter
    wait_until(lambda: count_rows(dsn, "orders_events", missing_ok=True) == 30, timeout=60)
    wait_until(lambda: count_rows(dsn, "events", missing_ok=True) == 30, timeout=60)
    wait_until(lambda: count_rows(dsn, "dead_letter_queue", missing_ok=True) == 1, timeout=60)

    result = run_streamd(environ, "monitor", "--once", "--json")
    assert result.returncode == 0, explain(result)
    snap = orjson.loads(result.stdout)
    streams = snap["streams"]
    assert list(streams) == ["orders", "tenant:a", "tenant:b"]
    assert {n: (s["rows"], s["table"]) for n, s in streams.items()} == {
        "orders": (30, "orders_events"),
        "tenant:a": (20, "events"),
        "tenant:b": (10, "events"),
    }
    assert all(s["pending"] == 0 and s["lag"] == 0 for s in streams.values()), streams
    assert streams["tenant:b"]["dlq_count"] == 1 and streams["tenant:b"]["dlq_length"] == 1
    assert snap["total_events"] == 60 and snap["dlq_by_reason"] == {"missing_type": 1}
    assert snap["active_consumers"] >= 1
    (serving,) = snap["serve"]
    assert serving["pid"] == serve.pid and serving["ready"] is True

    text = run_streamd(environ, "monitor", "--once")
    assert text.returncode == 0, explain(text)
    rows = {line.split()[0]: line.split() for line in text.stdout.splitlines() if line[:2] == "  "}
    # STREAM TABLE LENGTH LAG PENDING RATE/s DLQ ROWS ... (serve trims what it has done)
    assert rows["orders"][1] == "orders_events" and rows["orders"][3:5] == ["0", "0"]
    assert rows["orders"][7] == "30"
    assert (rows["tenant:b"][1], rows["tenant:b"][6], rows["tenant:b"][7]) == ("events", "1", "10")
    assert f"Serve Processes: (supervisor {serve.pid}, running, ready" in text.stdout


def test_a_named_key_of_another_type_is_a_warning_and_exit_1(env: dict[str, str]) -> None:
    with sync_redis(env["STREAMD_REDIS_URL"]) as r:
        r.rpush("jobs", "not a stream")
        xadd(env["STREAMD_REDIS_URL"], [event("t", {})], stream="orders")
    result = run_streamd({**env, "STREAMD_STREAMS": "orders,jobs"}, "monitor", "--once")
    assert result.returncode == 1, explain(result)
    assert "Warning: stream jobs: WRONGTYPE" in result.stdout
    assert any(line.split()[:1] == ["orders"] for line in result.stdout.splitlines())
