"""One consumer's reads over many streams: a single XREADGROUP names every stream it consumes.

`STREAMS k1 k2 ... kn > > ... >` costs one round trip and one connection whatever n is; Redis
applies COUNT to each key, so one busy stream cannot crowd the others out of a reply. What a
consumer may hold is bounded by how it asks (worker/consumer.py): COUNT is the room left in the
batch divided by the number of keys asked for.

In a Redis Cluster a command may only name keys of one slot (else CROSSSLOT), so the streams are
read per slot, each slot over a connection of its own to the node serving it (streams that share
a slot move together, so that connection's routing stays right through resharding and
failovers). The slots are read at once; with several, a read first asks every slot without
blocking, and only when all are empty blocks on all of them (for at most CLUSTER_BLOCK_MS): the
first to answer ends the read and the others are woken with CLIENT UNBLOCK, so an entry on one
node never waits for another node's BLOCK to end.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import redis.asyncio as aioredis

from streamd.backends.cluster import by_slot, is_cluster_client, slot_of
from streamd.pipeline.envelope import RawEntry
from streamd.pipeline.streams import GroupStream, RawConnection

StreamEntries = tuple[GroupStream, list[RawEntry]]

# A cluster read over several slots blocks at most this long per round (see the module doc).
CLUSTER_BLOCK_MS = 100


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
        self.clustered = is_cluster_client(client)
        self._slot_raws: dict[int, RawConnection] = {}  # in a cluster: slot -> its connection
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

    def raw_for(self, name: str) -> RawConnection:
        """The connection a stream is read and acknowledged over."""
        if not self.clustered:
            return self.raw
        slot = slot_of(name)
        raw = self._slot_raws.get(slot)
        if raw is None:
            raw = self._slot_raws[slot] = RawConnection(self.client, name)
        return raw

    async def unblock(self) -> None:
        """Wake this consumer's blocked reads at once (CLIENT UNBLOCK, node by node)."""
        for raw in [self.raw, *self._slot_raws.values()]:
            await raw.unblock()

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
                raw=self.raw_for(name),
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
        if not self.clustered:
            return await self._read(self.raw, names, count, block_ms, own_pending)
        slots = list(by_slot(names).values())
        if len(slots) == 1:
            return await self._read(self.raw_for(names[0]), names, count, block_ms, own_pending)
        got = await self._read_slots(slots, count, None, own_pending)
        if got or block_ms is None:
            return got
        return await self._read_slots(slots, count, min(block_ms, CLUSTER_BLOCK_MS), own_pending)

    async def _read_slots(
        self, slots: list[list[str]], count: int, block_ms: int | None, own_pending: bool
    ) -> list[StreamEntries]:
        """One read per slot, all at once. What was delivered is returned even when another
        slot's read failed (that one is asked again next time); all failed: the first error."""
        reads = {
            asyncio.create_task(self._read(self.raw_for(k[0]), k, count, block_ms, own_pending)): (
                self.raw_for(k[0])
            )
            for k in slots
        }
        try:
            if block_ms is None:
                await asyncio.wait(reads)
            else:
                # Blocked: the first slot to answer ends the read; the others are woken (CLIENT
                # UNBLOCK: they answer at once, with nothing delivered) rather than awaited.
                _, blocked = await asyncio.wait(reads, return_when=asyncio.FIRST_COMPLETED)
                for task in blocked:
                    with contextlib.suppress(Exception):  # no permission: it ends by itself
                        await reads[task].unblock()
                await asyncio.wait(reads)
        except BaseException:
            for task in reads:
                task.cancel()
            raise
        results = [task.exception() or task.result() for task in reads]
        out: list[StreamEntries] = []
        errors: list[BaseException] = []
        for result in results:
            if isinstance(result, BaseException):
                errors.append(result)
            else:
                out.extend(result)
        if errors and not out:
            raise errors[0]
        return out

    async def _read(
        self,
        raw: RawConnection,
        names: Sequence[str],
        count: int,
        block_ms: int | None,
        own_pending: bool,
    ) -> list[StreamEntries]:
        args: list[Any] = ["XREADGROUP", "GROUP", self.group, self.consumer, "COUNT", count]
        if block_ms is not None:
            args += ["BLOCK", block_ms]
        args.append("STREAMS")
        args.extend(names)
        args.extend(["0" if own_pending else ">"] * len(names))
        reply = await raw.call(*args)
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
        for raw in [self.raw, *self._slot_raws.values()]:
            await raw.aclose()
