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
acceptable.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import time
from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import Any, Self

import hiredis
import orjson
import redis.asyncio as aioredis
import redis.exceptions

from streamd.backends.connections import redis_client
from streamd.backends.scripts import RedisScript
from streamd.common.backoff import Backoff
from streamd.common.text import as_text
from streamd.config.settings import Settings
from streamd.errors import StreamdError
from streamd.pipeline.envelope import MAX_TYPE_BYTES

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_MAX_DATA_BYTES = 1_048_576  # the consumer's default max_event_bytes
# A call held by backpressure measures the backlog again after 5 ms, 10 ms, ... 0.5 s.
BACKLOG_POLL_INITIAL_S = 0.005
BACKLOG_POLL_MAX_S = 0.5

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

# `\u0000` that is not itself escaped: Postgres' jsonb refuses it, so the event would be a dead
# letter. An even run of backslashes before it means the backslash itself was escaped.
_NUL_ESCAPE = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000")

Event = tuple[str, Any]


class ProducerError(StreamdError):
    """A producer call failed; the message says whether any events were written."""


class InvalidEvent(ProducerError, ValueError):
    """An event breaks the envelope contract; nothing of its call was sent."""


class BacklogFull(ProducerError):
    """The backlog stayed above max_backlog for backlog_timeout_s; nothing of the call was sent."""

    def __init__(self, message: str, backlog: int) -> None:
        super().__init__(message)
        self.backlog = backlog


class PartialBatch(ProducerError):
    """Redis refused a chunk of a batch after earlier chunks were written."""

    def __init__(self, message: str, written_ids: list[str]) -> None:
        super().__init__(message)
        self.written_ids = written_ids


# ---------------------------------------------------------------------------------------------
# validation: everything is checked before anything is sent


class _Encoder:
    """Turns (type, data) into the wire bytes, with clear errors. Types are few: cache them.

    `encode` is the hot loop of a producer: it does the common case (a str type already seen, a
    dict payload) inline and leaves everything else, and every error message, to the checks.
    """

    def __init__(self, max_data_bytes: int) -> None:
        self.max_data_bytes = max_data_bytes
        self._types: dict[str, bytes] = {}

    def encode(self, events: Iterable[Event]) -> list[bytes]:
        flat: list[bytes] = []
        append = flat.append
        types, dumps, limit = self._types, orjson.dumps, self.max_data_bytes
        for i, event in enumerate(events):
            try:
                kind, payload = event
            except (TypeError, ValueError):
                raise InvalidEvent(f"event {i}: expected a (type, data) pair") from None
            raw_type = types.get(kind) if type(kind) is str else None
            if raw_type is None:
                raw_type = self.event_type(kind, i)
            if type(payload) is dict:
                try:
                    raw = dumps(payload)
                except TypeError as exc:  # orjson.JSONEncodeError is a TypeError
                    raise InvalidEvent(f"event {i}: data is not JSON-serializable: {exc}") from None
                if len(raw) > limit or b"\\u0000" in raw:
                    raw = self.data(payload, i)
            else:
                raw = self.data(payload, i)
            append(raw_type)
            append(raw)
        return flat

    def event_type(self, event_type: Any, index: int | None = None) -> bytes:
        cached = self._types.get(event_type) if isinstance(event_type, str) else None
        if cached is not None:
            return cached
        if not isinstance(event_type, str):
            raise _invalid(index, f"type must be a str, got {type(event_type).__name__}")
        try:
            raw = event_type.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise _invalid(index, f"type is not valid UTF-8: {exc.reason}") from None
        if not raw:
            raise _invalid(index, "type must not be empty")
        if len(raw) > MAX_TYPE_BYTES:
            raise _invalid(
                index, f"type is {len(raw)} bytes of UTF-8; the limit is {MAX_TYPE_BYTES}"
            )
        if b"\x00" in raw:
            raise _invalid(index, "type must not contain NUL")
        if len(self._types) < 4096:
            self._types[event_type] = raw
        return raw

    def data(self, data: Any, index: int | None = None) -> bytes:
        """dict, list and other JSON values are encoded; str and bytes are JSON text, checked
        by parsing it (the cost of a pre-encoded payload: about what encoding a dict costs)."""
        if isinstance(data, str | bytes | bytearray | memoryview):
            raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
            try:
                orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                raise _invalid(index, f"data is not valid JSON text: {exc}") from None
        else:
            try:
                raw = orjson.dumps(data)
            except TypeError as exc:  # orjson.JSONEncodeError is a TypeError
                raise _invalid(index, f"data is not JSON-serializable: {exc}") from None
        if len(raw) > self.max_data_bytes:
            raise _invalid(index, f"data is {len(raw)} bytes; the limit is {self.max_data_bytes}")
        if b"\\u0000" in raw and _NUL_ESCAPE.search(raw):
            raise _invalid(index, "data contains \\u0000, which Postgres' jsonb cannot store")
        return raw


