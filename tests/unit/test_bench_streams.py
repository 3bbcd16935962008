"""`streamd bench --streams N` judges each stream on its own: an event found in another stream
than the one it was sent to is not "exactly once", even when the totals add up."""

from __future__ import annotations

from streamd.tools.bench import BenchPlan, BenchResult, render
from streamd.tools.bench_verify import Verified
from streamd.tools.samples import ProduceResult


def result(found: dict[str, int]) -> BenchResult:
    verified = Verified(persisted=20, distinct=20, per_stream=found, clock="ingested_at")
    return BenchResult(
        BenchPlan(drain=20),
        "run",
        ProduceResult(20, 1.0, "1-0", "2-0"),
        verified,
        peak_lag=0,
        drain_s=1.0,
        sent={"a": 10, "b": 10},
    )


def test_each_stream_must_hold_what_it_was_sent() -> None:
    good = result({"a": 10, "b": 10})
    assert good.exactly_once and good.to_json()["exactly_once"] is True
    assert "Per stream: 2 of 2 hold what they were sent" in render(good)
    moved = result({"a": 11, "b": 9})  # same total, one event in the wrong stream
    assert not moved.exactly_once and moved.to_json()["exactly_once"] is False
    text = render(moved)
    assert "Exactly once: NO" in text
    assert "  b: 10 produced, 9 persisted  <- MISMATCH" in text
