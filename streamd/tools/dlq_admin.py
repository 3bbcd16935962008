"""`streamd dlq list|replay|purge`: inspect and re-drive dead letters.

The dead_letter_queue table is the record that counts (the `<stream>:dead` stream mirrors it for
Redis-side tooling); these commands read the table and keep the stream in step.

Replay re-queues a dead letter's original fields (decoded exactly, bytes included) with XADD to
its source stream, then deletes it from the table and the dead stream: re-queue first, so a crash
never loses an entry. The re-queued entry gets a new ID, so Postgres' unique key on
(stream, entry_id) would NOT catch a second re-queue after a crash between the XADD and the
DELETE: the event would be ingested twice. So the XADD happens in a Redis script that also
records `original entry ID -> new ID` in the hash `<dead stream>:replayed` and removes the dead
stream's copy, atomically; a replay that finds the record skips the XADD and only finishes the
deletion. The record is dropped once the table row is gone (a crash in that last step leaves a
small orphan record, which is harmless: the original ID never comes back).
"""

from __future__ import annotations

import datetime as dt
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

import asyncpg
import click
import orjson
import redis.asyncio as aioredis

from streamd.backends.connections import postgres_connect, redis_client, resolve_cluster
from streamd.backends.faults import REDIS_FAULTS
from streamd.backends.preflight import postgres_error, redis_error
from streamd.backends.redis_acl import Need, database_needs, script_needs
from streamd.backends.scripts import RedisScript
from streamd.backends.sql import quote_ident
from streamd.common.text import as_text
from streamd.config.settings import Settings
from streamd.errors import EXIT_USAGE, StreamdError
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


def dlq_needs(settings: Settings) -> list[Need]:
    """What `streamd dlq list|replay|purge` runs in Redis, for its minimal ACL."""
    dead, records = settings.dead_stream, f"{settings.dead_stream}:replayed"
    return [
        *database_needs(settings),
        Need("client|setname"),
        *(Need(command, dead) for command in ("xlen", "xrange", "xtrim")),
        Need("hdel", records),
        *script_needs(REPLAY, [settings.stream, dead, records]),
    ]


class ConfirmationRequired(StreamdError):
    """A destructive command without --yes, and nobody at a terminal to ask."""

    exit_code = EXIT_USAGE


class Aborted(StreamdError):
    """The operator answered no."""


class DlqError(StreamdError):
    """Bad arguments to a dlq command, or entries that cannot be replayed."""

    exit_code = EXIT_USAGE


def confirm(question: str, yes: bool, interactive: bool | None = None) -> None:
    """Go on with --yes; else ask at a terminal; with no terminal, refuse."""
    if yes:
        return
    if interactive is None:
        interactive = sys.stdin.isatty()
    if not interactive:
        raise ConfirmationRequired(f"{question} Refusing without --yes (no terminal to ask).")
    if not click.confirm(question, default=False):
        raise Aborted("aborted; nothing was changed")


def parse_before(text: str, now: dt.datetime | None = None) -> dt.datetime:
    """An ISO date or time (naive means local time), or an age: 30m, 12h, 7d, 2w."""
    now = now or dt.datetime.now(dt.UTC)
    age = re.fullmatch(r"(\d+)\s*([smhdw])", text.strip())
    if age:
        unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
        return now - dt.timedelta(**{unit[age[2]]: int(age[1])})
    try:
        when = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise DlqError(
            f"--before {text!r}: expected an ISO date/time (2026-01-31, 2026-01-31T12:00Z) "
            "or an age (30m, 12h, 7d, 2w)"
        ) from None
    return when.astimezone(dt.UTC) if when.tzinfo is None else when


# ---------------------------------------------------------------------------------------------


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
    """The dead letters of one stream, in the table and in the dead stream."""

    def __init__(self, settings: Settings, conn: asyncpg.Connection, client: aioredis.Redis):
        self.settings = settings
        self.conn = conn
        self.redis = client
        self.table = quote_ident(settings.dlq_table)
        self.stream = settings.stream
        self.dead_stream = settings.dead_stream
        self.records = f"{settings.dead_stream}:replayed"

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


# ---------------------------------------------------------------------------------------------
# the commands


