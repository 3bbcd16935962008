"""The dead letters of one stream, in the dead_letter_queue table and in its dead stream: read,
replay (re-queue to the entry's own stream, exactly once, see dlq_admin) and purge.

The table is the record that counts; the dead stream (`<stream>:dead`) mirrors it for Redis-side
tooling, and these methods keep the two in step."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson
import redis.asyncio as aioredis

from streamd.backends.scripts import RedisScript
from streamd.backends.sql import quote_ident
from streamd.common.text import as_text
from streamd.config.settings import Settings
from streamd.observability.redis_stats import dead_stream_of
from streamd.pipeline.dead_letters import decode_fields

PAGE = 500
SCAN_PAGE = 1000
SCAN_SLACK_MS = 5 * 60 * 1000  # the dead stream's copy is written after the row's failed_at

# ARGV: original entry ID, n, n dead-stream IDs, then the original fields. Returns {1, new id}
# when re-queued now, {0, id} when it already was.
REPLAY = RedisScript(
    "replay",
    keys=("source stream", "dead stream", "replay records"),
    source="""
local done = redis.call('HGET', KEYS[3], ARGV[1])
local n = tonumber(ARGV[2])
for i = 3, 2 + n do
  redis.call('XDEL', KEYS[2], ARGV[i])
end
if done then
  return {0, done}
