"""Retrying an operation through transient faults, and which faults are worth retrying.

A fault is retried when waiting can fix it: a service down or restarting, a timeout, a lost
connection, a server refusing for lack of resources, or a Postgres error that is not about the data
(a dropped table, a missing privilege: an operator can fix those while streamd waits, holding the
batch unacknowledged). Data errors never come here: the sink isolates the rows Postgres refuses.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import asyncpg
import redis.exceptions

from streamd.common.backoff import Backoff

T = TypeVar("T")

TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # includes ConnectionError and socket errors
    TimeoutError,
    redis.exceptions.ConnectionError,  # includes BusyLoadingError
    redis.exceptions.TimeoutError,
    redis.exceptions.TryAgainError,
    redis.exceptions.ReadOnlyError,  # a failover demoted the server we talk to
    asyncpg.InterfaceError,  # connection closed or in a bad state
    asyncpg.exceptions._base.InternalClientError,  # protocol state after a cut connection
    asyncpg.PostgresError,  # server-side errors that are not about the rows (see module doc)
)


def describe(exc: BaseException) -> str:
    """One line for a log: the exception class and its message, no traceback."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def retry_transient(
    operation: Callable[[], Awaitable[T]],
    *,
    backoff: Backoff,
    log: Any,
    what: str,
    on_retry: Callable[[BaseException], None] | None = None,
) -> T:
    """Run `operation` until it succeeds, sleeping a backoff after each transient fault.

    Non-transient exceptions propagate. Cancellation (shutdown) interrupts the wait at once.
    """
    while True:
        try:
            result = await operation()
        except TRANSIENT_ERRORS as exc:
            delay = backoff.next_delay()
            log.warning(
                f"{what}_retrying",
                error=describe(exc),
                attempt=backoff.failures,
                retry_in_s=round(delay, 3),
            )
            if on_retry is not None:
                on_retry(exc)
            await asyncio.sleep(delay)
        else:
            if backoff.failures:
                log.info(f"{what}_recovered", attempts=backoff.failures)
                backoff.reset()
            return result
