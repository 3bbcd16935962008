"""A service in trouble while a worker starts is an outage (exit 69: the supervisor retries the
worker), never a boot error (exit 78: the whole service stops, as for a wrong password).

The chaos run caught a Postgres fast shutdown (57P01, "terminating connection due to
administrator command") during a restarted worker's start-up checks being taken for a boot error:
serve stopped for good in the middle of a routine Postgres restart.
"""

from __future__ import annotations

from collections.abc import Callable

import asyncpg
import pytest
import redis.exceptions

from streamd.backends.preflight import postgres_error, redis_error
from streamd.config.settings import Settings
from streamd.dev.servers import RedisServer
from streamd.errors import BootError, ServiceUnavailable
from tests.support.helpers import redis_client, xadd
from tests.support.streamd_cli import explain, run_streamd

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (asyncpg.AdminShutdownError("terminating connection due to administrator command"), 69),
        (asyncpg.CrashShutdownError("terminating connection due to crash of another"), 69),
        (asyncpg.CannotConnectNowError("the database system is starting up"), 69),
        (asyncpg.QueryCanceledError("canceling statement due to statement timeout"), 69),
        (asyncpg.TooManyConnectionsError("sorry, too many clients already"), 69),
        (asyncpg.DiskFullError("could not extend file: No space left on device"), 69),
        (asyncpg.DeadlockDetectedError("deadlock detected"), 69),
        (asyncpg.InterfaceError("connection is closed"), 69),
        (ConnectionResetError(104, "Connection reset by peer"), 69),
        (asyncpg.InvalidPasswordError("password authentication failed for user x"), 78),
        (asyncpg.InvalidCatalogNameError('database "x" does not exist'), 78),
        (asyncpg.InsufficientPrivilegeError("permission denied for schema public"), 78),
        (asyncpg.DatabaseDroppedError("database is being dropped"), 78),
        (asyncpg.UndefinedTableError('relation "x" does not exist'), 78),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else str(v),
)
def test_postgres_errors_at_start(settings: Settings, error: BaseException, kind: int) -> None:
    result = postgres_error(settings, error)
    assert isinstance(result, ServiceUnavailable if kind == 69 else BootError)
    assert result.exit_code == kind


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (redis.exceptions.ReadOnlyError("You can't write against a read only replica."), 69),
        (
            redis.exceptions.OutOfMemoryError("command not allowed when used memory > 'maxmemory'"),
            69,
        ),
        (redis.exceptions.BusyLoadingError("Redis is loading the dataset in memory"), 69),
        (redis.exceptions.ResponseError("BUSY Redis is busy running a script."), 69),
        (redis.exceptions.ConnectionError("Error 111 connecting"), 69),
        (redis.exceptions.AuthenticationError("invalid username-password pair"), 78),
        (redis.exceptions.ResponseError("NOPERM this user has no permissions"), 78),
        (redis.exceptions.ResponseError("ERR unknown command 'XAUTOCLAIM'"), 78),
    ],
    ids=lambda v: str(v)[:30] if isinstance(v, BaseException) else str(v),
)
def test_redis_errors_at_start(settings: Settings, error: BaseException, kind: int) -> None:
    assert redis_error(settings, error).exit_code == kind


def test_redis_out_of_memory_at_start_is_an_outage_not_a_boot_error(
    env: dict[str, str], make_redis: Callable[..., RedisServer]
) -> None:
    """A backlog that filled Redis (maxmemory, noeviction) is exactly what streamd would drain:
    a worker that cannot create its group then is in an outage, not misconfigured."""
    server = make_redis(config={"maxmemory-policy": "noeviction"})
    xadd(server.url, [{"type": "t", "data": "{}"}])
    with redis_client(server.url) as r:
        r.config_set("maxmemory", int(r.info("memory")["used_memory"]) // 2)  # full already
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            r.set("one-more", b"x")
    result = run_streamd({**env, "STREAMD_REDIS_URL": server.url}, "serve")
    assert result.returncode == 69, explain(result)
    errors = [line for line in result.stderr.splitlines() if line.startswith("streamd: error:")]
    assert len(errors) == 1 and "OutOfMemoryError" in errors[0], explain(result)
