"""One consumer's reads over many streams: a single XREADGROUP names every stream it consumes.

`STREAMS k1 k2 ... kn > > ... >` costs one round trip and one connection whatever n is; Redis
applies COUNT to each key, so one busy stream cannot crowd the others out of a reply. What a
consumer may hold is bounded by how it asks (worker/consumer.py): COUNT is the room left in the
batch divided by the number of keys asked for.

In a Redis Cluster a command may only name keys of one slot (else CROSSSLOT), so the streams are
read per slot. A read first asks every slot without blocking: one XREADGROUP per slot, those of
one node pipelined over this consumer's connection to that node (grouped by the client's slot
map, learnt again after a MOVED), the nodes at once. Only when all are empty does it block, on
every slot at once, each over a connection of its own to the node serving it (streams that share
a slot move together, so that connection's routing stays right through resharding and
failovers), for at most CLUSTER_BLOCK_MS: the first to answer ends the read and the others are
woken with CLIENT UNBLOCK, one pipelined round trip per node, so an entry on one node never waits
for another node's BLOCK to end.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.cluster import RedisCluster

from streamd.backends.cluster import (
    KeyConnections,
    by_slot,
    is_cluster_client,
    slot_of,
    topology_changed,
)
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
        # Connections of slots none of the consumed streams is in any more (keep_only): closed
        # by the next read, once whatever still runs over them (an ack) has ended.
        self._retired: list[RawConnection] = []
        self._node_raws: dict[str, RawConnection] = {}  # in a cluster: node name -> ours to it
        self._slots_of: tuple[tuple[str, ...], list[list[str]]] = ((), [])
        self._remap = False  # a node read saw the slot map change: refresh before grouping
        # Round trips of multi-slot reads and of their wake-ups, for tests and benches.
        self.reads_sent = 0
        self.unblocks_sent = 0
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
        if self.clustered:
            slots = {slot_of(name) for name in names}
            for slot in [s for s in self._slot_raws if s not in slots]:
                self._retired.append(self._slot_raws.pop(slot))

    async def read(
        self, names: Sequence[str], count: int, block_ms: int | None, *, own_pending: bool = False
    ) -> list[StreamEntries]:
        """New entries of these streams (XREADGROUP ... >), per stream that has any.

        own_pending: instead, the oldest entries already delivered to this consumer and not yet
        acknowledged (XREADGROUP ... 0).
        """
        while self._retired:
            await self._retired.pop().aclose_when_idle()
        if self.gone:
            names = [n for n in names if n not in self.gone]
        if not names:
            return []
        if not self.clustered:
            return await self._read(self.raw, names, count, block_ms, own_pending)
        slots = self._by_slot(names)
        if len(slots) == 1:
            return await self._read(self.raw_for(names[0]), names, count, block_ms, own_pending)
        got = await self._read_nodes(slots, count, own_pending)
        if got or block_ms is None:
            return got
        return await self._read_slots(slots, count, min(block_ms, CLUSTER_BLOCK_MS), own_pending)

    def _by_slot(self, names: Sequence[str]) -> list[list[str]]:
        """names grouped by slot; the grouping of the last names asked is kept (a consumer asks
        the same streams read after read), so CRC16 runs once per stream, not once per read."""
        key = tuple(names)
        if self._slots_of[0] != key:
            self._slots_of = (key, list(by_slot(names).values()))
        return self._slots_of[1]

    async def _read_nodes(
        self, slots: list[list[str]], count: int, own_pending: bool
    ) -> list[StreamEntries]:
        """One read per slot without blocking, the slots of one node pipelined over one
        connection to it, the nodes at once. What was delivered is returned even when another
        slot's read failed (that one is asked again next time); all failed: the first error."""
        by_node = await self._by_node(slots)
        reads = [self._read_node(node, keys, count, own_pending) for node, keys in by_node.items()]
        self.reads_sent += len(reads)
        results: list[tuple[list[StreamEntries], list[BaseException]] | BaseException]
        if len(reads) == 1:
            try:
                results = [await reads[0]]
            except Exception as exc:
                results = [exc]
        else:
            results = await asyncio.gather(*reads, return_exceptions=True)
        out: list[StreamEntries] = []
        errors: list[BaseException] = []
        for result in results:
            if isinstance(result, BaseException):
                errors.append(result)
            else:
                got, failed = result
                out.extend(got)
                errors.extend(failed)
        if errors:
            self._remap = True  # a slot may have moved: learn the map before grouping again
            if not out:
                raise errors[0]
        return out

    async def _by_node(self, slots: list[list[str]]) -> dict[str, list[list[str]]]:
        """The slots' streams grouped by the node serving each slot ("" for a slot no node
        serves: read alone, its connection reports the outage)."""
        client = self.client
        assert isinstance(client, RedisCluster)
        if self._remap:
            await KeyConnections(client).refresh()
            self._remap = False
        await client.initialize()  # no-op once the slot map is known
        out: dict[str, list[list[str]]] = {}
        for keys in slots:
            try:
                node = client.get_node_from_key(keys[0])
            except redis.exceptions.SlotNotCoveredError:
                node = None
            out.setdefault(node.name if node is not None else "", []).append(keys)
        return out

    async def _read_node(
        self, node: str, slots: list[list[str]], count: int, own_pending: bool
    ) -> tuple[list[StreamEntries], list[BaseException]]:
        """The slots of one node in one round trip: what they delivered, and their errors."""
        out: list[StreamEntries] = []
        errors: list[BaseException] = []
        if not node:  # each over its slot's connection, which reports the outage
            for keys in slots:
                try:
                    out.extend(
                        await self._read(self.raw_for(keys[0]), keys, count, None, own_pending)
                    )
                except Exception as exc:
                    errors.append(exc)
            return out, errors
        commands = [self._command(keys, count, None, own_pending) for keys in slots]
        replies = await self._node_raw(node).call_each(commands)
        for reply in replies:
            if isinstance(reply, redis.exceptions.ResponseError):
                errors.append(topology_changed(reply) or reply)
            else:
                out.extend(self._entries(reply))
        return out, errors

    def _node_raw(self, node: str) -> RawConnection:
        """This consumer's connection to one node, for pipelined reads that do not block and
        for CLIENT UNBLOCK (a client id means something only on its node)."""
        raw = self._node_raws.get(node)
        if raw is None:
            raw = self._node_raws[node] = RawConnection(self.client, node=node)
            raw.ask_client_id = False  # it never blocks: nobody unblocks it
        return raw

    async def _read_slots(
        self, slots: list[list[str]], count: int, block_ms: int, own_pending: bool
    ) -> list[StreamEntries]:
        """One blocked read per slot, each over the slot's connection, all at once: the first
        slot to answer ends the read; the others are woken (CLIENT UNBLOCK: they answer at
        once, with nothing delivered) rather than awaited. What was delivered is returned even
        when another slot's read failed; all failed: the first error."""
        reads = {
            asyncio.create_task(self._read(raw, k, count, block_ms, own_pending)): raw
            for k in slots
            for raw in (self.raw_for(k[0]),)
        }
        try:
            _, blocked = await asyncio.wait(reads, return_when=asyncio.FIRST_COMPLETED)
            if blocked:
                await self._unblock_all([reads[task] for task in blocked])
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

    async def _unblock_all(self, raws: list[RawConnection]) -> None:
        """CLIENT UNBLOCK the reads of these connections: one round trip per node, pipelined
        over this consumer's connection to it, the nodes at once. A read left blocked (no
        permission, no client id yet, the node gone) ends by itself within CLUSTER_BLOCK_MS."""
        by_node: dict[str, list[tuple[Any, ...]]] = {}
        for raw in raws:
            if raw.client_id is not None and raw.node is not None:
                by_node.setdefault(raw.node, []).append(("CLIENT", "UNBLOCK", raw.client_id))
        wakes = [self._node_raw(node).call_each(cmds) for node, cmds in by_node.items()]
        self.unblocks_sent += len(wakes)
        # Errors are left alone: that read ends by itself.
        await asyncio.gather(*wakes, return_exceptions=True)

    def _command(
        self, names: Sequence[str], count: int, block_ms: int | None, own_pending: bool
    ) -> tuple[Any, ...]:
        args: list[Any] = ["XREADGROUP", "GROUP", self.group, self.consumer, "COUNT", count]
        if block_ms is not None:
            args += ["BLOCK", block_ms]
        args.append("STREAMS")
        args.extend(names)
        args.extend(["0" if own_pending else ">"] * len(names))
        return tuple(args)

    def _entries(self, reply: Any) -> list[StreamEntries]:
        if not reply:
            return []
        # RESP2: [[stream, entries], ...]; RESP3 would be {stream: entries}.
        pairs = reply.items() if isinstance(reply, dict) else reply
        out: list[StreamEntries] = []
        for key, entries in pairs:
            if entries:
                out.append((self.stream(key.decode()), entries))
        return out

    async def _read(
        self,
        raw: RawConnection,
        names: Sequence[str],
        count: int,
        block_ms: int | None,
        own_pending: bool,
    ) -> list[StreamEntries]:
        return self._entries(await raw.call(*self._command(names, count, block_ms, own_pending)))

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
        raws = [self.raw, *self._slot_raws.values(), *self._node_raws.values(), *self._retired]
        for raw in raws:
            await raw.aclose()
