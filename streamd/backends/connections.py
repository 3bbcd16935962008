"""Building Redis clients and Postgres connections from Settings (passwords, TLS, timeouts).

Only this module turns settings into connection arguments, so every command connects the same way.
Retries are streamd's own (capped backoff with jitter, common/backoff.py): the clients are built
not to retry behind our back, so a timeout surfaces when it happens.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator
from typing import Any, cast
from urllib.parse import urlsplit

import asyncpg
import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from streamd.backends.cluster import cluster_mode, detect_cluster
from streamd.config.settings import Settings, mask_url


def _identity(response: Any, **_options: Any) -> Any:
    return response


class _ClosedTransportIsConnectionError:
    """A command written to a connection that the peer reset while it sat idle raises, under
    uvloop, RuntimeError("unable to perform operation on <TCPTransport closed=True>; the handler
    is closed") where asyncio raises an OSError. redis-py has already dropped the connection by
    then; report it as the lost connection it is, so the caller's retry reconnects instead of the
    worker crashing (found by tests/test_hung.py, network cut through a proxy)."""

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        try:
            await super().send_packed_command(command, check_health)  # type: ignore[misc]
        except RuntimeError as exc:
            if "closed" not in str(exc):
                raise
            raise redis.exceptions.ConnectionError(f"connection lost: {exc}") from None


class _Connection(_ClosedTransportIsConnectionError, aioredis.Connection):
    pass


class _SSLConnection(_ClosedTransportIsConnectionError, aioredis.SSLConnection):
    pass


class _UnixConnection(_ClosedTransportIsConnectionError, aioredis.UnixDomainSocketConnection):
    pass


_CONNECTION_CLASSES: dict[type[Any], type[Any]] = {
    aioredis.Connection: _Connection,
    aioredis.SSLConnection: _SSLConnection,
    aioredis.UnixDomainSocketConnection: _UnixConnection,
}


# Replies streamd parses itself, per batch: redis-py's callbacks would build a dict per entry.
RAW_REPLY_COMMANDS = ("XREADGROUP", "XAUTOCLAIM", "XCLAIM")


def redis_kwargs(
    settings: Settings,
    *,
    extra_timeout_s: float = 0.0,
    max_connections: int | None = None,
    client_name: str | None = None,
) -> dict[str, Any]:
    """Arguments of a Redis client (one node or a cluster) from settings."""
    kwargs: dict[str, Any] = {
        "socket_timeout": settings.redis_timeout_s + extra_timeout_s,
        "socket_connect_timeout": settings.redis_timeout_s,
        "retry": Retry(NoBackoff(), 0),
    }
    if max_connections is not None:
        kwargs["max_connections"] = max_connections
    if client_name:
        kwargs["client_name"] = client_name
    if settings.redis_password:
        kwargs["password"] = settings.redis_password
    if urlsplit(settings.redis_url).scheme == "rediss":
        kwargs["ssl_cert_reqs"] = "required"
        if settings.redis_ca_file:
            kwargs["ssl_ca_certs"] = settings.redis_ca_file
        if settings.redis_cert_file:
            kwargs["ssl_certfile"] = settings.redis_cert_file
        if settings.redis_key_file:
            kwargs["ssl_keyfile"] = settings.redis_key_file
    return kwargs


def redis_client(
    settings: Settings,
    *,
    single_connection: bool = False,
    extra_timeout_s: float = 0.0,
    max_connections: int | None = None,
    client_name: str | None = None,
) -> aioredis.Redis:
    """A Redis client. `extra_timeout_s` covers BLOCK time for clients that do blocking reads.

    In a Redis Cluster (redis_cluster, or detected): redis-py's RedisCluster, which offers the
    same commands and routes each by its key (backends/cluster.py); max_connections is then
    per node. It is typed as a Redis client, the interface streamd uses of either."""
    kwargs = redis_kwargs(
        settings,
        extra_timeout_s=extra_timeout_s,
        max_connections=max_connections,
        client_name=client_name,
    )
    if cluster_mode(settings, kwargs):
        return cast(aioredis.Redis, _cluster_client(settings, kwargs))
    kwargs["single_connection_client"] = single_connection
    client = aioredis.Redis.from_url(settings.redis_url, **kwargs)
    pool = client.connection_pool  # no connection exists yet: they are made on first use
    pool.connection_class = _CONNECTION_CLASSES.get(pool.connection_class, pool.connection_class)
    for command in RAW_REPLY_COMMANDS:
        client.set_response_callback(command, _identity)
    return client


def resolve_cluster(settings: Settings) -> Settings:
    """settings with redis_cluster 'auto' replaced by what Redis says, when it can be reached:
    names that depend on it (the dead streams', config/sharding.py) are then decided once.
    Unreachable: unchanged, and the caller's own connection reports the outage."""
    if settings.redis_cluster != "auto":
        return settings
    try:
        enabled = detect_cluster(settings, redis_kwargs(settings))
    except (redis.exceptions.RedisError, OSError):
        return settings
    return dataclasses.replace(settings, redis_cluster=enabled)


def _cluster_client(settings: Settings, kwargs: dict[str, Any]) -> RedisCluster:
    if kwargs.pop("ssl_cert_reqs", None):
        kwargs["ssl"] = True
    # The URL's database: a cluster has only 0, and RedisCluster refuses any db argument.
    url = urlsplit(settings.redis_url)._replace(path="").geturl()
    client = RedisCluster.from_url(url, **kwargs)
    # Nodes are made from these arguments as the client learns them: our connection classes.
    manager = client.nodes_manager
    found = manager.connection_kwargs.get("connection_class", aioredis.Connection)
    manager.connection_kwargs["connection_class"] = _CONNECTION_CLASSES.get(found, found)
    for node in manager.startup_nodes.values():
        kind = node.connection_class
        node.connection_class = _CONNECTION_CLASSES.get(kind, kind)
    for command in RAW_REPLY_COMMANDS:
        client.set_response_callback(command, _identity)
    return client


class PostgresConnection(asyncpg.Connection):  # type: ignore[misc]
    """asyncpg's Connection, knowing how it reaches Postgres.

    `transaction_setup` holds the SET LOCAL statements that give a transaction streamd's
    timeouts when the session cannot hold them (a pooler between us and Postgres hands each
    transaction to whichever server connection is free); it is empty when the session has them.
    """

    transaction_setup = ""


def behind_pooler(conn: asyncpg.Connection) -> bool:
    """Whether conn (or a pool's proxy of it) goes through a connection pooler."""
    return bool(getattr(conn, "transaction_setup", ""))


@contextlib.asynccontextmanager
async def transaction(conn: asyncpg.Connection) -> AsyncIterator[None]:
    """A transaction with streamd's timeouts: the session's own, or SET LOCAL behind a pooler.
    Nested ones (savepoints) are plain conn.transaction(): the outer one has set them."""
    async with conn.transaction():
        setup = getattr(conn, "transaction_setup", "")
        if setup:
            await conn.execute(setup)  # simple query protocol: no prepared statement
        yield


@contextlib.asynccontextmanager
async def statement_scope(conn: asyncpg.Connection) -> AsyncIterator[None]:
    """Where one write statement runs with streamd's timeouts: in autocommit when the session
    has them (one round trip), in a transaction() behind a pooler."""
    if behind_pooler(conn):
        async with transaction(conn):
            yield
    else:
        yield


def _timeouts(settings: Settings) -> dict[str, str]:
    timeout_ms = int(settings.postgres_timeout_s * 1000)
    return {
        "statement_timeout": str(timeout_ms),
        "idle_in_transaction_session_timeout": str(timeout_ms * 2),
    }


def _set_sql(settings: Settings, scope: str) -> str:
    return "; ".join(f"SET {scope}{name} = {value}" for name, value in _timeouts(settings).items())


def postgres_kwargs(settings: Settings, *, pooled: bool = False) -> dict[str, Any]:
    """Arguments shared by asyncpg.connect and asyncpg.create_pool.

    pooled: a pooler sits in front of Postgres. It refuses startup parameters other than a few
    (PgBouncer: `unsupported startup parameter`), and in transaction mode a prepared statement
    outlives the transaction on a server connection that other clients get next (`prepared
    statement "__asyncpg_stmt_1__" already exists`). So: no timeouts at startup (transaction()
    sets them), and no statement cache (asyncpg then prepares only unnamed statements, which
    live inside one transaction).
    """
    kwargs: dict[str, Any] = {
        "dsn": settings.postgres_dsn,
        "timeout": settings.postgres_timeout_s,  # connect timeout
        # The client-side limit is a little longer, so the server's statement_timeout (which
        # leaves the connection usable) normally fires first.
        "command_timeout": settings.postgres_timeout_s + 5,
        "server_settings": {"application_name": "streamd"},
        "connection_class": PostgresConnection,
    }
    if pooled:
        kwargs["statement_cache_size"] = 0
    else:
        kwargs["server_settings"].update(_timeouts(settings))
    if settings.postgres_password:
        kwargs["password"] = settings.postgres_password
    return kwargs


# postgres_pooler = "auto", as detected by this process: postgres_dsn -> a pooler is in front.
_detected: dict[str, bool] = {}


async def detect_pooler(conn: asyncpg.Connection) -> bool:
    """True when a pooler stands between conn and Postgres. At connect, the server announces the
    process id of the session (BackendKeyData, for cancel requests); a pooler announces one of
    its own, since the client's queries may run on any of its server connections. A plain TCP
    proxy passes the server's on unchanged."""
    announced = conn.get_server_pid()
    actual = await conn.fetchval("SELECT pg_backend_pid()")
    return bool(announced != actual)


def pooler_in_use(settings: Settings) -> str:
    """For logs: 'pgbouncer' or 'none', and '(detected)' when postgres_pooler is auto."""
    if settings.postgres_pooler != "auto":
        return settings.postgres_pooler
    known = _detected.get(settings.postgres_dsn)
    if known is None:
        return "auto (not yet connected)"
    return ("pgbouncer" if known else "none") + " (detected)"


async def postgres_connect(settings: Settings) -> asyncpg.Connection:
    mode = settings.postgres_pooler
    pooled = _detected.get(settings.postgres_dsn) if mode == "auto" else mode == "pgbouncer"
    if pooled is not None:
        conn = await asyncpg.connect(**postgres_kwargs(settings, pooled=pooled))
    else:
        # Not known yet: connect as to a pooler (works for both), then look.
        conn = await asyncpg.connect(**postgres_kwargs(settings, pooled=True))
        try:
            pooled = _detected[settings.postgres_dsn] = await detect_pooler(conn)
            if not pooled:
                await conn.execute(_set_sql(settings, ""))  # the session keeps them
        except BaseException:
            conn.terminate()
            raise
    if pooled:
        conn.transaction_setup = _set_sql(settings, "LOCAL ")
    return conn


async def resolve_pooler(settings: Settings) -> bool:
    """Whether Postgres is behind a pooler: as configured, or detected (once per process)."""
    if settings.postgres_pooler != "auto":
        return settings.postgres_pooler == "pgbouncer"
    if settings.postgres_dsn not in _detected:
        conn = await postgres_connect(settings)
        await conn.close(timeout=5)
    return _detected[settings.postgres_dsn]


async def postgres_pool(settings: Settings, size: int) -> asyncpg.Pool:
    pooled = await resolve_pooler(settings)
    setup = _set_sql(settings, "LOCAL ") if pooled else ""

    async def mark(conn: PostgresConnection) -> None:
        conn.transaction_setup = setup

    # min_size=0: no background reconnect loop of the pool's own during an outage; streamd's
    # retries (with backoff and one log line each) decide when to try again.
    # reset: asyncpg's default runs a query (RESET ALL, UNLISTEN, ...) on every release, a round
    # trip per batch; streamd changes no session state, and an open transaction is still
    # rolled back by the pool before any reset hook runs.
    return await asyncpg.create_pool(
        min_size=0,
        max_size=size,
        reset=_keep_session,
        init=mark,
        **postgres_kwargs(settings, pooled=pooled),
    )


async def _keep_session(_conn: asyncpg.Connection) -> None:
    """Pool reset hook: nothing to undo."""


def describe_redis(settings: Settings) -> str:
    return mask_url(settings.redis_url)


def describe_postgres(settings: Settings) -> str:
    return mask_url(settings.postgres_dsn)
