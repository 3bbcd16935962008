"""streamd behind PgBouncer (the Debian package, its default settings), in session and in
transaction pooling mode: detection, the startup parameters it refuses, timeouts per transaction,
no prepared statement or temporary table left on a server connection, the schema lock, and the
real `streamd serve` ingesting through it. (Faults behind it: tests/faults/test_pgbouncer_faults.)
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import asyncpg
import pytest

from streamd.backends import connections
from streamd.backends.connections import (
    behind_pooler,
    pooler_in_use,
    postgres_connect,
    postgres_pool,
    transaction,
)
from streamd.backends.schema import apply_schema
from streamd.config import Settings, load_settings
from streamd.dev.pgbouncer import PgBouncerServer
from streamd.dev.servers import PostgresServer
from streamd.errors import EXIT_BOOT
from streamd.pipeline.envelope import split_entries
from streamd.pipeline.sink import PostgresSink
from tests.support.fixtures import through_pgbouncer
from tests.support.helpers import (
    ServeProcess,
    count_rows,
    event,
    pending_count,
    pg_execute,
    pg_fetchval,
    table_locked,
    wait_until,
    xadd,
)
from tests.support.streamd_cli import explain, run_streamd

MODES = ["session", "transaction"]
Bouncer = Callable[..., PgBouncerServer]


def bounced(env: dict[str, str], bouncer: PgBouncerServer, **overrides: str) -> Settings:
    return load_settings(environ=through_pgbouncer(env, bouncer), set_values=overrides)[0]


@pytest.fixture(autouse=True)
def _forget_detection() -> None:
    connections._detected.clear()  # each test detects afresh, as a new process would


# --- detection and connection options -----------------------------------------------------


@pytest.mark.parametrize("pool_mode", MODES)
async def test_auto_detects_pgbouncer_and_sets_timeouts_per_transaction(
    pool_mode: str, env: dict[str, str], postgres_server: PostgresServer, make_pgbouncer: Bouncer
) -> None:
    """No timeout goes in the startup packet (PgBouncer refuses it); every transaction sets it
    with SET LOCAL, so it holds for streamd's statements and never leaks to other clients of the
    same server connection."""
    bouncer = make_pgbouncer(postgres_server, pool_mode, config={"default_pool_size": "1"})
    settings = bounced(env, bouncer, postgres_timeout_s="1.5")
    assert settings.postgres_pooler == "auto"
    pool = await postgres_pool(settings, size=2)
    try:
        assert pooler_in_use(settings) == "pgbouncer (detected)"
        async with pool.acquire() as conn:
            assert behind_pooler(conn)
            async with transaction(conn):
                assert await conn.fetchval("SHOW statement_timeout") == "1500ms"
                assert await conn.fetchval("SHOW idle_in_transaction_session_timeout") == "3s"
            if pool_mode == "transaction":  # the one server connection, handed to another client
                other = await asyncpg.connect(bouncer.dsn(settings.postgres_dsn.rsplit("/")[-1]))
                assert await other.fetchval("SHOW statement_timeout") == "0"
                await other.close()
            with pytest.raises(asyncpg.QueryCanceledError, match="statement timeout"):
                async with transaction(conn):
                    await conn.execute("SELECT pg_sleep(5)")
    finally:
        await pool.close()


async def test_auto_on_a_direct_connection_keeps_the_timeouts_in_the_session(
    settings: Settings,
) -> None:
    conn = await postgres_connect(settings)
    try:
        assert not behind_pooler(conn)
        assert pooler_in_use(settings) == "none (detected)"
        assert await conn.fetchval("SHOW statement_timeout") == "30s"
    finally:
        await conn.close()
    pool = await postgres_pool(settings, size=1)  # now known: startup parameters, cached statements
    try:
        async with pool.acquire() as conn:
            assert not behind_pooler(conn)
            assert await conn.fetchval("SHOW statement_timeout") == "30s"
    finally:
        await pool.close()


def test_none_behind_pgbouncer_is_exit_78_naming_the_parameter_and_the_fix(
    env: dict[str, str],
    postgres_server: PostgresServer,
    make_pgbouncer: Bouncer,
    start_serve: Callable[..., ServeProcess],
) -> None:
    """Debian's default pgbouncer.ini (no ignore_startup_parameters) refuses statement_timeout:
    a configuration error, not an outage that systemd should restart forever (69)."""
    bouncer = make_pgbouncer(postgres_server)
    environ = through_pgbouncer(env, bouncer) | {"STREAMD_POSTGRES_POOLER": "none"}
    result = run_streamd(environ, "db", "init")
    assert result.returncode == EXIT_BOOT, explain(result)
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1 and "Traceback" not in line, explain(result)
    assert "startup parameter statement_timeout" in line
    assert 'postgres_pooler = "pgbouncer"' in line
    serve = start_serve(environ=environ)
    assert serve.wait(30) == EXIT_BOOT
    assert "startup parameter statement_timeout" in serve.output()
    assert "Traceback" not in serve.output()


def test_the_ignore_startup_parameters_workaround_no_longer_turns_the_timeout_off(
    env: dict[str, str],
    postgres_server: PostgresServer,
    make_pgbouncer: Bouncer,
    start_serve: Callable[..., ServeProcess],
) -> None:
    """With ignore_startup_parameters = statement_timeout, PgBouncer drops the parameter without
    a word; streamd detects the pooler and sets the timeout per transaction: a COPY stuck on a
    lock is cancelled by the server and retried, as without a pooler."""
    ignored = {"ignore_startup_parameters": "statement_timeout,idle_in_transaction_session_timeout"}
    bouncer = make_pgbouncer(postgres_server, "transaction", config=ignored)
    environ = through_pgbouncer(env, bouncer) | {
        "STREAMD_POSTGRES_TIMEOUT_S": "1",
        "STREAMD_RETRY_MAX_S": "0.5",
    }
    url, dsn = env["STREAMD_REDIS_URL"], env["STREAMD_POSTGRES_DSN"]
    serve = start_serve(environ=environ)
    serve.wait_ready()
    with table_locked(dsn):
        ids = xadd(url, [event("t", {"i": i}) for i in range(100)])
        wait_until(
            lambda: any("statement timeout" in e["error"] for e in serve.events("write_retrying")),
            timeout=20,
            message=serve.tail(20),
        )
    wait_until(lambda: count_rows(dsn) == len(ids), timeout=20)
    wait_until(lambda: pending_count(url) == 0, timeout=10)
    assert serve.terminate() == 0


# --- what must not outlive a transaction ------------------------------------------------------


def entries(first: int, n: int) -> list[list[object]]:
    return [
        [f"1700000000000-{i}".encode(), [b"type", b"t", b"data", b'{"i": %d}' % i]]
        for i in range(first, first + n)
    ]


async def test_a_replayed_batch_leaves_no_staging_table_on_the_server_connection(
    env: dict[str, str], postgres_server: PostgresServer, make_pgbouncer: Bouncer
) -> None:
    """Transaction pooling: the staging table (for a batch Postgres already holds part of) is a
    temporary table of the transaction (ON COMMIT DROP). One kept for the session would stay on
    the server connection that the pooler hands to other clients next."""
    bouncer = make_pgbouncer(postgres_server, "transaction", config={"default_pool_size": "1"})
    settings = bounced(env, bouncer)
    sink = PostgresSink(settings.stream, settings.events_table, settings.dlq_table)
    pool = await postgres_pool(settings, size=2)
    try:
        async with pool.acquire() as conn:
            await apply_schema(conn, settings)
            first, _ = split_entries(entries(1, 50), 1 << 20)
            assert (await sink.write(conn, first, [])).inserted == 50
            again, _ = split_entries(entries(1, 80), 1 << 20)
            result = await sink.write(conn, again, [])
            assert (result.inserted, result.duplicates) == (30, 50)
            # Still connected: a session's temporary table would be there now.
            direct = env["STREAMD_POSTGRES_DSN"]
            staged = "SELECT count(*) FROM pg_class WHERE relname = 'streamd_stage'"
            assert pg_fetchval(direct, staged) == 0
    finally:
        await pool.close()
    assert pg_fetchval(direct, "SELECT count(*) FROM events") == 80


async def test_the_schema_lock_holds_under_transaction_pooling(
    env: dict[str, str], postgres_server: PostgresServer, make_pgbouncer: Bouncer
) -> None:
    """Eight processes' worth of `db init` at once on an empty database, each transaction on
    whichever server connection is free: the lock (pg_advisory_xact_lock, released at COMMIT)
    serializes them; without it, concurrent CREATE TABLE IF NOT EXISTS fail on pg_type."""
    bouncer = make_pgbouncer(postgres_server, "transaction")
    settings = bounced(env, bouncer)
    conns = [await postgres_connect(settings) for _ in range(8)]
    try:
        await asyncio.gather(*(apply_schema(c, settings) for c in conns))
    finally:
        for conn in conns:
            await conn.close()
    dsn = env["STREAMD_POSTGRES_DSN"]
    assert pg_fetchval(dsn, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'") == 0
    pg_execute(dsn, "SELECT 1 FROM events, dead_letter_queue")


# --- the real serve -----------------------------------------------------------------------


@pytest.mark.parametrize("pool_mode", MODES)
def test_serve_ingests_through_pgbouncer(
    pool_mode: str,
    env: dict[str, str],
    postgres_server: PostgresServer,
    make_pgbouncer: Bouncer,
    start_serve: Callable[..., ServeProcess],
) -> None:
    """Good entries once each, bad ones in the dead-letter table (an executemany: prepared), in
    transaction mode too (`prepared statement "__asyncpg_stmt_1__" already exists` before)."""
    bouncer = make_pgbouncer(postgres_server, pool_mode)
    serve = start_serve("--tasks", "3", environ=through_pgbouncer(env, bouncer))
    serve.wait_ready()
    assert serve.events("worker_started")[0]["postgres_pooler"] == "pgbouncer (detected)"
    url, dsn = env["STREAMD_REDIS_URL"], env["STREAMD_POSTGRES_DSN"]
    for chunk in range(5):
        good = xadd(url, [event("t", {"i": i}) for i in range(chunk * 600, chunk * 600 + 590)])
        xadd(url, [{"type": "t", "data": "{oops"} for _ in range(10)])
    wait_until(lambda: count_rows(dsn) == 5 * 590, timeout=30, message=serve.tail(10))
    wait_until(lambda: count_rows(dsn, "dead_letter_queue") == 50, timeout=10)
    wait_until(lambda: pending_count(url) == 0, timeout=10)
    assert good and pg_fetchval(dsn, "SELECT count(DISTINCT entry_id) FROM events") == 5 * 590
    assert serve.terminate() == 0
    assert "Traceback" not in serve.output()
