"""One consumer's reads over many streams: a single XREADGROUP names every stream it consumes.

`STREAMS k1 k2 ... kn > > ... >` costs one round trip and one connection whatever n is; Redis
applies COUNT to each key, so one busy stream cannot crowd the others out of a reply. What a
consumer may hold is bounded by how it asks (worker/consumer.py): COUNT is the room left in the
batch divided by the number of keys asked for.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import redis.asyncio as aioredis

from streamd.pipeline.envelope import RawEntry
from streamd.pipeline.streams import GroupStream, RawConnection

StreamEntries = tuple[GroupStream, list[RawEntry]]


class GroupReader:
    """The streams of one consumer (`<host>:<pid>:<task>`), all over one connection."""

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        group: str,
        consumer: str,
        dead_stream_for: Callable[[str], str],
        dead_maxlen: int,
        named: Callable[[str], bool] = lambda _name: True,
    ) -> None:
        self.client = client
        self.group = group
        self.consumer = consumer
        self.raw = RawConnection(client)
        self._dead_stream_for = dead_stream_for
        self._dead_maxlen = dead_maxlen
        self._named = named  # True for a stream the config names (created when missing)
        self._streams: dict[str, GroupStream] = {}
        # Streams a pattern found that were deleted since: left out of reads until the next
        # discovery (which finds them again if they are back).
        self.gone: set[str] = set()

    @property
    def client_id(self) -> int | None:
        return self.raw.client_id

    def stream(self, name: str) -> GroupStream:
        """This consumer's handle of one stream (acks, dead letters, leases), made once."""
        handle = self._streams.get(name)
        if handle is None:
            handle = self._streams[name] = GroupStream(
                self.client,
                stream=name,
                group=self.group,
                consumer=self.consumer,
                dead_stream=self._dead_stream_for(name),
                dead_maxlen=self._dead_maxlen,
                raw=self.raw,
                create_missing=self._named(name),
            )
        return handle

    def keep_only(self, names: Sequence[str]) -> None:
        """After a discovery: forget the handles of streams no longer consumed (bounded memory
        as patterns move), and read again the ones found gone."""
        self.gone.clear()
        if len(self._streams) > len(names):
            wanted = set(names)
            for name in [n for n in self._streams if n not in wanted]:
                del self._streams[name]

    async def read(
        self, names: Sequence[str], count: int, block_ms: int | None, *, own_pending: bool = False
    ) -> list[StreamEntries]:
        """New entries of these streams (XREADGROUP ... >), per stream that has any.

        own_pending: instead, the oldest entries already delivered to this consumer and not yet
        acknowledged (XREADGROUP ... 0).
        """
        if self.gone:
            names = [n for n in names if n not in self.gone]
        if not names:
            return []
        args: list[Any] = ["XREADGROUP", "GROUP", self.group, self.consumer, "COUNT", count]
        if block_ms is not None:
            args += ["BLOCK", block_ms]
        args.append("STREAMS")
        args.extend(names)
        args.extend(["0" if own_pending else ">"] * len(names))
        reply = await self.raw.call(*args)
        if not reply:
            return []
        # RESP2: [[stream, entries], ...]; RESP3 would be {stream: entries}.
        pairs = reply.items() if isinstance(reply, dict) else reply
        out: list[StreamEntries] = []
        for key, entries in pairs:
            if entries:
                out.append((self.stream(key.decode()), entries))
        return out

    async def recover(self, exc: BaseException, names: Sequence[str], log: Any) -> bool:
        """After a read failed because a stream or its group is gone: recreate what is missing
        (each stream's own recover logs it). True when exc was such a fault."""
        for name in names:
            handle = self.stream(name)
            if not await handle.recover(exc, log):
                return False
            if not handle.create_missing and not await self.client.exists(name):
                self.gone.add(name)
        return bool(names)

    async def aclose(self) -> None:
        await self.raw.aclose()
