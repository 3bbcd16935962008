"""Many streams, one serve: names and patterns, discovery while running, routing to tables, the
`stream` column, dead letters and recovery per stream, fair share, 1,000 streams.

Real `streamd serve`, real Redis and Postgres; every test asserts rows, dead letters and what is
left pending, per stream.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from streamd.dev.processes import free_port
from tests.integration.test_metrics import get, samples
from tests.support.helpers import (
    ServeProcess,
    count_rows,
    event,
    pending_count,
    pg_fetch,
    pg_fetchval,
    redis_client,
    wait_until,
    xadd,
)

Start = Callable[..., ServeProcess]


def rows_by_stream(dsn: str, table: str) -> dict[str, int]:
    found = pg_fetch(dsn, f"SELECT stream, count(*) AS n FROM {table} GROUP BY stream")
    return {r["stream"]: int(r["n"]) for r in found}


def add(url: str, stream: str, n: int, start: int = 0) -> list[str]:
    return xadd(url, (event("t", {"i": i, "s": stream}) for i in range(start, start + n)), stream)


def test_names_and_patterns_routed_to_tables_with_the_stream_column(
    env: dict[str, str], start_serve: Start
) -> None:
    """A name, a pattern that matches at start, and a stream the pattern finds only after serve
    started: each lands in the table its route names, once, with its stream in the row; a
    stream that matches nothing is left alone."""
    url, dsn = env["STREAMD_REDIS_URL"], env["STREAMD_POSTGRES_DSN"]
    env["STREAMD_STREAMS"] = "orders,tenant:*"
    env["STREAMD_TABLES"] = "orders=orders_events,tenant:*=tenant_events"
    env["STREAMD_DISCOVER_INTERVAL_S"] = "0.2"
    add(url, "tenant:a", 30)
    add(url, "unrelated", 5)
    with redis_client(url) as r:  # keys of other types that the pattern matches: skipped
        r.rpush("tenant:list", "x")
        r.hset("tenant:hash", "f", "v")
    serve = start_serve()
    serve.wait_ready()
    add(url, "orders", 40)
    add(url, "tenant:a", 10, start=30)
    add(url, "tenant:b", 25)  # created while serve runs: found by the next discovery
    wait_until(
        lambda: rows_by_stream(dsn, "tenant_events") == {"tenant:a": 40, "tenant:b": 25},
        timeout=30,
        message="tenant rows",
        ignore=(Exception,),
    )
    wait_until(lambda: rows_by_stream(dsn, "orders_events") == {"orders": 40}, timeout=30)
    assert count_rows(dsn, "events") == 0  # the default table: no stream routed there
    for stream in ("orders", "tenant:a", "tenant:b"):
        assert pending_count(url, stream) == 0
    payload_streams = pg_fetch(dsn, "SELECT DISTINCT stream, payload->>'s' AS s FROM tenant_events")
    assert {(r["stream"], r["s"]) for r in payload_streams} == {
        ("tenant:a", "tenant:a"),
        ("tenant:b", "tenant:b"),
    }
    with redis_client(url) as r:
        assert r.xinfo_groups("unrelated") == []  # never consumed
    assert serve.events("streams_discovered")
    [skipped] = serve.events("stream_pattern_skipped_keys")
    assert skipped["keys"] == ["tenant:hash", "tenant:list"]
    with redis_client(url) as r:
        assert r.lrange("tenant:list", 0, -1) == [b"x"]
    assert serve.terminate() == 0


def test_a_pattern_matching_nothing_warns_once_then_its_stream_is_consumed(
    env: dict[str, str], start_serve: Start
) -> None:
    url, dsn = env["STREAMD_REDIS_URL"], env["STREAMD_POSTGRES_DSN"]
    env["STREAMD_STREAMS"] = "later:*"
    env["STREAMD_DISCOVER_INTERVAL_S"] = "0.1"
    serve = start_serve()
    serve.wait_ready()
    wait_until(lambda: serve.events("stream_pattern_unmatched"), timeout=10)
    time.sleep(1)  # ten discoveries that find nothing again: still one warning
    add(url, "later:x", 12)
    wait_until(lambda: count_rows(dsn) == 12, timeout=30, message="rows of later:x")
    warnings = serve.events("stream_pattern_unmatched")
    assert [w["pattern"] for w in warnings] == ["later:*"]
    assert serve.terminate() == 0


def test_dead_letters_go_to_each_streams_own_dead_stream(
    env: dict[str, str], start_serve: Start
) -> None:
    url, dsn = env["STREAMD_REDIS_URL"], env["STREAMD_POSTGRES_DSN"]
    env["STREAMD_STREAMS"] = "a,b"
    serve = start_serve()
    serve.wait_ready()
    for stream in ("a", "b"):
        add(url, stream, 5)
        xadd(url, [{"type": "t", "data": "{oops"}, {"data": "{}"}], stream)
    wait_until(lambda: pg_fetchval(dsn, "SELECT count(*) FROM dead_letter_queue") == 4, timeout=30)
    dead = pg_fetch(dsn, "SELECT stream, reason FROM dead_letter_queue ORDER BY stream, reason")
    assert [(r["stream"], r["reason"]) for r in dead] == [
        ("a", "invalid_json"),
        ("a", "missing_type"),
        ("b", "invalid_json"),
        ("b", "missing_type"),
    ]
    assert rows_by_stream(dsn, "events") == {"a": 5, "b": 5}
    with redis_client(url) as r:
        for stream in ("a", "b"):
            letters = r.xrange(f"{stream}:dead")
            assert len(letters) == 2
            assert {f[b"stream"] for _, f in letters} == {stream.encode()}
            assert pending_count(url, stream) == 0
        assert not r.exists("events:dead")
    assert serve.terminate() == 0


def test_the_reaper_reclaims_a_second_streams_stale_entries(
    env: dict[str, str], start_serve: Start
) -> None:
    """Entries a consumer elsewhere read from the second stream and never acknowledged are
    reclaimed by serve's reaper and ingested once."""
    url, dsn = env["STREAMD_REDIS_URL"], env["STREAMD_POSTGRES_DSN"]
    env |= {
        "STREAMD_STREAMS": "first,second",
        "STREAMD_CLAIM_MIN_IDLE_MS": "300",
        "STREAMD_REAPER_INTERVAL_S": "0.1",
    }
    add(url, "second", 50)
    with redis_client(url) as r:
        r.xgroup_create("second", "streamd", id="0")
        held = r.xreadgroup("streamd", "ghost-host:1:0", {"second": ">"})
    assert len(held[0][1]) == 50
    serve = start_serve()
    serve.wait_ready()
    add(url, "first", 20)
    wait_until(lambda: rows_by_stream(dsn, "events") == {"first": 20, "second": 50}, timeout=30)
    wait_until(lambda: pending_count(url, "second") == 0, timeout=30)
    reclaimed = serve.events("entries_reclaimed")
    assert sum(e["count"] for e in reclaimed) >= 50
    assert serve.terminate() == 0