async def _with_dlq(settings: Settings, work: Callable[[DeadLetters], Any]) -> Any:
    """Run `work` with connections to both; outages and a missing table become one clear line."""
    try:
        conn = await postgres_connect(settings)
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, ValueError) as exc:
        raise postgres_error(settings, exc) from None
    settings = resolve_cluster(settings)  # in a cluster, the dead stream's name depends on it
    client = redis_client(settings, client_name="streamd-dlq")
    try:
        return await work(DeadLetters(settings, conn, client))
    except asyncpg.UndefinedTableError:
        raise DlqError(
            f"table {settings.dlq_table} does not exist: run `streamd db init` (or start serve)"
        ) from None
    except REDIS_FAULTS as exc:
        raise redis_error(settings, exc, "reach the dead stream") from None
    except (asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise postgres_error(settings, exc, "read the dead letters") from None
    finally:
        await client.aclose()
        await conn.close(timeout=5)


def _short(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def render_list(letters: Iterable[DeadLetter], total: int, stream_length: int, s: Settings) -> str:
    lines = [
        f"Dead letters of stream {s.stream}: {total} in table {s.dlq_table}, "
        f"{stream_length} in stream {s.dead_stream}"
    ]
    letters = list(letters)
    if not letters:
        return "\n".join(lines)
    # Columns as wide as their widest value: entry IDs run to 41 characters (a 20-digit
    # millisecond part and a 20-digit sequence), table ids to 19 digits.
    rows = [
        (
            str(d.id),
            d.failed_at.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S"),
            d.entry_id,
            _short(d.event_type or "-", 18),
            _short(d.reason, 16),
            str(d.deliveries),
            _short(d.error, 60),
        )
        for d in letters
    ]
    head = ("ID", "FAILED AT (UTC)", "ENTRY ID", "TYPE", "REASON", "DELIV", "ERROR")
    widths = [max(len(row[i]) for row in [head, *rows]) for i in range(len(head))]
    right = (0, 5)  # numbers
    for row in [head, *rows]:
        cells = [
            cell.rjust(width) if i in right else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    if total > len(letters):
        lines.append(f"(newest {len(letters)} of {total}; --limit N shows more)")
    return "\n".join(lines)


async def dlq_list(
    settings: Settings, limit: int, as_json: bool, out: TextIO | None = None
) -> None:
    out = out or sys.stdout

    async def work(dlq: DeadLetters) -> None:
        letters = await dlq.newest(limit)
        total, length = await dlq.count(), await dlq.stream_length()
        if as_json:
            payload = {
                "stream": settings.stream,
                "count": total,
                "stream_length": length,
                "entries": [d.to_json() for d in letters],
            }
            out.write(orjson.dumps(payload).decode() + "\n")
        else:
            out.write(render_list(letters, total, length, settings) + "\n")

    await _with_dlq(settings, work)


async def dlq_replay(
    settings: Settings,
    ids: Sequence[str],
    replay_all: bool,
    yes: bool,
    out: TextIO | None = None,
    interactive: bool | None = None,
) -> int:
    """Returns how many entries were re-queued."""
    out = out or sys.stdout
    if bool(ids) == replay_all:
        raise DlqError("say which dead letters to replay: --id ID (repeatable) or --all")

    async def work(dlq: DeadLetters) -> int:
        upto = await dlq.last_id()
        if replay_all:
            count = await dlq.count()
        else:
            chosen = await dlq.select(ids)
            missing = set(ids) - {str(d.id) for d in chosen} - {d.entry_id for d in chosen}
            if missing:
                stream = settings.stream
                raise DlqError(f"no dead letter of stream {stream} with id {_ids(missing)}")
            count = len(chosen)
        if count == 0:
            out.write("No dead letters to replay.\n")
            return 0
        confirm(f"Replay {count} dead letter(s) to stream {settings.stream}?", yes, interactive)
        done = 0
        if replay_all:
            after = 0
            while letters := await dlq.page(after, upto):
                done += _report(await dlq.replay(_replayable(letters)), out)
                after = letters[-1].id
        else:
            done += _report(await dlq.replay(_replayable(chosen)), out)
        out.write(f"Replayed {done} dead letter(s) to stream {settings.stream}.\n")
        return done

    return int(await _with_dlq(settings, work))


def _ids(ids: Iterable[str]) -> str:
    return ", ".join(sorted(ids))


def _replayable(letters: list[DeadLetter]) -> list[DeadLetter]:
    for d in letters:
        fields = decode_fields(d.fields)
        if not fields:
            raise DlqError(
                f"dead letter {d.id} ({d.entry_id}) has no fields: the entry was deleted from "
                "the stream before it was ingested, so there is nothing to replay; purge it"
            )
        if len(fields) > MAX_REPLAY_FIELDS:
            raise DlqError(f"dead letter {d.id} has {len(fields) // 2} fields: too many to replay")
    return letters


def _report(done: list[tuple[DeadLetter, str, bool]], out: TextIO) -> int:
    for letter, new_id, now in done:
        how = "re-queued as" if now else "was already re-queued as"
        out.write(f"  {letter.id}: {letter.entry_id} {how} {new_id}\n")
    return len(done)


async def dlq_purge(
    settings: Settings,
    before: str | None,
    yes: bool,
    out: TextIO | None = None,
    interactive: bool | None = None,
) -> tuple[int, int]:
    out = out or sys.stdout
    cutoff = parse_before(before) if before else None

    async def work(dlq: DeadLetters) -> tuple[int, int]:
        count = await dlq.count(cutoff)
        older = f" that failed before {cutoff.isoformat()}" if cutoff else ""
        if count == 0 and await dlq.stream_length() == 0:
            out.write("No dead letters to purge.\n")
            return 0, 0
        confirm(
            f"Delete {count} dead letter(s){older} of stream {settings.stream} "
            f"(table {settings.dlq_table} and stream {settings.dead_stream})?",
            yes,
            interactive,
        )
        rows, trimmed = await dlq.purge(cutoff)
        out.write(
            f"Purged {rows} dead letter(s) from table {settings.dlq_table} and "
            f"{trimmed} from stream {settings.dead_stream}.\n"
        )
        return rows, trimmed

    result: tuple[int, int] = await _with_dlq(settings, work)
    return result
