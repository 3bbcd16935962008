"""Faults behind PgBouncer, in session and in transaction pooling mode: a serve killed with -9
between COMMIT and XACK (its batches replay through the staging table), and a Postgres restart
behind the pooler. Every event exactly once in Postgres, nothing pending, nothing dead-lettered.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import pytest

from streamd.dev.pgbouncer import PgBouncerServer
from streamd.dev.servers import PostgresServer
from tests.support.fixtures import through_pgbouncer
from tests.support.helpers import (
    ServeProcess,
    count_rows,
    event,
    pending_count,
    redis_client,
    table_locked,
    wait_until,
)
from tests.support.load import producing, wait_for_outcome
from tests.support.proxy import TcpProxy

pytestmark = pytest.mark.timeout(150)

MODES = ["session", "transaction"]
FAST = {
    "STREAMD_TASKS": "3",
    "STREAMD_BATCH_SIZE": "1000",
    "STREAMD_POSTGRES_TIMEOUT_S": "3",
    "STREAMD_REDIS_TIMEOUT_S": "2",
    "STREAMD_RETRY_MAX_S": "0.5",
}


@pytest.mark.parametrize("pool_mode", MODES)
def test_kill_9_between_commit_and_ack_replays_through_the_staging_table(
    pool_mode: str,
    env: dict[str, str],
    postgres_server: PostgresServer,
    make_pgbouncer: Callable[..., PgBouncerServer],
    start_serve: Callable[..., ServeProcess],
) -> None:
    """Batches held (the table locked), the path to Redis stalled, the lock released: every batch
    commits and its XACK hangs; then kill -9 of the whole serve, and the XACKs are lost with its
    connections. The next serve adopts the dead consumers' entries, and Postgres refuses them as
    already there: they go through the staging table, a temporary table of the transaction, which
    a pooler in transaction mode may run on any server connection."""
    url, dsn = env["STREAMD_REDIS_URL"], env["STREAMD_POSTGRES_DSN"]  # direct, for the checks
    bouncer = make_pgbouncer(postgres_server, pool_mode)
    proxy = TcpProxy(urlsplit(url).port or 0).start()
    environ = through_pgbouncer(env, bouncer) | FAST
    first = start_serve(environ=environ | {"STREAMD_REDIS_URL": via(url, proxy.port)})
    try:
        first.wait_ready()
        total = 1500
        with table_locked(dsn):
            # One MULTI/EXEC: the blocked consumers wake to full batches that hold every entry.
            with redis_client(url) as r:
                pipe = r.pipeline(transaction=True)
                for i in range(total):
                    pipe.xadd("events", event("t", {"i": i}))
                pipe.execute()
            wait_until(lambda: pending_count(url) == total, timeout=20, message="all delivered")
            # Delivered is not yet in hand: a reply still on its way through the proxy would be
            # lost in the stall, and its consumer could not take its entries back from a stalled
            # Redis. Loopback replies take milliseconds: give them time to arrive.
            time.sleep(0.5)
            proxy.stall()
        wait_until(lambda: count_rows(dsn) == total, timeout=20, message="all committed")
        first.send_signal(signal.SIGKILL, group=True)
        assert first.wait(10) == -signal.SIGKILL
        proxy.drop()  # the held XACKs go with the connections
    finally:
        proxy.close()
    assert pending_count(url) == total  # committed, never acknowledged
    second = start_serve(environ=environ | {"STREAMD_LOG_LEVEL": "debug"})  # batch_flushed
    second.wait_ready()
    wait_until(lambda: pending_count(url) == 0, timeout=30, message=second.tail(20))

    def flushed() -> list[dict[str, Any]]:
        return second.events("batch_flushed") + second.events("entries_reclaimed")

    # Each line is logged once its batch is acknowledged: the last may come just after.
    wait_until(lambda: sum(e.get("duplicates", 0) for e in flushed()) >= total, timeout=10)
    assert sum(e.get("duplicates", 0) for e in flushed()) == total, second.tail(20)
    assert sum(e.get("rows", 0) for e in flushed()) == 0
    assert count_rows(dsn) == total
    assert count_rows(dsn, "dead_letter_queue") == 0
    assert second.terminate() == 0


def via(url: str, port: int) -> str:
    """url with its port replaced (to go through a proxy)."""
    parts = urlsplit(url)
    return parts._replace(netloc=f"{parts.hostname}:{port}").geturl()


@pytest.mark.parametrize("pool_mode", MODES)
def test_postgres_restart_behind_pgbouncer_loses_nothing(
    pool_mode: str,
    env: dict[str, str],
    make_postgres: Callable[..., PostgresServer],
    make_pgbouncer: Callable[..., PgBouncerServer],
    start_serve: Callable[..., ServeProcess],
) -> None:
    """Postgres restarts while PgBouncer stays: the pooler's errors (server connection lost,
    cannot connect) are outages, retried; no worker restarts, and ingest resumes."""
    postgres = make_postgres()
    # server_login_retry: PgBouncer waits this long after a failed login to the server before it
    # tries again (default 15 s); shortened so the test does not wait out the default.
    bouncer = make_pgbouncer(postgres, pool_mode, config={"server_login_retry": "1"})
    environ = {**env, **FAST, "STREAMD_POSTGRES_DSN": bouncer.dsn("postgres")}
    url = environ["STREAMD_REDIS_URL"]
    serve = start_serve(environ=environ)
    serve.wait_ready()
    with producing(url, rate=400) as producer:
        wait_until(lambda: count_rows(postgres.dsn) > 100, timeout=30)
        postgres.stop()
        wait_until(lambda: serve.events("write_retrying"), timeout=30, message=serve.tail(20))
        postgres.start()
        wait_until(lambda: serve.events("write_recovered"), timeout=60, message=serve.tail(20))
        wait_until(lambda: count_rows(postgres.dsn) > producer.produced // 2, timeout=30)
        producer.stop()
    result = wait_for_outcome(postgres.dsn, url, producer)
    assert result.exact, f"{result.summary()}\n{serve.tail(40)}"
    assert not serve.events("child_exited"), serve.tail(40)
    assert serve.terminate() == 0
