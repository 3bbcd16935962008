"""The dashboard's frame is a pure function of a snapshot: it fits 100x30 whatever the number of
streams and event types, has a line per stream, and colours only when asked to."""

from __future__ import annotations

import math

from streamd.observability.frame import render
from streamd.observability.redis_stats import RedisStats
from streamd.observability.serve_latency import difference, quantile_ms
from streamd.observability.snapshot import (
    PostgresStats,
    ProcessStats,
    ServeLatency,
    ServeStats,
    Snapshot,
    StreamView,
)


def view(
    name: str, *, lag: int = 0, dlq: int = 0, exists: bool = True, rows: int = 10
) -> StreamView:
    redis = RedisStats(stream_length=rows + lag, pending=0, lag=lag, consumers=1, exists=exists)
    return StreamView(
        name,
        "events",
        f"{name}:dead",
        redis=redis,
        rows=rows,
        last_minute=rows,
        dlq_rows=dlq,
        rate=1.5,
        last_batch_age_s=0.4,
        latency_p50_ms=3.0,
        latency_p99_ms=12.5,
        redelivered=0,
        table_exists=True,
    )


def snapshot(streams: list[StreamView], types: int, serves: int = 1, workers: int = 2) -> Snapshot:
    by_type = {f"type_{i:02d}": 1000 - i for i in range(types)}
    postgres = PostgresStats(
        total_events=sum(v.rows or 0 for v in streams),
        events_last_minute=30,
        events_by_type=dict(list(by_type.items())[:20]),
        types_total=types,
        dlq_count=sum(v.dlq_rows or 0 for v in streams),
        dlq_by_reason={"missing_type": 2, "invalid_json": 1},
        table_size_bytes=1 << 20,
        tables=["events"],
        latency_p50_ms=3.0,
        latency_p99_ms=12.5,
        last_batch_age_s=0.4,
        insert_latency_hint="insert latency: pg_stat_statements is not loaded (add it to "
        "shared_preload_libraries, then CREATE EXTENSION pg_stat_statements)",
    )
    processes = [ProcessStats(100, "supervisor", 0.5, 40 << 20)]
    processes += [ProcessStats(101 + i, f"worker {i}", 12.0, 80 << 20) for i in range(workers)]
    serve = [ServeStats(100 + s, "running", True, 0, 62.0, processes) for s in range(serves)]
    return Snapshot(
        taken_at=1_800_000_000.0,
        stream=",".join(v.name for v in streams),
        group="streamd",
        redis=RedisStats(stream_length=100, pending=0, lag=0, dlq_length=3, consumers=2),
        postgres=postgres,
        ingest_rate=4.5,
        ingest_rate_window_s=5.0,
        serve=serve,
        errors={},
        streams=streams,
    )


def fits(frame: str, width: int = 100, height: int = 30) -> None:
    lines = frame.split("\n")
    assert len(lines) <= height, frame
    too_wide = [line for line in lines if len(line) > width]
    assert not too_wide, too_wide


def test_25_types_fit_in_30_rows_at_width_100() -> None:
    frame = render(snapshot([view("orders"), view("clicks")], types=25))
    fits(frame)
    assert "Events by Type: (top " in frame and " of 25)" in frame
    assert "more types" in frame
    assert "  type_00: 1000" in frame


def test_a_line_per_stream_with_its_figures() -> None:
    streams = [view("orders", lag=7), view("clicks", dlq=2), view("tenant:a")]
    frame = render(snapshot(streams, types=3))
    fits(frame)
    rows = {line.split()[0]: line for line in frame.splitlines() if line.startswith("  ")}
    assert {"orders", "clicks", "tenant:a"} <= rows.keys()
    assert rows["orders"].split()[1:4] == ["17", "7", "0"]  # length, lag, pending
    assert "STREAM" in rows and "LAG" in rows["STREAM"]
    assert "p50 3.0 ms  p99 12.5 ms" in frame
    assert "by reason: missing_type 2, invalid_json 1" in frame
    assert "Last Batch: 0.4s ago" in frame
    assert "Ingest Rate: 4.5 events/sec (last 5s)" in frame


def test_many_streams_types_and_workers_still_fit() -> None:
    streams = [view(f"tenant:{i:03d}", lag=i) for i in range(60)]
    frame = render(snapshot(streams, types=40, serves=2, workers=10))
    fits(frame)
    assert "more streams (--json lists every one)" in frame
    assert "tenant:059" in frame  # the biggest backlog first
    assert "Serve Processes: (supervisor 100, running, ready" in frame


def test_no_colour_codes_unless_asked() -> None:
    snap = snapshot([view("orders", dlq=3, lag=500_000), view("gone", exists=False, rows=0)], 3)
    snap.warnings.append("stream gone does not exist: no such key in Redis")
    plain = render(snap)
    assert "\x1b" not in plain
    assert "Warning: stream gone does not exist" in plain
    coloured = render(snap, color=True)
    assert "\x1b[31m" in coloured  # dead letters, a big backlog and the warning: red
    fits(
        "\n".join(
            line.replace("\x1b[31m", "").replace("\x1b[0m", "") for line in coloured.split("\n")
        )
    )


def test_a_small_terminal_keeps_the_frame_inside_it() -> None:
    frame = render(snapshot([view(f"s{i}") for i in range(10)], types=10), width=60, height=12)
    fits(frame, 60, 12)
    assert frame.splitlines()[-1] == "=" * 60


def test_serve_latency_percentiles_are_bucket_bounds() -> None:
    before = {0.005: 10.0, 0.025: 10.0, 0.1: 10.0, math.inf: 10.0}
    now = {0.005: 60.0, 0.025: 108.0, 0.1: 110.0, math.inf: 111.0}
    interval = difference(now, before)  # 101 events: 50 <= 5 ms, 48 <= 25 ms, 2 <= 100, 1 more
    assert quantile_ms(interval, 0.5) == 25.0
    assert quantile_ms(interval, 0.99) == 100.0
    assert quantile_ms(interval, 1.0) == math.inf
    assert quantile_ms(difference(before, before), 0.5) is None
    snap = snapshot([view("orders")], types=1)
    snap.serve_latency = ServeLatency(25.0, math.inf, "last interval", write_retries=4)
    frame = render(snap)
    fits(frame)
    assert "serve's histogram, last interval): p50 <= 25 ms  p99 > 300 s" in frame
    assert "Write retries (faults a batch waited out, last interval): 4" in frame
    assert snap.to_json()["serve_latency_ms"] == {
        "p50_at_most": 25.0,
        "p99_at_most": None,
        "window": "last interval",
        "write_retries": 4,
    }
