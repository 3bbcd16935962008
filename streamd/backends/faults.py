"""Which Redis and Postgres faults heal with time and which need an operator, in one place.

Two decisions, because a worker in flight and a worker starting can afford different answers:

- `TRANSIENT_ERRORS`, in flight (pipeline/retry.py, the consumer, the reaper): is waiting worth
  it? Yes for a service down or restarting, a timeout, a lost connection, a Redis failover or slot
  move, and any Postgres error that is not about the data: a dropped table or a missing privilege
  is retried too, since an operator can fix it while streamd waits, holding the batch
  unacknowledged. Data errors never come here: the sink isolates the rows Postgres refuses.
  A Redis ACL refusal (NOPERM: a permission revoked while running) is retried too, for the same
  reason, with an error line that names the command (`permission_denied`), never silently.
  Redis's other refusals (OOM, BUSY, MASTERDOWN) are not retried in place: the worker stops, and
  the start-up checks of its restart decide.
- `needs_operator(exc)`, at start (backends/preflight.py): is it a mistake no restart can fix
  (BootError, exit 78: credentials, a missing database, TLS verification, privileges, a bad URL),
  rather than an outage (ServiceUnavailable, exit 69)? A worker that meets a service restarting
  must not stop the whole service as if the password were wrong (the chaos run caught exactly
  that), so only what is known not to heal counts as a boot error.
"""

from __future__ import annotations

import re
import ssl
from typing import Any

import asyncpg
import redis.exceptions

# Faults a Postgres operation can raise that are about Postgres, not about streamd's code. A
# connection cut mid-query (a network reset, a server killed) surfaces as InterfaceError or
# InternalClientError ("cannot switch to state 15; another operation is in progress"): at start,
# an outage (69), not a crash with a traceback.
POSTGRES_FAULTS = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.exceptions._base.InternalClientError,
    OSError,
    TimeoutError,
)

# Likewise for Redis (redis-py turns socket errors into its ConnectionError; ssl.SSLError is an
# OSError).
REDIS_FAULTS = (
    redis.exceptions.RedisError,
    OSError,
    # The cluster client's own: no slot map yet, or redis_cluster = true on a single Redis.
    redis.exceptions.RedisClusterException,
)

# --- in flight --------------------------------------------------------------------------------

TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # includes ConnectionError and socket errors
    TimeoutError,
    redis.exceptions.ConnectionError,  # includes BusyLoadingError
    redis.exceptions.TimeoutError,
    redis.exceptions.TryAgainError,
    redis.exceptions.ReadOnlyError,  # a failover demoted the server we talk to
    # Redis Cluster: a slot moved (MOVED, ASK), a master failed over (CLUSTERDOWN while its
    # replica takes over), a slot not yet in the client's map. The slot map is refreshed
    # (backends/cluster.py) and the command sent again; redis-py follows MOVED itself.
    redis.exceptions.AskError,  # MovedError too
    redis.exceptions.ClusterDownError,  # MasterDownError too
    redis.exceptions.SlotNotCoveredError,
    redis.exceptions.NoPermissionError,  # an ACL revoked while running (see module doc)
    asyncpg.InterfaceError,  # connection closed or in a bad state
    asyncpg.exceptions._base.InternalClientError,  # protocol state after a cut connection
    asyncpg.PostgresError,  # server-side errors that are not about the rows (see module doc)
)

# --- at start ---------------------------------------------------------------------------------

# Postgres server errors that heal with time or a restart of the server: connection trouble (08),
# a serialization failure or deadlock (40), lack of resources (53: disk full, out of memory, too
# many connections), an operator's intervention (57: shutting down, starting up, a statement
# timeout), a system I/O error (58). Any other SQLSTATE (28 credentials, 3D000 no such database,
# 42501 privileges, 3F000 no such schema, 42P01 no such table ...) needs an operator.
_PG_TRANSIENT_CLASSES = ("08", "40", "53", "57", "58")
_PG_PERMANENT_STATES = ("57P04",)  # database_dropped

# Refusals a Redis in trouble gives for a while: a replica during failover (READONLY), a cluster
# slot moving (TRYAGAIN), a script running (BUSY), full memory (OOM: a backlog streamd itself
# is about to drain), a replica whose primary is down (MASTERDOWN).
_REDIS_TRANSIENT = (
    redis.exceptions.ReadOnlyError,
    redis.exceptions.TryAgainError,
    redis.exceptions.AskError,
    redis.exceptions.ClusterDownError,
    redis.exceptions.OutOfMemoryError,
)
_REDIS_TRANSIENT_PREFIXES = ("BUSY ", "MASTERDOWN ")  # redis-py has no class of its own for these
# Words of Redis's replies, and of redis-py's errors, about credentials and TLS.
_REDIS_AUTH_MARKERS = ("NOAUTH", "WRONGPASS", "invalid password", "certificate")


def _postgres_heals(exc: asyncpg.PostgresError) -> bool:
    state = exc.sqlstate or ""
    return state[:2] in _PG_TRANSIENT_CLASSES and state not in _PG_PERMANENT_STATES


def _redis_heals(exc: redis.exceptions.RedisError) -> bool:
    return isinstance(exc, _REDIS_TRANSIENT) or str(exc).startswith(_REDIS_TRANSIENT_PREFIXES)


def needs_operator(exc: BaseException) -> bool:
    """At start: True when no restart can fix the fault (a boot error), False for an outage."""
    if isinstance(exc, redis.exceptions.RedisClusterException):
        # "Cluster mode is not enabled on this node": redis_cluster = true, a single Redis.
        return "not enabled" in str(exc)
    if isinstance(exc, redis.exceptions.RedisError):
        text = str(exc)
        if isinstance(exc, redis.exceptions.AuthenticationError) or any(
            marker in text for marker in _REDIS_AUTH_MARKERS
        ):
            return True
        return isinstance(exc, redis.exceptions.ResponseError) and not _redis_heals(exc)
    if isinstance(exc, ssl.SSLError | ValueError):  # TLS verification; ValueError: a bad DSN
        return True
    if isinstance(exc, asyncpg.PostgresError):
        return not _postgres_heals(exc)
    return False  # the connection itself: refused, reset, timed out


def describe(exc: BaseException) -> str:
    """One line for a log: the exception class and its message, no traceback."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


_NOPERM_COMMAND = re.compile(r"permissions to run the '([^']+)' command")


def permission_denied(exc: BaseException) -> dict[str, Any] | None:
    """For a Redis ACL refusal: what was refused, as log fields ({"command": "xinfo|consumers"}
    or {"key": "..."}); None for any other fault."""
    if not isinstance(exc, redis.exceptions.NoPermissionError):
        return None
    command = getattr(exc, "command", None)  # a ScriptPermissionError knows it
    if getattr(exc, "key_refused", False) or "permissions to access" in str(exc):
        return {"key": "one of the keys of the call (the stream, its dead-letter stream)"}
    command = command or permission_command(exc)
    return {"command": command or "unknown", "acl": f"+{command}" if command else ""}


def permission_command(exc: BaseException) -> str | None:
    """The command Redis's NOPERM names ('xinfo|consumers'), if it names one."""
    found = _NOPERM_COMMAND.search(str(exc))
    return found.group(1) if found else None
