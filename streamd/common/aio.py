"""Small asyncio helpers shared by the background loops."""

from __future__ import annotations

import asyncio
import contextlib


async def wait_event(event: asyncio.Event, timeout_s: float) -> bool:
    """Sleep up to timeout_s, waking early when the event is set; True if it was set.

    Every background loop sleeps through this instead of a bare sleep, so a stop is seen at once.
    """
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), timeout=timeout_s)
    return event.is_set()
