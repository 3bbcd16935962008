"""Hung dependencies: a Postgres or Redis that stops answering without closing anything (SIGSTOP, a
lock nobody releases, a network path that stops forwarding). The timeouts (postgres_timeout_s,
redis_timeout_s) must fire, the worker must recover by itself (no restart, no hung event loop),
and once the service answers again every event lands exactly once, with nothing dead-lettered.

Also checked here, in process: a connection whose command timed out is never used again, since a
late reply on it would answer the next command.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import asyncpg
import pytest
import redis.exceptions

from streamd.backends.connections import postgres_pool, redis_client
from streamd.backends.redis_groups import ensure_group
from streamd.backends.schema import apply_schema
from streamd.config.settings import Settings
from streamd.dev.servers import PostgresServer, RedisServer
from streamd.pipeline.batch import BatchWriter
from streamd.pipeline.sink import PostgresSink
from streamd.pipeline.streams import GroupStream, RawConnection
from tests.support.helpers import ServeProcess, async_wait_until, count_rows, wait_until
from tests.support.load import Outcome, producing, wait_for_outcome
from tests.support.proxy import TcpProxy

pytestmark = pytest.mark.timeout(120)

# Short timeouts, fast retries; the heartbeat limit is long, so a restart would mean a hung loop.
HUNG = {
    "STREAMD_POSTGRES_TIMEOUT_S": "1",
    "STREAMD_REDIS_TIMEOUT_S": "1",
    "STREAMD_RETRY_MAX_S": "0.5",
    "STREAMD_HEARTBEAT_TIMEOUT_S": "30",
    "STREAMD_TASKS": "3",
}


def assert_exact(result: Outcome, serve: ServeProcess) -> None:
    assert result.exact, f"{result.summary()}\n{serve.tail(40)}"


def assert_no_restart(serve: ServeProcess) -> None:
    assert not serve.events("child_exited"), serve.tail(40)
    assert not serve.events("child_hung"), serve.tail(40)


def retry_errors(serve: ServeProcess, what: str) -> list[str]:
    return [e["error"] for e in serve.events(f"{what}_retrying")]


def test_postgres_stopped_dead_mid_load_times_out_and_loses_nothing(
    env: dict[str, str],
    make_postgres: Callable[..., PostgresServer],
    start_serve: Callable[..., ServeProcess],
) -> None:
    """SIGSTOP: the server cannot cancel anything, so the client's command_timeout must fire;
    new connections hang in the handshake until the connect timeout."""
    postgres = make_postgres()
    environ = {**env, **HUNG, "STREAMD_POSTGRES_DSN": postgres.dsn}
    url = environ["STREAMD_REDIS_URL"]
    serve = start_serve(environ=environ)
    serve.wait_ready()
    with producing(url, rate=400) as producer:
        wait_until(lambda: count_rows(postgres.dsn, missing_ok=True) > 100, timeout=30)
        postgres.pause()
        try:
            wait_until(
                lambda: any("Timeout" in e for e in retry_errors(serve, "write")),
                timeout=30,
                message=serve.tail(20),
            )
        finally:
            postgres.resume()
        wait_until(lambda: serve.events("write_recovered"), timeout=30, message=serve.tail(20))
        producer.stop()
    assert_exact(wait_for_outcome(postgres.dsn, url, producer), serve)
    assert_no_restart(serve)
    assert serve.terminate() == 0


@contextmanager
def table_locked(dsn: str, table: str = "events") -> Iterator[None]:
    """Hold an ACCESS EXCLUSIVE lock on `table` (from another session) inside the block."""
    locked, release = threading.Event(), threading.Event()

    async def hold() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            async with conn.transaction():
                await conn.execute(f'LOCK TABLE "{table}" IN ACCESS EXCLUSIVE MODE')
                locked.set()
                await asyncio.to_thread(release.wait, 60)
        finally:
            await conn.close()

    thread = threading.Thread(target=lambda: asyncio.run(hold()), daemon=True)
    thread.start()
    assert locked.wait(10), "could not lock the table"
    try:
        yield
    finally:
        release.set()
        thread.join(10)


def test_a_statement_that_hangs_on_a_lock_hits_statement_timeout_and_resumes(
    env: dict[str, str], start_serve: Callable[..., ServeProcess]
) -> None:
    """Postgres answers but the COPY waits on a lock: the server's statement_timeout cancels it
    (57014), which is retried like any outage, until the lock goes away."""
    environ = {**env, **HUNG}
    url, dsn = environ["STREAMD_REDIS_URL"], environ["STREAMD_POSTGRES_DSN"]
    serve = start_serve(environ=environ)
    serve.wait_ready()
    with producing(url, rate=300) as producer:
        wait_until(lambda: count_rows(dsn) > 50, timeout=30)
        with table_locked(dsn):
            wait_until(
                lambda: any("statement timeout" in e for e in retry_errors(serve, "write")),
                timeout=30,
                message=serve.tail(20),
            )
        wait_until(lambda: serve.events("write_recovered"), timeout=30)
        producer.stop()
    assert_exact(wait_for_outcome(dsn, url, producer), serve)
    assert_no_restart(serve)
    assert serve.terminate() == 0


def test_redis_stopped_dead_mid_load_times_out_and_loses_nothing(
    env: dict[str, str],
    make_redis: Callable[..., RedisServer],
    start_serve: Callable[..., ServeProcess],
) -> None:
    """SIGSTOP: blocking reads and acks time out (redis_timeout_s + block_ms); consumers take
    their own pending entries back on the next connection."""
    redis = make_redis()
    environ = {**env, **HUNG, "STREAMD_REDIS_URL": redis.url}
    dsn = environ["STREAMD_POSTGRES_DSN"]
    serve = start_serve(environ=environ)
    serve.wait_ready()
    with producing(redis.url, rate=400) as producer:
        wait_until(lambda: count_rows(dsn, missing_ok=True) > 100, timeout=30)
        redis.pause()
        try:
            wait_until(
                lambda: any("Timeout" in e for e in retry_errors(serve, "read")),
                timeout=30,
                message=serve.tail(20),
            )
        finally:
            redis.resume()
        resumed_at = producer.produced
        wait_until(lambda: count_rows(dsn) >= resumed_at + 100, timeout=30)  # flowing again
        producer.stop()
    assert_exact(wait_for_outcome(dsn, redis.url, producer), serve)
    assert_no_restart(serve)
    assert serve.terminate() == 0


def test_stalled_then_cut_network_paths_to_both_services(
    env: dict[str, str],
    make_redis: Callable[..., RedisServer],
    make_postgres: Callable[..., PostgresServer],
    start_serve: Callable[..., ServeProcess],
) -> None:
    """Through TCP proxies: each path stalls longer than its timeout (a peer that vanished without
    a FIN: bytes are held, not lost), then every connection is reset and new ones refused for a
    moment. The producer talks to Redis directly."""
    redis, postgres = make_redis(), make_postgres()
    with TcpProxy(redis.port) as redis_proxy, TcpProxy(postgres.port) as pg_proxy:
        environ = {
            **env,
            **HUNG,
            "STREAMD_REDIS_URL": f"redis://127.0.0.1:{redis_proxy.port}/0",
            "STREAMD_POSTGRES_DSN": f"postgresql://postgres@127.0.0.1:{pg_proxy.port}/postgres",
        }
        serve = start_serve(environ=environ)
        serve.wait_ready()
        with producing(redis.url, rate=400) as producer:
            for proxy, what in ((redis_proxy, "read"), (pg_proxy, "write")):
                seen = len(retry_errors(serve, what))
                wait_until(lambda: count_rows(postgres.dsn) > producer.produced - 500, timeout=30)
                proxy.stall()
                try:
                    wait_until(
                        lambda w=what, n=seen: any(  # type: ignore[misc]
                            "Timeout" in e for e in retry_errors(serve, w)[n:]
                        ),
                        timeout=30,
                        message=serve.tail(20),
                    )
                finally:
                    proxy.resume()
            for proxy in (redis_proxy, pg_proxy):
                assert proxy.refuse() > 0
            wait_until(lambda: redis_proxy.stats.refused and pg_proxy.stats.refused, timeout=30)
            redis_proxy.accept()
            pg_proxy.accept()
            accepted_at = producer.produced
            wait_until(lambda: count_rows(postgres.dsn) >= accepted_at + 100, timeout=30)
            producer.stop()
        assert_exact(wait_for_outcome(postgres.dsn, redis.url, producer), serve)
        assert_no_restart(serve)
        assert serve.terminate() == 0


# ---------------------------------------------------------------------------------------------
# in process: a timed-out connection is never reused


@pytest.mark.parametrize("path", ["client", "consumer connection"])
async def test_redis_reader_after_a_socket_timeout_never_reads_a_stale_reply(
    path: str, make_redis: Callable[..., RedisServer], make_settings: Callable[..., Settings]
) -> None:
    """A command that timed out may still get its reply later. Both ways streamd talks to Redis
    (redis-py clients; a consumer's own RawConnection for reads and acks) must drop that
    connection, so the next command gets its own reply, not the late one."""
    server = make_redis()
    with TcpProxy(server.port) as proxy:
        settings = make_settings(
            redis_url=f"redis://127.0.0.1:{proxy.port}/0", redis_timeout_s="0.5"
        )
        client = redis_client(settings, single_connection=True)
        raw = RawConnection(client)

        async def call(*args: str) -> object:
            return await (raw.call(*args) if path != "client" else client.execute_command(*args))

        try:
            await call("SET", "a", "reply-for-a")
            await call("SET", "b", "reply-for-b")
            first_id = await call("CLIENT", "ID")
            proxy.stall()
            with pytest.raises(redis.exceptions.TimeoutError):
                await call("GET", "a")
            proxy.resume()  # the late "reply-for-a" arrives on the old connection
            assert await call("GET", "b") == b"reply-for-b"
            assert await call("CLIENT", "ID") != first_id  # a new connection
        finally:
            await raw.aclose()
            await client.aclose()


FIELDS = [b"type", b"t", b"data", b'{"ok": true}']


class _Log:
    """Records retry lines instead of printing them."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, dict[str, object]]] = []

    def warning(self, event: str, **fields: object) -> None:
        self.lines.append((event, fields))

    info = warning


async def test_a_postgres_connection_whose_command_timed_out_is_discarded(
    make_postgres: Callable[..., PostgresServer],
    make_redis: Callable[..., RedisServer],
    make_settings: Callable[..., Settings],
) -> None:
    """BatchWriter.flush against a Postgres that stops mid-write: the client timeout fires, the
    connection is terminated (never handed back to the pool), and the retry after the server
    returns commits on a new session. The old backend goes away: it was not left in a
    transaction holding locks."""
    postgres, redis_server = make_postgres(), make_redis()
    settings = make_settings(
        postgres_dsn=postgres.dsn,
        redis_url=redis_server.url,
        postgres_timeout_s="0.5",
        retry_max_s="0.2",
    )
    conn = await asyncpg.connect(settings.postgres_dsn)
    await apply_schema(conn, settings)
    await conn.close()
    pool = await postgres_pool(settings, size=1)
    client = redis_client(settings)
    try:
        await ensure_group(client, settings.stream, settings.group)
        stream = GroupStream(
            client,
            stream=settings.stream,
            group=settings.group,
            consumer="test",
            dead_stream=settings.dead_stream,
            dead_maxlen=0,
        )
        writer = BatchWriter(
            settings, pool, PostgresSink(settings.stream, "events", "dead_letter_queue")
        )
        async with pool.acquire() as conn:
            old_pid = conn.get_server_pid()
        log = _Log()
        postgres.pause()
        try:
            flush = asyncio.create_task(
                writer.flush(
                    stream, [[f"{1_800_000_000_000 + n}-0".encode(), FIELDS] for n in range(3)], log
                )
            )
            await async_wait_until(
                lambda: any(e == "write_retrying" for e, _ in log.lines), timeout=20
            )
        finally:
            postgres.resume()
        report = await asyncio.wait_for(flush, 30)
        # A clean batch is one autocommit COPY: the attempt that timed out had sent all of it, so
        # the server ran it once resumed, and the retry found the rows (duplicates). Either way:
        # exactly once, and on another connection.
        assert report.inserted + report.duplicates == 3
        assert await pool.fetchval("SELECT count(*) FROM events") == 3
        async with pool.acquire() as conn:
            assert conn.get_server_pid() != old_pid
            await async_wait_until(
                lambda: conn.fetchval(
                    "SELECT count(*) = 0 FROM pg_stat_activity WHERE pid = $1", old_pid
                ),
                timeout=20,
            )
    finally:
        await client.aclose()
        await pool.close()