end
local id = redis.call('XADD', KEYS[1], '*', unpack(ARGV, 3 + n))
redis.call('HSET', KEYS[3], ARGV[1], id)
return {1, id}
""",
)
MAX_REPLAY_FIELDS = 7000  # Lua's unpack() limit is about 8000 values


@dataclass(frozen=True, slots=True)
class DeadLetter:
    id: int
    stream: str
    entry_id: str
    event_type: str | None
    reason: str
    error: str
    deliveries: int
    failed_at: dt.datetime
    fields: dict[str, Any]

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> DeadLetter:
        fields = row["fields"]
        return cls(
            id=row["id"],
            stream=row["stream"],
            entry_id=row["entry_id"],
            event_type=row["event_type"],
            reason=row["reason"],
            error=row["error"],
            deliveries=row["deliveries"],
            failed_at=row["failed_at"],
            fields=orjson.loads(fields) if isinstance(fields, str | bytes) else fields,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "stream": self.stream,
            "entry_id": self.entry_id,
            "event_type": self.event_type,
            "reason": self.reason,
            "error": self.error,
            "deliveries": self.deliveries,
            "failed_at": self.failed_at.isoformat(),
            "fields": self.fields,
        }


_COLUMNS = "id, stream, entry_id, event_type, reason, error, deliveries, failed_at, fields"


class DeadLetters:
    """The dead letters of one stream (settings.stream unless given), in the table and in its
    dead stream."""

    def __init__(
        self,
        settings: Settings,
        conn: asyncpg.Connection,
        client: aioredis.Redis,
        stream: str | None = None,
    ):
        self.settings = settings
        self.conn = conn
        self.redis = client
        self.table = quote_ident(settings.dlq_table)
        self.stream = settings.stream if stream is None else stream
        self.dead_stream = dead_stream_of(settings, self.stream)
        self.records = f"{self.dead_stream}:replayed"

    async def count(self, before: dt.datetime | None = None) -> int:
        return int(
            await self.conn.fetchval(
                f"SELECT count(*) FROM {self.table} WHERE stream = $1 "
                "AND ($2::timestamptz IS NULL OR failed_at < $2)",
                self.stream,
                before,
            )
        )

    async def stream_length(self) -> int:
        return int(await self.redis.xlen(self.dead_stream))

    async def newest(self, limit: int) -> list[DeadLetter]:
        rows = await self.conn.fetch(
            f"SELECT {_COLUMNS} FROM {self.table} WHERE stream = $1 ORDER BY id DESC LIMIT $2",
            self.stream,
            limit,
        )
        return [DeadLetter.from_row(r) for r in rows]

    async def select(self, ids: Sequence[str]) -> list[DeadLetter]:
        """Dead letters by table id (digits) or by source entry ID (ms-seq)."""
        numeric = [int(i) for i in ids if i.isdigit()]
        entry_ids = [i for i in ids if not i.isdigit()]
        rows = await self.conn.fetch(
            f"SELECT {_COLUMNS} FROM {self.table} WHERE stream = $1 "
            "AND (id = ANY($2::bigint[]) OR entry_id = ANY($3::text[])) ORDER BY id",
            self.stream,
            numeric,
            entry_ids,
        )
        return [DeadLetter.from_row(r) for r in rows]

    async def last_id(self) -> int:
        return int(
            await self.conn.fetchval(
                f"SELECT coalesce(max(id), 0) FROM {self.table} WHERE stream = $1", self.stream
            )
        )

    async def page(self, after_id: int, upto_id: int) -> list[DeadLetter]:
        """The next PAGE letters with ids in (after_id, upto_id]: a replay of "all" takes those
        that were there when it started, not the ones that fail again while it runs."""
        rows = await self.conn.fetch(
            f"SELECT {_COLUMNS} FROM {self.table} WHERE stream = $1 AND id > $2 AND id <= $3 "
            "ORDER BY id LIMIT $4",
            self.stream,
            after_id,
            upto_id,
            PAGE,
        )
        return [DeadLetter.from_row(r) for r in rows]

    # --- replay ----------------------------------------------------------------------------

    async def replay(self, letters: list[DeadLetter]) -> list[tuple[DeadLetter, str, bool]]:
        """Re-queue, then delete. Returns (letter, new entry ID, re-queued now) for each."""
        copies = await self._dead_stream_copies(letters)
        done: list[tuple[DeadLetter, str, bool]] = []
        for letter in letters:
            new_id, now = await self.requeue(letter, copies.get(letter.entry_id, []))
            done.append((letter, new_id, now))
        await self.conn.execute(
            f"DELETE FROM {self.table} WHERE id = ANY($1::bigint[])", [d.id for d in letters]
        )
        await self.redis.hdel(self.records, *[d.entry_id for d in letters])
        return done

    async def requeue(self, letter: DeadLetter, dead_ids: list[str]) -> tuple[str, bool]:
        """Step one of a replay, atomic in Redis: XADD the original fields (unless an earlier,
        interrupted replay did), record it, drop the dead stream's copies. (new ID, now?)"""
        reply = await REPLAY.call(
            self.redis,
            keys=[letter.stream, self.dead_stream, self.records],
            args=[letter.entry_id, len(dead_ids), *dead_ids, *envelope_order(letter.fields)],
        )
        return as_text(reply[1]), bool(reply[0])

    async def _dead_stream_copies(self, letters: list[DeadLetter]) -> dict[str, list[str]]:
        """Dead-stream IDs of these letters: a scan from just before the oldest one failed."""
        wanted = {d.entry_id for d in letters}
        oldest_ms = int(min(d.failed_at for d in letters).timestamp() * 1000)
        start = f"{max(0, oldest_ms - SCAN_SLACK_MS)}-0"
        found: dict[str, list[str]] = {}
        while True:
            entries = await self.redis.xrange(self.dead_stream, min=start, count=SCAN_PAGE) or []
            for dead_id, fields in entries:
                fields = fields or {}
                source = as_text(fields.get(b"entry_id", b""))
                if source in wanted and as_text(fields.get(b"stream", b"")) == self.stream:
                    found.setdefault(source, []).append(as_text(dead_id))
            if len(entries) < SCAN_PAGE:
                return found
            start = "(" + as_text(entries[-1][0])

    # --- purge -----------------------------------------------------------------------------

    async def purge(self, before: dt.datetime | None) -> tuple[int, int]:
        """Delete from the table and trim the dead stream; (rows, stream entries) removed."""
        status = await self.conn.execute(
            f"DELETE FROM {self.table} WHERE stream = $1 "
            "AND ($2::timestamptz IS NULL OR failed_at < $2)",
            self.stream,
            before,
        )
        if before is None:
            trimmed = await self.redis.xtrim(self.dead_stream, maxlen=0, approximate=False)
        else:
            min_id = f"{int(before.timestamp() * 1000)}-0"
            trimmed = await self.redis.xtrim(self.dead_stream, minid=min_id, approximate=False)
        return int(status.split()[-1]), int(trimmed)


def envelope_order(encoded: dict[str, Any]) -> list[bytes]:
    """The original fields, type, data and ts first: jsonb does not keep the order of keys, and
    the consumer reads `type, data` in that order fastest. Names and values are kept exactly."""
    flat = decode_fields(encoded)
    pairs = [(flat[i], flat[i + 1]) for i in range(0, len(flat) - 1, 2)]
    rank = {b"type": 0, b"data": 1, b"ts": 2}
    pairs.sort(key=lambda pair: rank.get(pair[0], 3))  # stable: the rest keep their order
    return [part for pair in pairs for part in pair]
