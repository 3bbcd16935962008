"""The Redis side of a batch: the consumer group, reading, and acknowledging (with dead letters).

Replies of XREADGROUP and XAUTOCLAIM arrive as hiredis parsed them (lists of bytes); streamd
never builds a dict per entry.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions

from streamd import dlq
from streamd.envelope import RawEntry, Rejection


async def ensure_group(client: aioredis.Redis, stream: str, group: str) -> bool:
    """Create the consumer group (and the stream) if missing; True if it was created.

    A new group starts at the beginning of the stream, so entries written before streamd ever ran
    are ingested too.
    """
    try:
        await client.xgroup_create(stream, group, id="0", mkstream=True)
    except redis.exceptions.ResponseError as exc:
        if "BUSYGROUP" in str(exc):
            return False
        raise
    return True


async def command(client: aioredis.Redis, *args: Any) -> Any:
    """A raw command; its reply is returned as hiredis parsed it (see RAW_REPLY_COMMANDS)."""
    return await client.execute_command(*args)  # type: ignore[no-untyped-call]


def is_nogroup(exc: BaseException) -> bool:
    return isinstance(exc, redis.exceptions.ResponseError) and str(exc).startswith("NOGROUP")


class GroupStream:
    """One consumer's view of the stream: read new entries, acknowledge committed ones."""

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        stream: str,
        group: str,
        consumer: str,
        dead_stream: str,
        dead_maxlen: int,
    ) -> None:
        self.client = client
        self.stream = stream
        self.group = group
        self.consumer = consumer
        self.dead_stream = dead_stream
        self.dead_maxlen = dead_maxlen
        self._dead_letter = client.register_script(dlq.ACK_AND_DEAD_LETTER)

    async def read(
        self, count: int, block_ms: int | None, *, own_pending: bool = False
    ) -> list[RawEntry]:
        """New entries for this consumer (XREADGROUP ... >); [] when there are none.

        own_pending: instead, the oldest entries already delivered to this consumer and not yet
        acknowledged (XREADGROUP ... 0).
        """
        args: list[Any] = ["XREADGROUP", "GROUP", self.group, self.consumer, "COUNT", count]
        if block_ms is not None:
            args += ["BLOCK", block_ms]
        args += ["STREAMS", self.stream, "0" if own_pending else ">"]
        reply = await command(self.client, *args)
        if not reply:
            return []
        # RESP2: [[stream, entries]]; RESP3 would be {stream: entries}.
        return next(iter(reply.values())) if isinstance(reply, dict) else reply[0][1]

    async def ack(self, ids: Iterable[bytes], dead: list[Rejection]) -> int:
        """XACK the committed entries and, atomically per entry, dead-letter the rejected ones.

        Returns how many dead letters this call wrote to the dead stream: an entry another
        consumer already acknowledged (it was reclaimed and committed twice) is not written again.
        """
        ids = list(ids)
        if not dead:
            if ids:
                await self.client.xack(self.stream, self.group, *ids)
            return 0
        async with self.client.pipeline(transaction=False) as pipe:
            if ids:
                pipe.xack(self.stream, self.group, *ids)
            await self._dead_letter(
                keys=[self.stream, self.dead_stream],
                args=dlq.script_args(self.group, self.dead_maxlen, dead),
                client=pipe,
            )
            replies = await pipe.execute()
        return int(replies[-1])

    async def renew(self, ids: list[bytes]) -> None:
        """Reset the idle time of entries this consumer holds (XCLAIM JUSTID does not count as a
        delivery), so reapers elsewhere do not take over a batch that is slow, not abandoned."""
        await command(
            self.client, "XCLAIM", self.stream, self.group, self.consumer, 0, *ids, "JUSTID"
        )

    async def client_id(self) -> int:
        return int(await self.client.client_id())
