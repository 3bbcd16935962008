"""Start-up checks: reach Redis and Postgres, apply the schema, create the consumer group.

Failures become one clear line naming the target, with an exit code that says whether a restart
can help: ServiceUnavailable (69) for an outage, BootError (78) for credentials, a missing
database, TLS verification or privileges.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import asyncpg
import redis.asyncio as aioredis
import redis.exceptions

from streamd.backends.connections import (
    describe_postgres,
    describe_redis,
    postgres_connect,
    redis_client,
)
from streamd.backends.grants import privilege_problem, schema_exists
from streamd.backends.schema import apply_schema
from streamd.common.backoff import Backoff
from streamd.config.settings import Settings
from streamd.errors import BootError, ServiceUnavailable, StreamdError
from streamd.pipeline.retry import describe
from streamd.pipeline.streams import ensure_group

T = TypeVar("T")

# The start-up wait polls a service still booting after 0.2, 0.4, ... 5 s (no jitter), until the
# next delay would go past startup_wait_s.
STARTUP_RETRY_INITIAL_S = 0.2
STARTUP_RETRY_MAX_S = 5.0

_PG_BOOT_ERRORS = (
    asyncpg.InvalidAuthorizationSpecificationError,  # 28xxx: bad password, no such role
    asyncpg.InvalidCatalogNameError,  # 3D000: no such database
    asyncpg.InsufficientPrivilegeError,  # 42501
    asyncpg.InvalidSchemaNameError,
)


# What a connection that fails at start can raise. A connection cut mid-query (a network reset,
# a server killed) surfaces as InterfaceError or InternalClientError ("cannot switch to state
# 15; another operation is in progress"): an outage (69), not a crash with a traceback.
_PG_FAILURES = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.exceptions._base.InternalClientError,
    OSError,
    TimeoutError,
)


# Server errors that heal with time or a restart of the server: connection trouble (08), a
# serialization failure or deadlock (40), lack of resources (53: disk full, out of memory, too
# many connections), an operator's intervention (57: shutting down, starting up, a statement
# timeout), a system I/O error (58). A worker that meets one while Postgres restarts must not
# stop the whole service as if the password were wrong (the chaos run caught exactly that).
_PG_TRANSIENT_CLASSES = ("08", "40", "53", "57", "58")
_PG_PERMANENT_STATES = ("57P04",)  # database_dropped


def _pg_transient(exc: asyncpg.PostgresError) -> bool:
    state = exc.sqlstate or ""
    return state[:2] in _PG_TRANSIENT_CLASSES and state not in _PG_PERMANENT_STATES


def postgres_error(settings: Settings, exc: BaseException, doing: str = "connect") -> StreamdError:
    target = f"Postgres at {describe_postgres(settings)}"
    if isinstance(exc, (*_PG_BOOT_ERRORS, ssl.SSLError, ValueError)):  # ValueError: a bad DSN
        return BootError(f"{target}: cannot {doing}: {describe(exc)}")
    if isinstance(exc, asyncpg.PostgresError) and not _pg_transient(exc):
        return BootError(f"{target}: cannot {doing}: {describe(exc)}")
    return ServiceUnavailable(f"{target}: cannot {doing}: {describe(exc)}")


# Refusals a Redis in trouble gives for a while: a replica during failover (READONLY), a cluster
# slot moving (TRYAGAIN), a script running (BUSY), full memory (OOM: a backlog streamd itself
# is about to drain), a replica whose primary is down (MASTERDOWN).
_REDIS_TRANSIENT = (
    redis.exceptions.ReadOnlyError,
    redis.exceptions.TryAgainError,
    redis.exceptions.OutOfMemoryError,
)
_REDIS_TRANSIENT_PREFIXES = ("BUSY ", "MASTERDOWN ")  # redis-py has no class of its own for these


def _redis_transient(exc: BaseException) -> bool:
    return isinstance(exc, _REDIS_TRANSIENT) or str(exc).startswith(_REDIS_TRANSIENT_PREFIXES)


def redis_error(settings: Settings, exc: BaseException, doing: str = "connect") -> StreamdError:
    target = f"Redis at {describe_redis(settings)}"
    text = str(exc)
    auth = isinstance(exc, redis.exceptions.AuthenticationError) or any(
        marker in text for marker in ("NOAUTH", "WRONGPASS", "invalid password", "certificate")
    )
    permanent = isinstance(exc, ssl.SSLError | redis.exceptions.ResponseError)
    if auth or (permanent and not _redis_transient(exc)):
        return BootError(f"{target}: cannot {doing}: {describe(exc)}")
    return ServiceUnavailable(f"{target}: cannot {doing}: {describe(exc)}")


async def _with_startup_wait(settings: Settings, attempt: Callable[[], Awaitable[T]]) -> T:
    """Retry an outage (not a boot error) for up to startup_wait_s, for services still booting."""
    deadline = time.monotonic() + settings.startup_wait_s
    backoff = Backoff(
        STARTUP_RETRY_INITIAL_S, STARTUP_RETRY_MAX_S, healthy_after_s=None, jitter=False
    )
    while True:
        try:
            return await attempt()
        except ServiceUnavailable:
            delay = backoff.next_delay()
            if time.monotonic() + delay > deadline:
                raise
            await asyncio.sleep(delay)


async def check_redis(settings: Settings, *, create_group: bool = True) -> None:
    async def attempt() -> None:
        client: aioredis.Redis = redis_client(settings)
        try:
            await client.ping()
            if create_group:
                await ensure_group(client, settings.stream, settings.group)
        except (redis.exceptions.RedisError, OSError, ssl.SSLError) as exc:
            raise redis_error(settings, exc) from None
        finally:
            await client.aclose()

    await _with_startup_wait(settings, attempt)


async def check_postgres(
    settings: Settings, *, init_schema: bool = True, serving: bool = False
) -> None:
    """Connect and apply the schema. serving: the role may be one that cannot create (the owner
    ran `streamd db init`), but must hold every privilege serve needs (grants.py)."""

    async def attempt() -> None:
        try:
            conn = await postgres_connect(settings)
        except (*_PG_FAILURES, ValueError) as exc:
            raise postgres_error(settings, exc) from None
        try:
            if init_schema:
                await _apply_schema(conn, settings, may_use_existing=serving)
            problem = await privilege_problem(conn, settings) if serving else None
        except BaseException as exc:
            conn.terminate()  # maybe cut mid-query: a polite close could fail (or hang) too
            if isinstance(exc, _PG_FAILURES):
                raise postgres_error(settings, exc, "apply the schema") from None
            raise
        try:
            await conn.close(timeout=5)
        except _PG_FAILURES:
            conn.terminate()
        if problem is not None:
            raise BootError(f"Postgres at {describe_postgres(settings)}: {problem}")

    await _with_startup_wait(settings, attempt)


async def _apply_schema(
    conn: asyncpg.Connection, settings: Settings, *, may_use_existing: bool
) -> None:
    try:
        await apply_schema(conn, settings)
    except asyncpg.InsufficientPrivilegeError as exc:
        # A least-privilege role cannot run CREATE ... IF NOT EXISTS even when the tables exist
        # (Postgres checks CREATE on the schema first): it uses the owner's tables as they are.
        if may_use_existing and await schema_exists(conn, settings):
            return
        raise BootError(
            f"Postgres at {describe_postgres(settings)}: cannot apply the schema: "
            f"{describe(exc)} (run `streamd db init` as a role that may create the tables; "
            "see conf/least-privilege.sql)"
        ) from None


async def preflight(settings: Settings) -> None:
    """Everything `serve` needs before it consumes: both services, the schema, the group."""
    await check_postgres(settings, serving=True)
    await check_redis(settings)
