"""The Producer API: write envelopes to a stream, one event or many per round trip, with
backpressure.

    async with Producer("redis://127.0.0.1:6379/0", stream="events") as p:
        await p.produce("user_created", {"user_id": 1})
        await p.produce_batch([("order_placed", {"order_id": 7}), ...])

Every entry is exactly the envelope the consumer expects: `type`, `data` (JSON text) and `ts`
(producer time, epoch ms). A batch is one round trip: a Lua script XADDs `chunk_size` entries per
call, and the chunks of a large batch are pipelined, so Redis is never blocked for long.
Commands are packed by hiredis and written straight to a pooled connection: redis-py's
pure-Python packer would cost more than Redis itself.

Backpressure: with `max_backlog` set, a call waits while the consumer group's backlog (lag plus
pending; the stream length where lag is unknown) is at or above it, and raises `BacklogFull` after
`backlog_timeout_s`. The backlog is measured at most every `backlog_check_interval_s` and after
this producer alone could have filled the gap, so most calls cost no extra round trip; the backlog
can exceed `max_backlog` by at most one call's events. Nothing is ever dropped: an event is either
written, or its call raises.

A failed round trip is never retried here: when the connection drops mid-call, Redis may or may
not have written the batch, and only the caller can decide whether a possible duplicate is
acceptable. (A reply that says nothing ran, NOSCRIPT or a Redis Cluster's MOVED for every
chunk, is the exception: the call is sent once more.)

Sharded streams (`shards` above 1): each call goes to one shard `<stream>:{i}`, the one
`partition_key` picks (CRC-32 of its UTF-8 bytes, modulo shards: the same key always lands in the
same shard, so its events keep their order), or the next shard in turn without a key. With
backpressure, max_backlog applies to each shard.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import random
import time
import zlib
from collections.abc import Iterable, Sequence
from typing import Any, Self

import hiredis
import redis.asyncio as aioredis
import redis.exceptions

from streamd.backends.cluster import TOPOLOGY_ERRORS, KeyConnections
from streamd.backends.connections import redis_client
from streamd.backends.redis_acl import Need, database_needs, script_needs
from streamd.backends.scripts import RedisScript
from streamd.client.backlog import BacklogGate, measure_backlog
from streamd.client.encoding import Encoder, Event

# The exceptions are imported from here, beside Producer (`as`: an explicit re-export).
from streamd.client.errors import BacklogFull as BacklogFull
from streamd.client.errors import InvalidEvent as InvalidEvent
from streamd.client.errors import PartialBatch as PartialBatch
from streamd.client.errors import ProducerError as ProducerError
from streamd.common.text import as_text
from streamd.config.settings import Settings
from streamd.config.sharding import shard_keys

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_MAX_DATA_BYTES = 1_048_576  # the consumer's default max_event_bytes

# ARGV: ts, then type, data per event. Returns the new entry IDs in order.
XADD_MANY = RedisScript(
    "xadd_many",
    keys=("stream",),
    source="""
local ids = {}
local n = 0
local call = redis.call
local ts = ARGV[1]
for i = 2, #ARGV, 2 do
  n = n + 1
  ids[n] = call('XADD', KEYS[1], '*', 'type', ARGV[i], 'data', ARGV[i + 1], 'ts', ts)
end
return ids
""",
)


def producer_needs(settings: Settings) -> list[Need]:
    """What a Producer (and `streamd produce`) runs in Redis, for its minimal ACL: the batch
    script (or one XADD), and with max_backlog the group's lag (XINFO GROUPS, else XLEN)."""
    needs = [*database_needs(settings), Need("client|setname")]
    for stream in shard_keys(settings.stream, settings.shards):
        needs += script_needs(XADD_MANY, [stream])
        if settings.max_backlog:
            needs += [Need("xinfo|groups", stream), Need("xlen", stream)]
    return needs


