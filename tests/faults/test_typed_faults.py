"""kill -9 of `streamd serve` writing an upsert table, directly and behind PgBouncer in
transaction mode: once between COMMIT and XACK (the next serve replays committed batches, which
must change nothing), once mid-batch (transactions open, blocked on a lock: nothing of them
commits). In between, newer events of the same keys arrive, so replays come after newer rows.
At the end the table equals the fold of the stream, nothing is pending, nothing dead-lettered."""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st

from streamd.dev.pgbouncer import PgBouncerServer
from streamd.dev.servers import PostgresServer
from tests.support.fixtures import through_pgbouncer
from tests.support.helpers import (
    ServeProcess,
    count_rows,
    pending_count,
    pg_execute,
    redis_client,
    table_locked,
    wait_until,
)
from tests.support.proxy import TcpProxy
from tests.support.typed import (
    decoded,
    deletion,
    drained,
    fold,
    orders_config,
    orders_table,
    update,
)

pytestmark = pytest.mark.timeout(180)

FAST = {
    # Two consumers of 200: the first 400 entries are all in hand at once.
    "STREAMD_TASKS": "2",
    "STREAMD_BATCH_SIZE": "200",
    "STREAMD_POSTGRES_TIMEOUT_S": "5",
    "STREAMD_REDIS_TIMEOUT_S": "2",
    "STREAMD_RETRY_MAX_S": "0.5",
    "STREAMD_CLAIM_MIN_IDLE_MS": "1500",
    "STREAMD_REAPER_INTERVAL_S": "0.3",
}


def events_for(round_: int, count: int) -> list[dict[str, object]]:
    """count events over 25 keys; every seventh a delete."""
    return [
        deletion(f"o{i % 25}") if i % 7 == 3 else update(f"o{i % 25}", f"r{round_}-{i}")
        for i in range(count)
    ]


def produce(url: str, fields: list[dict[str, object]]) -> list[str]:
    """XADD all in one MULTI/EXEC: blocked consumers wake to full batches."""
    with redis_client(url) as r:
        pipe = r.pipeline(transaction=True)
        for f in fields:
            pipe.xadd("orders", f)
        return [i.decode() for i in pipe.execute()]


def via(url: str, port: int) -> str:
    parts = urlsplit(url)
    return parts._replace(netloc=f"{parts.hostname}:{port}").geturl()


@pytest.mark.parametrize("pooler", ["direct", "pgbouncer transaction"])
def test_kill_9_between_commit_and_ack_and_mid_batch_keep_the_table_the_fold(
    pooler: str,
    env: dict[str, str],
    tmp_path: Path,
    postgres_server: PostgresServer,
    make_pgbouncer: Callable[..., PgBouncerServer],
    start_serve: Callable[..., ServeProcess],
) -> None:
    url, dsn = env["STREAMD_REDIS_URL"], env["STREAMD_POSTGRES_DSN"]  # direct, for the checks
    environ = env | FAST | {"STREAMD_CONFIG": str(orders_config(tmp_path / "streamd.toml"))}
    if pooler != "direct":
        environ = through_pgbouncer(environ, make_pgbouncer(postgres_server, "transaction"))
    produced: list[tuple[str, dict[str, object]]] = []

    # 1. Batches commit, their XACKs hang (Redis stalled), kill -9: committed, never acked.
    proxy = TcpProxy(urlsplit(url).port or 0).start()
    first = start_serve(environ=environ | {"STREAMD_REDIS_URL": via(url, proxy.port)})
    try:
        first.wait_ready()
        with table_locked(dsn, "orders"):
            fields = events_for(1, 400)
            produced += zip(produce(url, fields), fields, strict=True)
            wait_until(lambda: pending_count(url, "orders") == 400, timeout=20, message="in hand")
            proxy.stall()
        want = fold(decoded(produced))
        wait_until(lambda: orders_table(dsn) == want, timeout=20, message="all committed")
        first.send_signal(signal.SIGKILL, group=True)
        assert first.wait(10) == -signal.SIGKILL
        proxy.drop()
    finally:
        proxy.close()
    assert pending_count(url, "orders") == 400

    # 2. Newer events of the same keys, and the replays, held mid-batch by a lock; kill -9.
    second = start_serve(environ=environ)
    second.wait_ready()
    with table_locked(dsn, "orders"):
        fields = events_for(2, 300)
        produced += zip(produce(url, fields), fields, strict=True)
        wait_until(lambda: pending_count(url, "orders") == 700, timeout=30, message=second.tail())
        second.send_signal(signal.SIGKILL, group=True)
        assert second.wait(10) == -signal.SIGKILL

    # 3. A last serve takes over every entry; replays of older entries come after newer rows.
    fields = events_for(3, 200)
    third = start_serve(environ=environ)
    third.wait_ready()
    produced += zip(produce(url, fields), fields, strict=True)
    wait_until(lambda: drained(url, "orders"), timeout=60, message=third.tail(20))
    assert orders_table(dsn) == fold(decoded(produced))
    assert count_rows(dsn, "dead_letter_queue") == 0
    assert third.terminate() == 0


@hyp_settings(
    max_examples=3,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    chunks=st.lists(
        st.lists(st.tuples(st.integers(0, 9), st.integers(0, 5)), min_size=20, max_size=150),
        min_size=2,
        max_size=4,
    ),
    kill_after=st.lists(st.booleans(), min_size=4, max_size=4),
)
def test_random_sequences_with_serve_killed_at_random_end_as_the_fold(
    env: dict[str, str],
    tmp_path: Path,
    start_serve: Callable[..., ServeProcess],
    chunks: list[list[tuple[int, int]]],
    kill_after: list[bool],
) -> None:
    """Chunks of random updates and deletes (one in six) of ten keys, each chunk produced while
    a serve ingests; after a chunk, maybe kill -9 the serve as soon as it holds entries
    (mid-batch or between COMMIT and XACK, wherever it is) and start another, whose reaper
    replays them after newer ones. The table ends as the fold."""
    url, dsn = env["STREAMD_REDIS_URL"], env["STREAMD_POSTGRES_DSN"]
    environ = env | FAST | {"STREAMD_BATCH_SIZE": "15", "STREAMD_TASKS": "3"}
    environ["STREAMD_CONFIG"] = str(orders_config(tmp_path / "streamd.toml"))
    with redis_client(url) as r:
        r.delete("orders")
    serve = start_serve(environ=environ)
    serve.wait_ready()
    pg_execute(dsn, "TRUNCATE orders, orders_tombstones, dead_letter_queue")
    produced: list[tuple[str, dict[str, object]]] = []
    for n, (chunk, kill) in enumerate(zip(chunks, kill_after, strict=False)):
        fields = [
            deletion(f"o{key}") if kind == 0 else update(f"o{key}", f"c{n}-{i}")
            for i, (key, kind) in enumerate(chunk)
        ]
        produced += zip(produce(url, fields), fields, strict=True)
        if kill:
            # With entries in hand: they are replayed after the next chunk's newer ones.
            wait_until(lambda: pending_count(url, "orders") > 0, timeout=20, interval=0.002)
            serve.send_signal(signal.SIGKILL, group=True)
            serve.wait(10)
            serve = start_serve(environ=environ)
            serve.wait_ready()
    wait_until(lambda: drained(url, "orders"), timeout=60, message=serve.tail(20))
    assert orders_table(dsn) == fold(decoded(produced))
    assert count_rows(dsn, "dead_letter_queue") == 0
    serve.send_signal(signal.SIGKILL, group=True)
    serve.wait(10)