def _invalid(index: int | None, problem: str) -> InvalidEvent:
    """The error, naming the event's position in its batch (built only when there is one)."""
    return InvalidEvent(problem if index is None else f"event {index}: {problem}")


def _now_ms() -> bytes:
    return str(time.time_ns() // 1_000_000).encode()


# ---------------------------------------------------------------------------------------------
# backlog


@dataclasses.dataclass(slots=True)
class BacklogGate:
    """Admits calls while the backlog is below max_backlog, measuring it only when needed."""

    client: aioredis.Redis
    stream: str
    group: str | None
    max_backlog: int
    timeout_s: float
    check_interval_s: float
    _estimate: int = 0
    _checked_at: float = float("-inf")
    _lock: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)

    async def admit(self, count: int) -> None:
        fresh = time.monotonic() - self._checked_at < self.check_interval_s
        if fresh and self._estimate < self.max_backlog:
            self._estimate += count  # what this producer adds; others show at the next check
            return
        async with self._lock:
            deadline = time.monotonic() + self.timeout_s
            backoff = Backoff(
                BACKLOG_POLL_INITIAL_S, BACKLOG_POLL_MAX_S, healthy_after_s=None, jitter=False
            )
            while True:
                backlog = await measure_backlog(self.client, self.stream, self.group)
                self._checked_at = time.monotonic()
                if backlog < self.max_backlog:
                    self._estimate = backlog + count
                    return
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise BacklogFull(
                        f"stream {self.stream!r}: backlog {backlog} stayed at or above "
                        f"max_backlog {self.max_backlog} for {self.timeout_s:g}s; nothing was "
                        "written (is streamd serve running and keeping up?)",
                        backlog,
                    )
                # The last check is at the deadline.
                await asyncio.sleep(min(backoff.next_delay(), remaining))