def test_a_quiet_stream_is_not_held_behind_another_streams_backlog(
    env: dict[str, str], start_serve: Start
) -> None:
    """While a large backlog drains, an entry of a quiet stream is ingested before most of the
    backlog: rows of the big stream are committed after the quiet one's (ordering, not time)."""
    url, dsn = env["STREAMD_REDIS_URL"], env["STREAMD_POSTGRES_DSN"]
    env |= {"STREAMD_STREAMS": "big,quiet", "STREAMD_TASKS": "2"}
    total = 200_000
    with redis_client(url) as r:
        for first in range(0, total, 10_000):
            pipe = r.pipeline(transaction=False)
            for i in range(first, first + 10_000):
                pipe.xadd("big", event("t", {"i": i}))
            pipe.execute()
    serve = start_serve()
    serve.wait_ready()
    wait_until(lambda: count_rows(dsn, missing_ok=True) > 0, timeout=30, interval=0.005)
    add(url, "quiet", 1)
    wait_until(lambda: rows_by_stream(dsn, "events").get("quiet") == 1, timeout=30)
    wait_until(lambda: count_rows(dsn) == total + 1, timeout=120, interval=0.2)
    after = pg_fetchval(
        dsn,
        "SELECT count(*) FROM events WHERE stream = 'big' AND ingested_at > "
        "(SELECT ingested_at FROM events WHERE stream = 'quiet')",
    )
    assert after > total // 2, f"only {after} of {total} backlog rows came after the quiet one"
    assert serve.terminate() == 0


@pytest.mark.timeout(300)
def test_a_thousand_streams_over_few_connections(env: dict[str, str], start_serve: Start) -> None:
    """1,001 streams match: 1,000 are consumed (the limit, with a warning), each once, over a
    number of Redis connections that does not grow with the streams."""
    url, dsn = env["STREAMD_REDIS_URL"], env["STREAMD_POSTGRES_DSN"]
    env |= {"STREAMD_STREAMS": "s:*", "STREAMD_TASKS": "2"}
    names = [f"s:{i:04d}" for i in range(1001)]
    with redis_client(url) as r:
        pipe = r.pipeline(transaction=False)
        for name in names:
            pipe.xadd(name, event("t", {"s": name}))
        pipe.execute()
    serve = start_serve()
    serve.wait_ready(timeout=60)
    wait_until(lambda: count_rows(dsn) == 1000, timeout=120, interval=0.2)
    assert set(rows_by_stream(dsn, "events")) == set(names[:1000])
    [warning] = serve.events("streams_truncated")
    assert warning["left_out"] == 1
    with redis_client(url) as r:
        clients = [c for c in r.client_list() if c.get("cmd") != "client|list"]
        assert len(clients) <= 12, [c.get("cmd") for c in clients]
        assert sum(int(g["pending"]) for n in names[:1000] for g in r.xinfo_groups(n)) == 0
        assert r.xinfo_groups(names[1000]) == []
    assert serve.terminate() == 0


def test_worker_metrics_are_labelled_by_stream(env: dict[str, str], start_serve: Start) -> None:
    url = env["STREAMD_REDIS_URL"]
    port = free_port()
    env |= {"STREAMD_STREAMS": "a,b:*", "STREAMD_METRICS_PORT": str(port)}
    add(url, "b:1", 3)
    serve = start_serve()
    serve.wait_ready()
    add(url, "a", 7)
    xadd(url, [{"data": "{}"}], "b:1")
    ingested, dead = "streamd_events_ingested_total", "streamd_dead_letters_total"

    def counted() -> dict[str, float] | None:
        page = samples(get(port, "/metrics")[1])
        want = {
            f'{ingested}{{stream="a"}}': 7,
            f'{ingested}{{stream="b:1"}}': 3,
            f'{dead}{{reason="missing_type",stream="b:1"}}': 1,
            f'{dead}{{reason="missing_type",stream="a"}}': 0,
        }
        return page if all(page.get(k) == v for k, v in want.items()) else None

    wait_until(counted, timeout=30, ignore=(OSError,))
    assert serve.terminate() == 0
