"""The progress log's arithmetic, without servers: interval percentiles from the latency digest,
and the dead-letter warnings' limit and count, fed with made-up batch reports."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from structlog.testing import capture_logs

from streamd.config import load_settings
from streamd.observability.latency import DIGEST_BOUNDS_S, LatencyDigest
from streamd.observability.progress import DEAD_LETTER_WARNINGS, ProgressLog
from streamd.pipeline.batch import BatchReport
from streamd.pipeline.envelope import PG_EPOCH_MS, Rejection

COMMITTED_AT = 1_800_000_000.0
COMMITTED_US = int(COMMITTED_AT * 1e6) - PG_EPOCH_MS * 1000


def produced(latencies_ms: list[float]) -> list[int]:
    return [COMMITTED_US - int(ms * 1000) for ms in latencies_ms]


def test_digest_quantiles_are_within_a_bucket_of_the_truth() -> None:
    latencies = [float(i % 100) + 0.5 for i in range(10_000)]  # 0.5 .. 99.5 ms, uniform
    digest = LatencyDigest()
    for start in range(0, len(latencies), 1000):  # in batches, as the observer sees them
        digest.add(produced(latencies[start : start + 1000]), COMMITTED_AT)
    assert digest.total == 10_000
    for q, truth_ms in ((0.5, 50.0), (0.99, 99.0)):
        got = digest.quantile(q)
        assert got is not None
        assert truth_ms <= got * 1000 <= truth_ms * 1.25 + 0.001  # the bucket's upper bound


def test_digest_edges() -> None:
    digest = LatencyDigest()
    assert digest.quantile(0.99) is None
    digest.add(produced([-5.0, 10_000_000.0]), COMMITTED_AT)  # a clock ahead; hours late
    assert digest.quantile(0.01) == DIGEST_BOUNDS_S[0]
    assert digest.quantile(1.0) == DIGEST_BOUNDS_S[-1]


class NoRedis:
    """A client whose every command fails: the summary then has no lag, and still comes."""

    def pipeline(self, **_kwargs: Any) -> Any:
        raise ConnectionError("no Redis here")


def report(dead: int = 0, rows: int = 10, total_s: float = 0.01) -> BatchReport:
    rejections = [
        Rejection(f"1-{i}".encode(), [b"data", b"{}"], "missing_type", "x") for i in range(dead)
    ]
    return BatchReport(
        consumer="host:1:0",
        entries=rows + dead,
        inserted=rows,
        duplicates=0,
        dead=rejections,
        write_s=total_s / 2,
        total_s=total_s,
        produced_us=produced([5.0] * rows),
        committed_at=COMMITTED_AT,
        stream="events",
        retries=1,
    )


@pytest.fixture
def progress() -> ProgressLog:
    settings = load_settings(environ={}, set_values={"log_interval_s": "10", "slow_batch_s": "1"})[
        0
    ]
    return ProgressLog(settings, NoRedis())  # type: ignore[arg-type]


def test_dead_letters_beyond_the_limit_are_counted_once(progress: ProgressLog) -> None:
    with capture_logs() as logs:
        progress.observe(report(dead=3))
        progress.observe(report(dead=40))
        asyncio.run(progress.flush())
    warned = [e for e in logs if e["event"] == "dead_letter"]
    assert len(warned) == DEAD_LETTER_WARNINGS
    assert warned[0] | {"log_level": "warning"} == warned[0]
    assert {w["entry_id"] for w in warned} == {f"1-{i}" for i in range(3)} | {"1-0", "1-1"}
    (suppressed,) = [e for e in logs if e["event"] == "dead_letters_suppressed"]
    assert suppressed["count"] == 43 - DEAD_LETTER_WARNINGS
    assert suppressed["by_reason"] == {"missing_type": 43 - DEAD_LETTER_WARNINGS}
    (summary,) = [e for e in logs if e["event"] == "ingest_progress"]
    assert (summary["rows"], summary["batches"], summary["dead"]) == (20, 2, 43)
    assert summary["dead_by_reason"] == {"missing_type": 43}
    assert summary["retries"] == 2
    assert summary["lag"] is None and 5.0 <= summary["p99_ms"] <= 5.0 * 1.25  # 5 ms each
    # The next interval starts afresh: warnings again, nothing left over to count.
    with capture_logs() as logs:
        progress.observe(report(dead=1))
        asyncio.run(progress.flush())
    assert [e["event"] for e in logs] == ["dead_letter", "ingest_progress"]


def test_slow_batches_warn_and_idle_intervals_are_quiet(progress: ProgressLog) -> None:
    with capture_logs() as logs:
        progress.observe(report(total_s=2.5))
        progress.observe(report(total_s=0.2))
        asyncio.run(progress.flush())
        asyncio.run(progress.flush())  # nothing happened, nothing waits (as far as we know)
    (slow,) = [e for e in logs if e["event"] == "batch_slow"]
    assert slow["ms"] == 2500.0 and slow["log_level"] == "warning"
    assert [e["event"] for e in logs if e["event"] == "ingest_progress"] == ["ingest_progress"]