def _now_ms() -> bytes:
    return str(time.time_ns() // 1_000_000).encode()


# ---------------------------------------------------------------------------------------------
# the producer


class Producer:
    """Writes events to one stream. Use `async with`, or `connect()` then `aclose()`.

    Safe to share between tasks of one event loop; not between loops or threads.
    """

    def __init__(
        self,
        redis_url: str = DEFAULT_REDIS_URL,
        *,
        stream: str = "events",
        group: str | None = "streamd",
        max_backlog: int | None = None,
        backlog_timeout_s: float = 30.0,
        backlog_check_interval_s: float = 0.1,
        chunk_size: int = 1000,
        max_data_bytes: int = DEFAULT_MAX_DATA_BYTES,
        shards: int = 1,
        settings: Settings | None = None,
    ) -> None:
        """`group` is whose lag counts as backlog (None: the stream's length); max_backlog=None
        turns backpressure off. `settings` supplies password, TLS and timeouts for redis_url."""
        if max_backlog is not None and max_backlog < 1:
            raise ValueError("max_backlog must be >= 1, or None to disable backpressure")
        if chunk_size < 1:
            raise ValueError("chunk_size must be >= 1")
        if shards < 1:
            raise ValueError("shards must be >= 1")
        base = settings or Settings()
        self.settings = dataclasses.replace(base, redis_url=redis_url, stream=stream)
        self.stream = stream
        self.group = group
        self.max_backlog = max_backlog
        self.backlog_timeout_s = backlog_timeout_s
        self.backlog_check_interval_s = backlog_check_interval_s
        self.chunk_size = chunk_size
        self._encoder = Encoder(max_data_bytes)
        self._client: aioredis.Redis | None = None
        self._connections: KeyConnections | None = None
        self._gates: dict[int, BacklogGate] = {}
        self.shard_keys = shard_keys(stream, shards)
        self._keys = [key.encode() for key in self.shard_keys]
        self._xadd_heads = [XADD_MANY.evalsha_head([key]) for key in self._keys]
        self._turn = itertools.count(random.randrange(len(self._keys)))  # round-robin start

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> Producer:
        """A producer for the configured stream, group, backlog limit and event size limit."""
        kwargs: dict[str, Any] = {
            "stream": settings.stream,
            "group": settings.group,
            "max_backlog": settings.max_backlog or None,
            "backlog_timeout_s": settings.backlog_timeout_s,
            "max_data_bytes": settings.max_event_bytes,
            "shards": settings.shards,
            "settings": settings,
        }
        kwargs.update(overrides)
        return cls(settings.redis_url, **kwargs)

    # --- lifecycle ---------------------------------------------------------------------------

    async def connect(self) -> Self:
        if self._client is None:
            client = redis_client(self.settings, client_name="streamd-producer")
            try:
                await XADD_MANY.load(client)
            except BaseException:
                await client.aclose()
                raise
            self._client = client
            self._connections = KeyConnections(client)
        return self

    def _gate(self, shard: int) -> BacklogGate | None:
        if self.max_backlog is None or self._client is None:
            return None
        gate = self._gates.get(shard)
        if gate is None:
            gate = self._gates[shard] = BacklogGate(
                self._client,
                self.shard_keys[shard],
                self.group,
                self.max_backlog,
                self.backlog_timeout_s,
                self.backlog_check_interval_s,
            )
        return gate

    def shard_of(self, partition_key: str | bytes | None) -> int:
        """The shard a call goes to: by partition_key, else the next in turn."""
        if len(self._keys) == 1:
            return 0
        if partition_key is None:
            return next(self._turn) % len(self._keys)
        raw = partition_key.encode() if isinstance(partition_key, str) else partition_key
        return zlib.crc32(raw) % len(self._keys)

    async def aclose(self) -> None:
        client, self._client, self._connections = self._client, None, None
        self._gates = {}
        if client is not None:
            await client.aclose()

    async def __aenter__(self) -> Self:
        return await self.connect()

    async def __aexit__(self, *_exc_info: object) -> None:
        await self.aclose()

    @property
    def client(self) -> aioredis.Redis:
        if self._client is None:
            raise ProducerError("producer is not connected: use `async with Producer(...)`")
        return self._client

    # --- producing ---------------------------------------------------------------------------

    async def produce(
        self, event_type: str, data: Any, *, partition_key: str | bytes | None = None
    ) -> str:
        """Write one event; returns its entry ID."""
        raw_type = self._encoder.event_type(event_type)
        raw_data = self._encoder.data(data)
        client = self.client
        shard = self.shard_of(partition_key)
        gate = self._gate(shard)
        if gate is not None:
            await gate.admit(1)
        entry_id = await client.execute_command(  # type: ignore[no-untyped-call]
            "XADD", self._keys[shard], "*", b"type", raw_type, b"data", raw_data, b"ts", _now_ms()
        )
        return as_text(entry_id)

    async def produce_batch(
        self, events: Iterable[Event], *, partition_key: str | bytes | None = None
    ) -> list[str]:
        """Write many events in one round trip; returns their entry IDs, in order.

        All events are validated first: one invalid event means none is sent. With shards, the
        whole call goes to one shard (partition_key's, else the next in turn).
        """
        return await self.produce_encoded(self.encode(events), partition_key=partition_key)

    def encode(self, events: Iterable[Event]) -> list[bytes]:
        """Validate and encode events into the flat [type, data, ...] list produce_encoded takes.

        Lets a caller that produces in a tight loop (a benchmark) do this work ahead of time.
        """
        return self._encoder.encode(events)

    async def produce_encoded(
        self, flat: Sequence[bytes], *, partition_key: str | bytes | None = None
    ) -> list[str]:
        """Write events already validated by `encode`."""
        count = len(flat) // 2
        if count == 0:
            return []
        client = self.client
        shard = self.shard_of(partition_key)
        gate = self._gate(shard)
        if gate is not None:
            await gate.admit(count)
        step = self.chunk_size * 2
        ts = _now_ms()
        chunks = [(ts, *flat[i : i + step]) for i in range(0, len(flat), step)]
        replies = await self._roundtrip(client, shard, chunks)
        return self._collect(replies)

    async def _roundtrip(
        self,
        client: aioredis.Redis,
        shard: int,
        chunks: list[tuple[bytes, ...]],
        resent: bool = False,
    ) -> list[Any]:
        """One EVALSHA per chunk, all sent in one write; one reply (or error) per chunk."""
        head = self._xadd_heads[shard]
        # hiredis' stub declares a 1-tuple where it means a tuple of any length.
        commands = [hiredis.pack_command(head + chunk) for chunk in chunks]  # type: ignore[arg-type]
        connections = self._connections
        assert connections is not None  # set with _client
        conn = await connections.acquire(self._keys[shard])
        try:
            if not conn.is_connected:
                await conn.connect()  # type: ignore[no-untyped-call]
            await conn.send_packed_command(commands)
            replies: list[Any] = []
            for _ in commands:
                try:
                    replies.append(await conn.read_response(disable_decoding=True))
                except redis.exceptions.ResponseError as exc:
                    replies.append(exc)
        except BaseException:
            # A cancelled or failed exchange leaves replies in flight: never reuse the socket.
            await conn.disconnect(nowait=True)
            raise
        finally:
            await connections.release(conn)
        if not resent and all(_is_noscript(r) for r in replies):
            # Redis restarted or SCRIPT FLUSH: nothing ran, so loading and resending is safe.
            await XADD_MANY.load(client)
            return await self._roundtrip(client, shard, chunks, resent=True)
        if not resent and all(isinstance(r, TOPOLOGY_ERRORS) for r in replies):
            # The shard's slot moved or its master failed over: nothing ran either.
            await connections.refresh()
            return await self._roundtrip(client, shard, chunks, resent=True)
        return replies

    def _collect(self, replies: list[Any]) -> list[str]:
        ids: list[str] = []
        for reply in replies:
            if isinstance(reply, Exception):
                message = f"Redis refused a batch: {reply}"
                if ids:
                    message += f" ({len(ids)} events of this call were written before)"
                    raise PartialBatch(message, ids)
                raise ProducerError(message + " (nothing of this call was written)")
            ids.extend(entry_id.decode() for entry_id in reply)
        return ids

    async def backlog(self) -> int:
        """The backlog as backpressure sees it: the group's lag plus pending, or XLEN (summed
        over the shards)."""
        total = 0
        for key in self.shard_keys:
            total += await measure_backlog(self.client, key, self.group)
        return total


def _is_noscript(reply: Any) -> bool:
    return isinstance(reply, redis.exceptions.NoScriptError)


# ---------------------------------------------------------------------------------------------
# synchronous wrapper


class SyncProducer:
    """The Producer for code without an event loop: same arguments, blocking calls.

        with SyncProducer("redis://127.0.0.1:6379/0", stream="events") as p:
            p.produce("user_created", {"user_id": 1})

    It runs its own event loop; do not call it from inside a running loop (use Producer there),
    and do not share one instance between threads.
    """

    def __init__(self, redis_url: str = DEFAULT_REDIS_URL, **kwargs: Any) -> None:
        self._producer = Producer(redis_url, **kwargs)
        self._runner: asyncio.Runner | None = None

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> SyncProducer:
        self = cls.__new__(cls)
        self._producer = Producer.from_settings(settings, **overrides)
        self._runner = None
        return self

    def _run_loop(self) -> asyncio.Runner:
        if self._runner is None:
            self._runner = asyncio.Runner()
            self._runner.run(self._producer.connect())
        return self._runner

    def connect(self) -> SyncProducer:
        self._run_loop()
        return self

    def produce(
        self, event_type: str, data: Any, *, partition_key: str | bytes | None = None
    ) -> str:
        return self._run_loop().run(
            self._producer.produce(event_type, data, partition_key=partition_key)
        )

    def produce_batch(
        self, events: Iterable[Event], *, partition_key: str | bytes | None = None
    ) -> list[str]:
        return self._run_loop().run(
            self._producer.produce_batch(events, partition_key=partition_key)
        )

    def backlog(self) -> int:
        return self._run_loop().run(self._producer.backlog())

    def close(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            try:
                runner.run(self._producer.aclose())
            finally:
                runner.close()

    def __enter__(self) -> SyncProducer:
        return self.connect()

    def __exit__(self, *_exc_info: object) -> None:
        self.close()
