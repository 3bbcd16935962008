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

    def __init__(self, client: aioredis.Redis) -> None:
        self._pool = client.connection_pool
        self._conn: AbstractConnection | None = None
        self._lock = asyncio.Lock()
        self.client_id: int | None = None
        # False once the ACL refused CLIENT ID: it only serves CLIENT UNBLOCK, which a drain can
        # do without (its reads then end after block_ms instead of at once).
        self.ask_client_id = True

    async def call(self, *args: Any) -> Any:
        return (await self.call_many([args]))[0]

    async def call_many(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Several commands in one round trip (pipelined); an error reply of any is raised after
        every reply was read, so the connection stays in step."""
        async with self._lock:
            try:
                if self._conn is None:
                    # Checked out of the client's pool and kept: closing the client closes it.
                    self._conn = await self._pool.get_connection()  # type: ignore[no-untyped-call]
                conn = self._conn
                if not conn.is_connected:
                    self.client_id = None
                    await conn.connect()
                if self.client_id is None and self.ask_client_id:
                    try:
                        self.client_id = int(await self._exchange(conn, ("CLIENT", "ID")))
                    except redis.exceptions.NoPermissionError:
                        self.ask_client_id = False
                return await self._exchange_many(conn, commands)
            except redis.exceptions.ResponseError:
                raise  # an error reply: the connection is in step and stays
            except BaseException:
                self.client_id = None
                if self._conn is not None:
                    await self._conn.disconnect(nowait=True)
                raise

    @staticmethod
    async def _exchange(conn: AbstractConnection, args: tuple[Any, ...]) -> Any:
        await conn.send_packed_command(hiredis.pack_command(args), check_health=False)
        return await conn.read_response(disable_decoding=True)

    @staticmethod
    async def _exchange_many(
        conn: AbstractConnection, commands: list[tuple[Any, ...]]
    ) -> list[Any]:
        packed = b"".join(hiredis.pack_command(args) for args in commands)
        await conn.send_packed_command(packed, check_health=False)
        replies: list[Any] = []
        error: redis.exceptions.ResponseError | None = None
        for _ in commands:
            try:
                replies.append(await conn.read_response(disable_decoding=True))
            except redis.exceptions.ResponseError as exc:
                error = error or exc
                replies.append(exc)
        if error is not None:
            raise error
        return replies

    async def aclose(self) -> None:
        if self._conn is not None:
            await self._conn.disconnect(nowait=True)
            await self._pool.release(self._conn)
            self._conn = None


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
        # Shared by every stream a consumer reads (one connection per consumer, not per stream).
        self.raw = raw if raw is not None else RawConnection(client)
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
    for raw, commands in by_conn.values():
        await raw.call_many(commands)
    written = 0
    for stream, _, dead in acks:
        if dead:
            written += await stream.ack((), dead)
    return written