async def measure_backlog(client: aioredis.Redis, stream: str, group: str | None) -> int:
    """Entries the group has not committed yet: lag + pending (Redis >= 7), else XLEN."""
    if group is not None:
        try:
            groups = await client.xinfo_groups(stream)
        except redis.exceptions.ResponseError as exc:
            if "no such key" in str(exc).lower():
                return 0
            raise
        for info in groups:
            name = info.get("name")
            if name in (group, group.encode()) and info.get("lag") is not None:
                return int(info["lag"]) + int(info.get("pending") or 0)
    return int(await client.xlen(stream))


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
        settings: Settings | None = None,
    ) -> None:
        """`group` is whose lag counts as backlog (None: the stream's length); max_backlog=None
        turns backpressure off. `settings` supplies password, TLS and timeouts for redis_url."""
        if max_backlog is not None and max_backlog < 1:
            raise ValueError("max_backlog must be >= 1, or None to disable backpressure")
        if chunk_size < 1:
            raise ValueError("chunk_size must be >= 1")
        base = settings or Settings()
        self.settings = dataclasses.replace(base, redis_url=redis_url, stream=stream)
        self.stream = stream
        self.group = group
        self.max_backlog = max_backlog
        self.backlog_timeout_s = backlog_timeout_s
        self.backlog_check_interval_s = backlog_check_interval_s
        self.chunk_size = chunk_size
        self._encoder = _Encoder(max_data_bytes)
        self._client: aioredis.Redis | None = None
        self._gate: BacklogGate | None = None
        self._stream_key = stream.encode()
        self._xadd_many = XADD_MANY.evalsha_head([self._stream_key])

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> Producer:
        """A producer for the configured stream, group, backlog limit and event size limit."""
        kwargs: dict[str, Any] = {
            "stream": settings.stream,
            "group": settings.group,
            "max_backlog": settings.max_backlog or None,
            "backlog_timeout_s": settings.backlog_timeout_s,
            "max_data_bytes": settings.max_event_bytes,
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
            if self.max_backlog is not None:
                self._gate = BacklogGate(
                    client,
                    self.stream,
                    self.group,
                    self.max_backlog,
                    self.backlog_timeout_s,
                    self.backlog_check_interval_s,
                )
        return self

    async def aclose(self) -> None:
        client, self._client, self._gate = self._client, None, None
        if client is not None:
            await client.aclose()

    async def __aenter__(self) -> Self:
        return await self.connect()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    @property
    def client(self) -> aioredis.Redis:
        if self._client is None:
            raise ProducerError("producer is not connected: use `async with Producer(...)`")
        return self._client

    # --- producing ---------------------------------------------------------------------------

    async def produce(self, event_type: str, data: Any) -> str:
        """Write one event; returns its entry ID."""
        raw_type = self._encoder.event_type(event_type)
        raw_data = self._encoder.data(data)
        client = self.client
        if self._gate is not None:
            await self._gate.admit(1)
        entry_id = await client.execute_command(  # type: ignore[no-untyped-call]
            "XADD", self._stream_key, "*", b"type", raw_type, b"data", raw_data, b"ts", _now_ms()
        )
        return as_text(entry_id)

    async def produce_batch(self, events: Iterable[Event]) -> list[str]:
        """Write many events in one round trip; returns their entry IDs, in order.

        All events are validated first: one invalid event means none is sent.
        """
        return await self.produce_encoded(self.encode(events))

    def encode(self, events: Iterable[Event]) -> list[bytes]:
        """Validate and encode events into the flat [type, data, ...] list produce_encoded takes.

        Lets a caller that produces in a tight loop (a benchmark) do this work ahead of time.
        """
        return self._encoder.encode(events)

    async def produce_encoded(self, flat: Sequence[bytes]) -> list[str]:
        """Write events already validated by `encode`."""
        count = len(flat) // 2
        if count == 0:
            return []
        client = self.client
        if self._gate is not None:
            await self._gate.admit(count)
        step = self.chunk_size * 2
        ts = _now_ms()
        chunks = [(ts, *flat[i : i + step]) for i in range(0, len(flat), step)]
        replies = await self._roundtrip(client, chunks)
        return self._collect(replies)

    async def _roundtrip(
        self, client: aioredis.Redis, chunks: list[tuple[bytes, ...]], reloaded: bool = False
    ) -> list[Any]:
        """One EVALSHA per chunk, all sent in one write; one reply (or error) per chunk."""
        head = self._xadd_many
        # hiredis' stub declares a 1-tuple where it means a tuple of any length.
        commands = [hiredis.pack_command(head + chunk) for chunk in chunks]  # type: ignore[arg-type]
        pool = client.connection_pool
        conn = await pool.get_connection()  # type: ignore[no-untyped-call]
        try:
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
            await pool.release(conn)
        if not reloaded and all(_is_noscript(r) for r in replies):
            # Redis restarted or SCRIPT FLUSH: nothing ran, so loading and resending is safe.
            await XADD_MANY.load(client)
            return await self._roundtrip(client, chunks, reloaded=True)
        return replies

    def _collect(self, replies: list[Any]) -> list[str]:
        ids: list[str] = []
        for reply in replies:
            if isinstance(reply, Exception):
                message = f"Redis refused a batch: {reply}"
                if ids:
                    message += f" ({len(ids)} events of the batch were written before)"
                    raise PartialBatch(message, ids)
                raise ProducerError(message + " (nothing was written)")
            ids.extend(entry_id.decode() for entry_id in reply)
        return ids

    async def backlog(self) -> int:
        """The backlog as backpressure sees it: the group's lag plus pending, or XLEN."""
        return await measure_backlog(self.client, self.stream, self.group)


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

    def produce(self, event_type: str, data: Any) -> str:
        return self._run_loop().run(self._producer.produce(event_type, data))

    def produce_batch(self, events: Iterable[Event]) -> list[str]:
        return self._run_loop().run(self._producer.produce_batch(events))

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

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
