"""Retrying an operation through transient faults, with a backoff and one log line per fault.

What counts as transient is decided in backends/faults.py (TRANSIENT_ERRORS): a service down or
restarting, a lost connection, or a Postgres error that is not about the data, which an operator
can fix while streamd waits, holding the batch unacknowledged.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from streamd.backends.faults import TRANSIENT_ERRORS, describe, permission_denied
from streamd.common.backoff import Backoff

T = TypeVar("T")


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
            log_fault(log, what, exc, attempt=backoff.failures, retry_in_s=round(delay, 3))
            if on_retry is not None:
                on_retry(exc)
            await asyncio.sleep(delay)
        else:
            if backoff.failures:
                log.info(f"{what}_recovered", attempts=backoff.failures)
                backoff.reset()
            return result


def log_fault(log: Any, what: str, exc: BaseException, **fields: Any) -> None:
    """One line for a fault about to be retried: `<what>_retrying` (warning), or, for a Redis
    permission refused by its ACL, `redis_permission_denied` (error) naming the command: that
    one heals only when an operator grants it."""
    refused = permission_denied(exc)
    if refused is not None:
        log.error("redis_permission_denied", doing=what, error=describe(exc), **refused, **fields)
    else:
        log.warning(f"{what}_retrying", error=describe(exc), **fields)
