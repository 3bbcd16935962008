"""Start-up checks: reach Redis and Postgres, apply the schema, create the consumer group.

Failures become one clear line naming the target, with an exit code that says whether a restart
can help: ServiceUnavailable (69) for an outage, BootError (78) for credentials, a missing
database, TLS verification or privileges (which faults are which: backends/faults.py).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable, Sequence
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
from streamd.backends.faults import (
    POSTGRES_FAULTS,
    REDIS_FAULTS,
    describe,
    needs_operator,
    permission_command,
)
from streamd.backends.grants import privilege_problem, schema_exists
from streamd.backends.redis_acl import Need, Refusal, describe_refusals, grant, refused, username
from streamd.backends.redis_groups import ensure_group
from streamd.backends.schema import apply_schema
from streamd.common.backoff import Backoff
from streamd.config.settings import Settings
from streamd.config.tables import is_pattern
from streamd.errors import BootError, ServiceUnavailable, StreamdError

T = TypeVar("T")

# The start-up wait polls a service still booting after 0.2, 0.4, ... 5 s (no jitter), until the
# next delay would go past startup_wait_s.
STARTUP_RETRY_INITIAL_S = 0.2
STARTUP_RETRY_MAX_S = 5.0


# PgBouncer's refusal of a startup parameter it does not know (ignore_startup_parameters unset).
_REFUSED_PARAMETER = re.compile(r"unsupported startup parameter: (\S+)")


def postgres_error(settings: Settings, exc: BaseException, doing: str = "connect") -> StreamdError:
    target = f"Postgres at {describe_postgres(settings)}"
    refused = (
        _REFUSED_PARAMETER.search(str(exc)) if isinstance(exc, asyncpg.PostgresError) else None
    )
    if refused:
        # Protocol class 08, which looks like an outage; a restart cannot fix it.
        return BootError(
            f"{target}: cannot {doing}: the server refuses the startup parameter "
            f"{refused.group(1)}, as a connection pooler does: set postgres_pooler = "
            '"pgbouncer" (or "auto"), and streamd sets its timeouts per transaction instead'
        )
    return _start_error(target, exc, doing)


def redis_error(settings: Settings, exc: BaseException, doing: str = "connect") -> StreamdError:
    return _start_error(f"Redis at {describe_redis(settings)}", exc, doing)


def _start_error(target: str, exc: BaseException, doing: str) -> StreamdError:
    """A boot error (78) when no restart can fix the fault, else an outage (69): faults.py."""
    kind = BootError if needs_operator(exc) else ServiceUnavailable
    return kind(f"{target}: cannot {doing}: {describe(exc)}")


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


async def check_redis(
    settings: Settings,
    *,
    create_group: bool = True,
    needs: Sequence[Need] = (),
    needed_by: str = "serve",
) -> list[Refusal]:
    """Reach Redis, check that its ACL allows every one of `needs` (redis_acl.py), create the
    group. A required need refused is a boot error naming the commands and the ACL SETUSER rule
    that grants them; the optional ones refused are returned, for a warning."""

    async def attempt() -> list[Refusal]:
        client: aioredis.Redis = redis_client(settings)
        try:
            missing = await refused(client, needs, username(settings)) if needs else []
            required = [r for r in missing if not r.need.optional]
            if required:
                raise BootError(_acl_message(settings, required, needed_by))
            await client.ping()
            if create_group:
                # The streams the config names; those patterns find get theirs when found.
                for name in settings.stream_names:
                    if not is_pattern(name):
                        await ensure_group(client, name, settings.group)
        except redis.exceptions.NoPermissionError as exc:
            # Refused while connecting (SELECT of the URL's database), or with no needs given.
            refusal = [Refusal(Need(permission_command(exc) or "unknown"), str(exc))]
            raise BootError(_acl_message(settings, refusal, needed_by)) from None
        except REDIS_FAULTS as exc:
            raise redis_error(settings, exc) from None
        finally:
            await client.aclose()
        return [r for r in missing if r.need.optional]

    return await _with_startup_wait(settings, attempt)


def _acl_message(settings: Settings, required: Sequence[Refusal], needed_by: str) -> str:
    user = username(settings)
    return (
        f"Redis at {describe_redis(settings)}: the ACL of user {user!r} does not let it "
        f"{describe_refusals(required)}, which {needed_by} needs; allow it with: "
        f"{grant(user, required)} (the whole minimal ACL: streamd config --redis-acl)"
    )


async def check_postgres(
    settings: Settings, *, init_schema: bool = True, serving: bool = False
) -> None:
    """Connect and apply the schema. serving: the role may be one that cannot create (the owner
    ran `streamd db init`), but must hold every privilege serve needs (grants.py)."""

    async def attempt() -> None:
        try:
            conn = await postgres_connect(settings)
        except (*POSTGRES_FAULTS, ValueError) as exc:
            raise postgres_error(settings, exc) from None
        try:
            if init_schema:
                await _apply_schema(conn, settings, may_use_existing=serving)
            problem = await privilege_problem(conn, settings) if serving else None
        except BaseException as exc:
            conn.terminate()  # maybe cut mid-query: a polite close could fail (or hang) too
            if isinstance(exc, POSTGRES_FAULTS):
                raise postgres_error(settings, exc, "apply the schema") from None
            raise
        try:
            await conn.close(timeout=5)
        except POSTGRES_FAULTS:
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


async def preflight(settings: Settings, redis_needs: Sequence[Need] = ()) -> list[Refusal]:
    """Everything `serve` needs before it consumes: both services, the schema, Redis's ACL, the
    group. Returns the optional Redis permissions the ACL refuses (for a warning)."""
    await check_postgres(settings, serving=True)
    return await check_redis(settings, needs=redis_needs)
