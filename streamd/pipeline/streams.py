"""The Redis side of a batch: reading and acknowledging (with dead letters); the group itself is
created by backends/redis_groups.py.

Replies of XREADGROUP and XAUTOCLAIM arrive as hiredis parsed them (lists of bytes); streamd
never builds a dict per entry. A consumer's reads and acks go over a connection of its own,
driven directly (RawConnection): hiredis packs each command in C, where redis-py's client layer
packs arguments one at a time in Python, which for a batch's XACK costs more than Redis itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

import hiredis
import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.connection import AbstractConnection

from streamd.backends.cluster import KeyConnections, topology_changed
from streamd.backends.redis_groups import ensure_group, group_gone
from streamd.pipeline import dead_letters as dlq
from streamd.pipeline.envelope import RawEntry, Rejection


class RawConnection:
    """One Redis connection of its own, made with the client's settings (auth, TLS, db, timeouts).

    Commands are serialized by a lock (a consumer's lease renewal shares the connection with its
    reads and acks). A command cut off by a timeout, an error or a cancellation drops the
    connection, so a late reply can never be read as the answer to the next command; the next
    command reconnects. `client_id` is the current connection's CLIENT ID, for CLIENT UNBLOCK.
    """

    def __init__(self, client: aioredis.Redis, key: str = "", *, node: str | None = None) -> None:
        # In a Redis Cluster: a connection to the node serving `key`'s slot, found again after
        # MOVED, a failover or a lost node (backends/cluster.py); or, given `node`, to that node
        # whatever it serves (pipeline/reader.py). On one Redis: any.
        self._source = KeyConnections(client)
        self._key = key
        self._node = node
        self._stale = False  # the slot map may be out of date: refresh it before reconnecting
        self._conn: AbstractConnection | None = None
        self._lock = asyncio.Lock()
        self.client_id: int | None = None
        self.node: str | None = None  # in a cluster: the node the current connection is to
        # False once the ACL refused CLIENT ID: it only serves CLIENT UNBLOCK, which a drain can
        # do without (its reads then end after block_ms instead of at once).
        self.ask_client_id = True

    async def call(self, *args: Any) -> Any:
        return (await self.call_many([args]))[0]

    async def call_many(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Several commands in one round trip (pipelined); an error reply of any is raised after
        every reply was read, so the connection stays in step."""
        return await self._call(commands, raise_errors=True)

    async def call_each(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """As call_many, but every reply comes back in its place, an error reply as its
        ResponseError (one command's refusal does not hide what the others delivered). A reply
        saying the slot map changed drops the connection, as call_many does."""
        return await self._call(commands, raise_errors=False)

    async def _call(self, commands: list[tuple[Any, ...]], *, raise_errors: bool) -> list[Any]:
        async with self._lock:
            try:
                replies = await self._exchange_many(await self._connected(), commands)
                if raise_errors:
                    for reply in replies:
                        if isinstance(reply, redis.exceptions.ResponseError):
                            raise reply
                elif any(_moved_on(reply) for reply in replies):
                    await self._drop()  # in step, but talking to a node that no longer serves us
                return replies
            except redis.exceptions.ResponseError as exc:
                retry = topology_changed(exc)
                if retry is None:
                    raise  # an error reply: the connection is in step and stays
                await self._drop()  # in step, but talking to a node that no longer serves us
                if retry is exc:
                    raise
                raise retry from exc
            except BaseException:
                if self._source.clustered:
                    await self._drop()  # the node may be gone: find the slot's node again
                    raise
                self.client_id = None
                if self._conn is not None:
                    await self._conn.disconnect(nowait=True)
                raise

    async def _connected(self) -> AbstractConnection:
        """The connection, made (and its CLIENT ID asked) when there is none yet."""
        if self._conn is None:
            if self._stale:
                await self._source.refresh()
                self._stale = False
            # Checked out of the client's pool and kept: closing the client closes it.
            if self._node is not None:
                self._conn = await self._source.acquire_node(self._node)
            else:
                self._conn = await self._source.acquire(self._key)
            self.node = self._source.node_of(self._conn)
        conn = self._conn
        if not conn.is_connected:
            self.client_id = None
            await conn.connect()  # type: ignore[no-untyped-call]
        if self.client_id is None and self.ask_client_id:
            try:
                self.client_id = int(await self._exchange(conn, ("CLIENT", "ID")))
            except redis.exceptions.NoPermissionError:
                self.ask_client_id = False
        return conn

    async def unblock(self) -> None:
        """CLIENT UNBLOCK this connection's blocked read, from a second connection to the same
        node (in a cluster, a client id means something only on its node)."""
        client_id, node = self.client_id, self.node
        if client_id is None:
            return
        if node is not None:  # where that connection is, even if the slot has moved since
            conn = await self._source.acquire_node(node)
        else:
            conn = await self._source.acquire(self._key)
        try:
            if not conn.is_connected:
                await conn.connect()  # type: ignore[no-untyped-call]
            await self._exchange(conn, ("CLIENT", "UNBLOCK", client_id))
        except redis.exceptions.ResponseError:
            raise
        except BaseException:
            await conn.disconnect(nowait=True)
            raise
        finally:
            await self._source.release(conn)

    async def _drop(self) -> None:
        self.client_id = None
        self.node = None
        self._stale = True
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await conn.disconnect(nowait=True)
            await self._source.release(conn)

    @staticmethod
    async def _exchange(conn: AbstractConnection, args: tuple[Any, ...]) -> Any:
        await conn.send_packed_command(hiredis.pack_command(args), check_health=False)
        return await conn.read_response(disable_decoding=True)

    @staticmethod
    async def _exchange_many(
        conn: AbstractConnection, commands: list[tuple[Any, ...]]
    ) -> list[Any]:
        """Every reply, an error reply as its ResponseError, in the commands' order."""
        packed = b"".join(hiredis.pack_command(args) for args in commands)
        await conn.send_packed_command(packed, check_health=False)
        replies: list[Any] = []
        for _ in commands:
            try:
                replies.append(await conn.read_response(disable_decoding=True))
            except redis.exceptions.ResponseError as exc:
                replies.append(exc)
        return replies

    async def aclose(self) -> None:
        self.client_id = None  # another connection of its node may get that id later
        if self._conn is not None:
            await self._conn.disconnect(nowait=True)
            await self._source.release(self._conn)
            self._conn = None

    async def aclose_when_idle(self) -> None:
        """Close once the command in flight, if any, has its reply (aclose cuts it off)."""
        async with self._lock:
            await self.aclose()


def _moved_on(reply: Any) -> bool:
    """An error reply saying the slot map changed under the command."""
    return isinstance(reply, redis.exceptions.ResponseError) and topology_changed(reply) is not None


class GroupStream:
    """One consumer's view of the stream: read new entries, acknowledge committed ones.

    `client` serves the rare commands (dead-letter scripts); reads, acks and lease renewals use
    a connection of this consumer's own, made from the client's pool settings.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        stream: str,
        group: str,
        consumer: str,
        dead_stream: str,
        dead_maxlen: int,
        raw: RawConnection | None = None,
        create_missing: bool = True,
    ) -> None:
        self.client = client
        self.stream = stream
        self.group = group
        self.consumer = consumer
        self.dead_stream = dead_stream
        self.dead_maxlen = dead_maxlen
        # Shared by the streams a consumer reads in one command (one connection per consumer,
        # or in a cluster per slot: pipeline/reader.py).
        self.raw = raw if raw is not None else RawConnection(client, stream)
        # A stream named in the config is created when missing; one a pattern found is not
        # (deleted, it is gone: the next discovery forgets it).
        self.create_missing = create_missing

    @property
    def client_id(self) -> int | None:
        """CLIENT ID of this consumer's connection (None until it connects)."""
        return self.raw.client_id

    async def aclose(self) -> None:
        await self.raw.aclose()

    async def read(
        self, count: int, block_ms: int | None, *, own_pending: bool = False
    ) -> list[RawEntry]:
        """New entries for this consumer (XREADGROUP ... >); [] when there are none.

        own_pending: instead, the oldest entries already delivered to this consumer and not yet
        acknowledged (XREADGROUP ... 0).
        """
        args: tuple[Any, ...] = ("XREADGROUP", "GROUP", self.group, self.consumer, "COUNT", count)
        if block_ms is not None:
            args += ("BLOCK", block_ms)
        args += ("STREAMS", self.stream, "0" if own_pending else ">")
        reply = await self.raw.call(*args)
        if not reply:
            return []
        # RESP2: [[stream, entries]]; RESP3 would be {stream: entries}.
        return next(iter(reply.values())) if isinstance(reply, dict) else reply[0][1]

    async def ack(self, ids: Iterable[bytes], dead: list[Rejection]) -> int:
        """XACK the committed entries and, atomically per entry, dead-letter the rejected ones.

        Returns how many dead letters this call wrote to the dead stream: an entry another
        consumer already acknowledged (it was reclaimed and committed twice) is not written again.
        """
        ids = tuple(ids)
        if ids:
            await self.raw.call("XACK", self.stream, self.group, *ids)
        if not dead:
            return 0
        written = await dlq.ACK_AND_DEAD_LETTER.call(
            self.client,
            keys=[self.stream, self.dead_stream],
            args=dlq.script_args(self.group, self.dead_maxlen, dead),
        )
        return int(written)

    async def recover(self, exc: BaseException, log: Any) -> bool:
        """When exc says this stream or its group is gone (group_gone): create them again and
        log what happened; True then. False for any other error. Several consumers see it at
        once; the one whose XGROUP CREATE made the group says so."""
        cause = group_gone(exc)
        if cause is None:
            return False
        if await ensure_group(self.client, self.stream, self.group, mkstream=self.create_missing):
            log.warning(
                "group_recreated",
                stream=self.stream,
                group=self.group,
                cause=cause,
                note="entries still in the stream are delivered again; rows Postgres already "
                "holds are skipped",
            )
        return True

    async def renew(self, ids: list[bytes]) -> None:
        """Reset the idle time of entries this consumer holds (XCLAIM JUSTID does not count as a
        delivery), so reapers elsewhere do not take over a batch that is slow, not abandoned."""
        await self.raw.call("XCLAIM", self.stream, self.group, self.consumer, 0, *ids, "JUSTID")


async def ack_all(acks: list[tuple[GroupStream, list[bytes], list[Rejection]]]) -> int:
    """Acknowledge the committed entries of several streams: the XACKs of streams sharing a
    connection go in one round trip; each stream's dead letters through its own script (its
    keys are that stream and its dead stream). Returns the dead letters written."""
    by_conn: dict[int, tuple[RawConnection, list[tuple[Any, ...]]]] = {}
    for stream, ids, _ in acks:
        if ids:
            _, commands = by_conn.setdefault(id(stream.raw), (stream.raw, []))
            commands.append(("XACK", stream.stream, stream.group, *ids))
    if len(by_conn) == 1:
        raw, commands = next(iter(by_conn.values()))
        await raw.call_many(commands)
    elif by_conn:  # in a cluster, a connection per slot: all at once
        await asyncio.gather(*(raw.call_many(cmds) for raw, cmds in by_conn.values()))
    written = 0
    for stream, _, dead in acks:
        if dead:
            written += await stream.ack((), dead)
    return written
