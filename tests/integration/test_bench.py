"""`streamd bench` against real Redis, Postgres and real `streamd serve` processes: the seed's
report, the JSON contract, drain mode with its own serve, and a verifier that really catches lost
and duplicated events. Speed is printed by bench, never asserted here."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import orjson
import pytest

from streamd.backends.connections import postgres_connect
from streamd.client.producer import Producer
from streamd.config.settings import Settings
from streamd.observability.status_file import read_status_files
from streamd.tools.bench import RunRows
from streamd.tools.samples import SampleEvents
from tests.support.helpers import (
    ServeProcess,
    count_rows,
    pg_execute,
    pg_fetch,
    wait_until,
    xlen,
)
from tests.support.streamd_cli import explain, run_streamd

pytestmark = pytest.mark.timeout(180)

JSON_KEYS = {"produced", "persisted", "lost", "duplicated", "actual_rate", "accuracy"}


def test_bench_json_against_a_running_serve(
    env: dict[str, str], start_serve: Callable[..., ServeProcess]
) -> None:
    start_serve().wait_ready(1)
    result = run_streamd(env, "bench", "--rate", "1000", "--duration", "3", "--json", timeout=120)
    assert result.returncode == 0, explain(result)
    report = orjson.loads(result.stdout)  # stdout is exactly one JSON object
    assert report.keys() >= JSON_KEYS | {"latency_ms"}
    assert report["produced"] == report["persisted"] == 3000
    assert report["lost"] == report["duplicated"] == report["dead_lettered"] == 0
    assert report["exactly_once"] is True
    assert report["elapsed_s"] >= 2.95  # event i is due at (i + 1) / rate: never early
    assert report["actual_rate"] == pytest.approx(3000 / report["elapsed_s"], rel=1e-3)
    assert report["accuracy"] == pytest.approx(report["actual_rate"] / 10, rel=1e-3)
    latency = report["latency_ms"]
    assert latency.keys() == {"p50", "p95", "p99", "max"}
    assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"] <= latency["max"]
    assert report["consumer_throughput"] > 0
    assert report["peak_lag"] is not None
    assert "Produced 1000 events..." in result.stderr  # progress goes to stderr with --json


def test_bench_text_has_the_seed_report(
    env: dict[str, str], start_serve: Callable[..., ServeProcess]
) -> None:
    start_serve().wait_ready(1)
    result = run_streamd(env, "bench", "--rate", "500", "--duration", "2", timeout=120)
    assert result.returncode == 0, explain(result)
    out = result.stdout
    for line in (
        "STREAMING BENCHMARK",
        "Target Rate: 500 events/sec",
        "Duration: 2 seconds",
        "Expected Total: 1000 events",
        "Writes to: stream events, table events (the running serve's)",
        "Produced 1000 events...",
        "Completed: 1000 total events produced",
        "BENCHMARK RESULTS",
        "Total Events: 1000",
        "Elapsed Time: ",
        "Actual Rate: ",
        "Accuracy: ",
        "Persisted: 1000",
        "Lost: 0",
        "Duplicated: 0",
        "Exactly once: yes",
        "Consumer Throughput: ",
        "Peak Lag: ",
        "p50: ",
        "p99: ",
    ):
        assert line in out, f"{line!r} missing from:\n{out}"


def test_bench_drain_with_its_own_serve(env: dict[str, str], settings: Settings) -> None:
    result = run_streamd(
        env, "bench", "--drain", "5000", "--serve", "--procs", "2", "--json", timeout=150
    )
    assert result.returncode == 0, explain(result)
    report = orjson.loads(result.stdout)
    assert report["mode"] == "drain"
    assert report["produced"] == report["persisted"] == 5000
    assert report["lost"] == report["duplicated"] == 0
    assert report["drain_s"] > 0
    assert report["consumer_throughput"] > 0
    assert report["peak_lag"] == pytest.approx(5000, abs=1000)  # it was all waiting at the start
    assert "Starting streamd serve --procs 2" in result.stderr
    # Its serve is gone again: no supervisor left behind.
    wait_until(lambda: read_status_files(settings.resolved_state_dir()) == [], timeout=30)
    # A stream and table of its own, said up front: production's are untouched.
    assert (report["stream"], report["table"]) == ("bench_events", "bench_events")
    assert "Writes to: stream bench_events, table bench_events (its own serve's)" in result.stderr
    assert count_rows(settings.postgres_dsn, "bench_events") == 5000
    assert count_rows(settings.postgres_dsn, "events", missing_ok=True) == 0
    assert xlen(settings.redis_url, "events") == 0


def test_bench_table_of_ones_choice_and_only_with_its_own_serve(
    env: dict[str, str], settings: Settings
) -> None:
    result = run_streamd(
        env, "bench", "--drain", "300", "--serve", "--table", "bench_b", "--json", timeout=150
    )
    assert result.returncode == 0, explain(result)
    assert count_rows(settings.postgres_dsn, "bench_b") == 300
    alone = run_streamd(env, "bench", "--drain", "300", "--table", "bench_b")
    assert alone.returncode == 2, explain(alone)
    assert "--table needs --serve" in alone.stderr


def test_bench_without_a_serve_reports_the_loss(env: dict[str, str]) -> None:
    result = run_streamd(
        env, "bench", "--rate", "200", "--duration", "1", "--wait", "1", "--json", timeout=60
    )
    assert result.returncode == 1, explain(result)
    report = orjson.loads(result.stdout)
    assert (report["produced"], report["persisted"], report["lost"]) == (200, 0, 200)
    assert report["exactly_once"] is False
    assert "is streamd serve running?" in result.stderr


def test_bench_usage(env: dict[str, str]) -> None:
    for args in (["--rate", "10"], ["--drain", "10", "--rate", "5"], []):
        result = run_streamd(env, "bench", *args)
        assert result.returncode == 2, explain(result)


async def test_the_verifier_catches_lost_and_duplicated_events(
    settings: Settings, start_serve: Callable[..., ServeProcess]
) -> None:
    serve = start_serve()
    await asyncio.to_thread(serve.wait_ready, 1)
    samples = SampleEvents(seed=1)
    async with Producer.from_settings(settings) as p:
        ids = await p.produce_batch(samples.tagged_batch(100, "feedc0ffee", 0))
    dsn = settings.postgres_dsn
    await asyncio.to_thread(wait_until, lambda: count_rows(dsn) == 100, 30)
    conn = await postgres_connect(settings)
    try:
        rows = RunRows(settings, conn, "feedc0ffee")
        clean = await rows.verify(ids[0], ids[-1])
        assert (clean.persisted, clean.distinct, clean.dead) == (100, 100, 0)
        assert clean.clock  # says which clock the latency used
        # One event lost, one ingested twice under another entry ID (as a double replay would).
        pg_execute(dsn, "DELETE FROM events WHERE entry_id = $1", ids[10])
        pg_execute(
            dsn,
            "INSERT INTO events (stream, entry_id, entry_ms, entry_seq, event_type, payload,"
            " produced_at) SELECT stream, $2, split_part($2, '-', 1)::bigint, 999, event_type,"
            " payload, produced_at"
            " FROM events WHERE entry_id = $1",
            ids[20],
            ids[-1].partition("-")[0] + "-999",
        )
        broken = await rows.verify(ids[0], ids[-1])
    finally:
        await conn.close()
    assert broken.persisted == 100
    assert broken.distinct == 99
    lost, duplicated = 100 - broken.distinct, broken.persisted - broken.distinct
    assert (lost, duplicated) == (1, 1)


def test_bench_spreads_over_streams_and_checks_each(
    env: dict[str, str], start_serve: Callable[..., ServeProcess]
) -> None:
    """--streams 2 against running serves: the first two names in `streams`, each stream's events
    counted on its own. (One serve per stream here, so the test holds with any serve.)"""
    for stream in ("bench_a", "bench_b"):
        start_serve(environ={**env, "STREAMD_STREAM": stream}).wait_ready(1)
    named = {**env, "STREAMD_STREAMS": "bench_a,bench_b,bench_c"}
    result = run_streamd(
        named, "bench", "--drain", "4000", "--batch", "500", "--streams", "2", "--json", timeout=150
    )
    assert result.returncode == 0, explain(result)
    report = orjson.loads(result.stdout)
    assert report["produced"] == report["persisted"] == 4000
    assert report["exactly_once"] is True
    assert report["streams"] == {
        "bench_a": {"produced": 2000, "persisted": 2000},
        "bench_b": {"produced": 2000, "persisted": 2000},
    }
    assert "Writes to: 2 streams bench_a .. bench_b, table events" in result.stderr
    assert xlen(env["STREAMD_REDIS_URL"], "bench_c") == 0

    too_many = run_streamd(named, "bench", "--drain", "10", "--streams", "4")
    assert too_many.returncode == 2, explain(too_many)
    assert "--streams 4 without --serve" in too_many.stderr


def test_bench_own_serve_over_streams(env: dict[str, str], settings: Settings) -> None:
    """--serve --streams 4: its serve consumes bench_events:0 .. :3 into bench_events, and each
    stream is checked on its own."""
    result = run_streamd(
        env,
        "bench",
        "--drain",
        "2000",
        "--batch",
        "250",
        "--serve",
        "--streams",
        "4",
        "--json",
        timeout=150,
    )
    assert result.returncode == 0, explain(result)
    report = orjson.loads(result.stdout)
    assert report["produced"] == report["persisted"] == 2000 and report["exactly_once"] is True
    names = [f"bench_events:{i}" for i in range(4)]
    assert report["streams"] == {n: {"produced": 500, "persisted": 500} for n in names}
    assert "Writes to: 4 streams bench_events:0 .. bench_events:3, table bench_events" in (
        result.stderr
    )
    rows = pg_fetch(
        settings.postgres_dsn, "SELECT stream, count(*) AS n FROM bench_events GROUP BY 1"
    )
    assert {r["stream"]: r["n"] for r in rows} == dict.fromkeys(names, 500)
