"""Redis consumer-group helpers every layer uses: create the group, send a raw command, and tell
a missing group (NOGROUP), or a stream deleted under a blocked read, from other refusals."""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
import redis.exceptions


async def ensure_group(
    client: aioredis.Redis, stream: str, group: str, *, mkstream: bool = True
) -> bool:
    """Create the consumer group (and the stream, unless mkstream is False) if missing; True if
    it was created. Without mkstream, a stream that does not exist is left alone (False).

    A new group starts at the beginning of the stream, so entries written before streamd ever ran
    are ingested too.
    """
    try:
        await client.xgroup_create(stream, group, id="0", mkstream=mkstream)
    except redis.exceptions.ResponseError as exc:
        if "BUSYGROUP" in str(exc):
            return False
        if not mkstream and "requires the key to exist" in str(exc):
            return False
        raise
    return True


async def command(client: aioredis.Redis, *args: Any) -> Any:
    """A raw command; its reply is returned as hiredis parsed it (see RAW_REPLY_COMMANDS)."""
    return await client.execute_command(*args)  # type: ignore[no-untyped-call]


def is_nogroup(exc: BaseException) -> bool:
    return isinstance(exc, redis.exceptions.ResponseError) and str(exc).startswith("NOGROUP")


def group_gone(exc: BaseException) -> str | None:
    """What happened, when Redis's reply says the stream or its consumer group is no longer there
    (an operator's XGROUP DESTROY, DEL or FLUSHALL, a key that expired); None for anything else.
    A consumer blocked in XREADGROUP is woken with such a reply at once."""
    if not isinstance(exc, redis.exceptions.ResponseError):
        return None
    text = str(exc)
    if text.startswith("UNBLOCKED") and "no longer exists" in text:
        return "the stream was deleted (DEL, FLUSHDB, FLUSHALL or an expiry)"
    if text.startswith("NOGROUP"):
        if "no longer exists" in text:  # said to a client blocked on the group
            return "the consumer group was destroyed (XGROUP DESTROY)"
        return "the stream or its consumer group does not exist (deleted, or destroyed)"
    if text == "no such key":  # XINFO on a stream that is gone
        return "the stream does not exist (deleted)"
    return None
