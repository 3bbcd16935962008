"""What `streamd serve` writes at info level, on the real serve: a periodic ingest_progress line
per worker with its fields, no line per batch, a warning per dead letter (stream, entry ID,
reason) with the rest counted once the limit is reached, slow batches, and start-up lines that
do not repeat for every dead consumer of the last run."""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any

import pytest

from streamd.config.settings import Settings
from streamd.observability.progress import DEAD_LETTER_WARNINGS
from tests.support.helpers import (
    ServeProcess,
    count_rows,
    event,
    pending_count,
    redis_client,
    wait_until,
    xadd,
)

pytestmark = pytest.mark.timeout(120)

PROGRESS_FIELDS = {
    "stream",
    "interval_s",
    "rows",
    "rows_per_s",
    "batches",
    "duplicates",
    "dead",
    "dead_by_reason",
    "retries",
    "slow_batches",
    "lag",
    "lag_s",
    "pending",
    "pending_age_s",
    "p50_ms",
    "p99_ms",
}


def info_and_up(serve: ServeProcess, name: str) -> list[dict[str, Any]]:
    return [r for r in serve.events(name) if r.get("level") in ("info", "warning", "error")]


def test_progress_lines_and_a_warning_per_dead_letter(
    env: dict[str, str], settings: Settings, start_serve: Callable[..., ServeProcess]
) -> None:
    serve = start_serve(environ=env | {"STREAMD_LOG_INTERVAL_S": "0.5"})
    serve.wait_ready(1)
    url, dsn = settings.redis_url, settings.postgres_dsn
    xadd(url, [event("order_placed", {"i": i}) for i in range(300)])
    bad = xadd(url, [{"data": "{}"}, event("t", {"x": 1}) | {"data": b"{broken"}])
    wait_until(lambda: count_rows(dsn, missing_ok=True) == 300, timeout=30)

    def summed() -> list[dict[str, Any]] | None:
        lines = serve.events("ingest_progress")
        done = sum(r["rows"] for r in lines) == 300 and sum(r["dead"] for r in lines) == 2
        return lines if done else None

    lines = wait_until(summed, timeout=30, message="ingest_progress lines adding up")
    assert all(r["level"] == "info" and r.keys() >= PROGRESS_FIELDS for r in lines), lines[0]
    assert {r["stream"] for r in lines} == {"events"}
    reasons: dict[str, int] = {}
    for r in lines:
        for reason, n in r["dead_by_reason"].items():
            reasons[reason] = reasons.get(reason, 0) + n
    assert reasons == {"missing_type": 1, "invalid_json": 1}
    busy = [r for r in lines if r["rows"]]
    assert all(r["p99_ms"] is not None and r["p99_ms"] >= r["p50_ms"] > 0 for r in busy)
    assert all(r["lag"] is not None and r["lag_s"] is not None for r in lines)

    warned = serve.events("dead_letter")
    assert all(w["level"] == "warning" for w in warned)
    assert {(w["stream"], w["entry_id"], w["reason"]) for w in warned} == {
        ("events", bad[0], "missing_type"),
        ("events", bad[1], "invalid_json"),
    }
    assert "broken" not in serve.output()  # the payload is never logged
    # No line per batch at info: the summaries stand for them.
    assert not info_and_up(serve, "batch_flushed")


def test_many_dead_letters_are_counted_not_each_logged(
    env: dict[str, str], settings: Settings, start_serve: Callable[..., ServeProcess]
) -> None:
    serve = start_serve(environ=env | {"STREAMD_LOG_INTERVAL_S": "1"})
    serve.wait_ready(1)
    xadd(settings.redis_url, [{"data": "{}", "n": str(i)} for i in range(200)])

    def all_accounted() -> tuple[list[dict[str, Any]], list[dict[str, Any]]] | None:
        shown, suppressed = serve.events("dead_letter"), serve.events("dead_letters_suppressed")
        total = len(shown) + sum(s["count"] for s in suppressed)
        return (shown, suppressed) if total == 200 else None

    shown, suppressed = wait_until(all_accounted, timeout=30, message="200 dead letters told")
    assert suppressed, "no dead_letters_suppressed line"
    for line in suppressed:
        assert line["level"] == "warning" and line["stream"] == "events"
        assert line["by_reason"] == {"missing_type": line["count"]}
        assert line["shown"] == DEAD_LETTER_WARNINGS  # the window's warnings, then the count
    assert len(shown) <= DEAD_LETTER_WARNINGS * len(suppressed)
    assert sum(r["dead"] for r in serve.events("ingest_progress")) <= 200


def test_slow_batches_are_warned_about(
    env: dict[str, str], settings: Settings, start_serve: Callable[..., ServeProcess]
) -> None:
    serve = start_serve(environ=env | {"STREAMD_SLOW_BATCH_S": "0.001"})
    serve.wait_ready(1)
    xadd(settings.redis_url, [event("t", {"i": i}) for i in range(50)])
    slow = wait_until(lambda: serve.events("batch_slow"), timeout=30)
    assert slow[0]["level"] == "warning"
    assert slow[0]["stream"] == "events" and slow[0]["ms"] >= 1 and "retries" in slow[0]


def test_a_restart_does_not_log_each_dead_consumer_it_deletes(
    env: dict[str, str], settings: Settings, start_serve: Callable[..., ServeProcess]
) -> None:
    environ = env | {"STREAMD_PROCS": "2", "STREAMD_REAPER_INTERVAL_S": "0.2"}
    first = start_serve(environ=environ)
    first.wait_ready(2)
    xadd(settings.redis_url, [event("t", {"i": i}) for i in range(20)])
    wait_until(lambda: count_rows(settings.postgres_dsn, missing_ok=True) == 20, timeout=30)
    wait_until(lambda: pending_count(settings.redis_url) == 0, timeout=30)
    # Killed at once, every process of the group, as by an OOM kill of the unit: SIGKILL to the
    # supervisor alone would let its children drain on its death, each deleting the other's.
    first.send_signal(signal.SIGKILL, group=True)
    first.close()
    with redis_client(settings.redis_url) as r:
        old = {c["name"] for c in r.xinfo_consumers("events", "streamd")}
    assert old  # the consumers that read something, idle and empty, left behind

    second = start_serve(environ=environ)
    second.wait_ready(2)

    def old_ones_gone() -> bool:
        with redis_client(settings.redis_url) as r:
            now = {c["name"] for c in r.xinfo_consumers("events", "streamd")}
        return not now & old

    wait_until(old_ones_gone, timeout=30, message="the dead consumers deleted")
    assert not info_and_up(second, "dead_consumer_adopted")  # nothing held: nothing to say
