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
import fnmatch
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TextIO

import asyncpg
import click
import orjson
import redis.asyncio as aioredis

from streamd.backends.connections import postgres_connect, redis_client, resolve_cluster
from streamd.backends.discovery import resolve_streams
from streamd.backends.faults import REDIS_FAULTS
from streamd.backends.preflight import postgres_error, redis_error
from streamd.backends.redis_acl import Need, database_needs, script_needs
from streamd.backends.sql import quote_ident
from streamd.config.settings import Settings
from streamd.config.tables import STREAM_PATTERN, is_pattern
from streamd.errors import EXIT_USAGE, StreamdError
from streamd.observability.redis_stats import dead_stream_of
from streamd.pipeline.dead_letters import decode_fields
from streamd.tools.dlq_store import MAX_REPLAY_FIELDS, REPLAY, DeadLetter, DeadLetters

__all__ = ["REPLAY", "DeadLetter", "DeadLetters", "dlq_list", "dlq_purge", "dlq_replay"]


def dlq_needs(settings: Settings) -> list[Need]:
    """What `streamd dlq list|replay|purge` runs in Redis, for its minimal ACL (a pattern stands
    for the keys it matches: ACL key patterns are globs too)."""
    needs = [*database_needs(settings), Need("client|setname")]
    if any(is_pattern(name) for name in settings.stream_names):
        needs.append(Need("scan"))
    for name in settings.stream_names:
        dead = dead_stream_of(settings, name)
        records = f"{dead}:replayed"
        needs += [Need(command, dead) for command in ("xlen", "xrange", "xtrim")]
        needs += [Need("hdel", records), *script_needs(REPLAY, [name, dead, records])]
    return needs


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


# ---------------------------------------------------------------------------------------------
# the commands


def chosen_names(settings: Settings, streams: Sequence[str]) -> tuple[str, ...]:
    """--stream NAME (names or patterns, repeatable), else every stream the config names."""
    for name in streams:
        if not STREAM_PATTERN.fullmatch(name):
            raise DlqError(f"--stream {name!r}: not a valid stream name or pattern")
    return tuple(dict.fromkeys(streams)) or settings.stream_names


async def _streams(
    settings: Settings, conn: asyncpg.Connection, client: aioredis.Redis, names: Sequence[str]
) -> list[str]:
    """The streams whose dead letters a command works on: exact names as given; for a pattern,
    the streams in Redis that match it and those the table has dead letters of (a stream may be
    gone from Redis while its dead letters stay)."""
    resolved = await resolve_streams(client, names, dead_stream=settings.dead_stream)
    out = dict.fromkeys(resolved.streams)
    patterns = [n for n in names if is_pattern(n)]
    if patterns:
        table = quote_ident(settings.dlq_table)
        for row in await conn.fetch(f"SELECT DISTINCT stream FROM {table} ORDER BY 1"):
            if any(fnmatch.fnmatchcase(row["stream"], p) for p in patterns):
                out[row["stream"]] = None
    return list(out)


async def _with_dlq(
    settings: Settings, names: Sequence[str], work: Callable[[list[DeadLetters]], Any]
) -> Any:
    """Run `work` with the dead letters of each chosen stream; outages and a missing table
    become one clear line."""
    try:
        conn = await postgres_connect(settings)
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, ValueError) as exc:
        raise postgres_error(settings, exc) from None
    settings = resolve_cluster(settings)  # in a cluster, the dead stream's name depends on it
    client = redis_client(settings, client_name="streamd-dlq")
    try:
        streams = await _streams(settings, conn, client, names)
        return await work([DeadLetters(settings, conn, client, name) for name in streams])
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


def _which(dlqs: Sequence[DeadLetters]) -> str:
    if len(dlqs) == 1:
        return f"stream {dlqs[0].stream}"
    if len(dlqs) <= 5:
        return f"streams {', '.join(d.stream for d in dlqs)}"
    return f"{len(dlqs)} streams"


def render_list(
    letters: Iterable[DeadLetter],
    total: int,
    stream_length: int,
    s: Settings,
    per_stream: dict[str, tuple[int, int, str]] | None = None,
) -> str:
    """The listing; per_stream (stream -> (rows, dead stream length, dead stream)) when it
    covers several streams: a line each, and a STREAM column."""
    if per_stream is None or len(per_stream) == 1:
        stream, dead = s.stream, s.dead_stream
        if per_stream:
            ((stream, (_, _, dead)),) = per_stream.items()
        lines = [
            f"Dead letters of stream {stream}: {total} in table {s.dlq_table}, "
            f"{stream_length} in stream {dead}"
        ]
    else:
        lines = [
            f"Dead letters of {len(per_stream)} streams: {total} in table {s.dlq_table}, "
            f"{stream_length} in their dead streams"
        ]
        lines += [
            f"  {name}: {rows} in the table, {length} in stream {dead}"
            for name, (rows, length, dead) in per_stream.items()
        ]
    letters = list(letters)
    if not letters:
        return "\n".join(lines)
    several = per_stream is not None and len(per_stream) > 1
    # Columns as wide as their widest value: entry IDs run to 41 characters (a 20-digit
    # millisecond part and a 20-digit sequence), table ids to 19 digits.
    rows = [
        (
            str(d.id),
            d.failed_at.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S"),
            *([_short(d.stream, 24)] if several else []),
            d.entry_id,
            _short(d.event_type or "-", 18),
            _short(d.reason, 16),
            str(d.deliveries),
            _short(d.error, 60),
        )
        for d in letters
    ]
    head = (
        "ID",
        "FAILED AT (UTC)",
        *(["STREAM"] if several else []),
        "ENTRY ID",
        "TYPE",
        "REASON",
        "DELIV",
        "ERROR",
    )
    widths = [max(len(row[i]) for row in [head, *rows]) for i in range(len(head))]
    right = (0, len(head) - 2)  # numbers
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
    settings: Settings,
    limit: int,
    as_json: bool,
    out: TextIO | None = None,
    streams: Sequence[str] = (),
) -> None:
    out = out or sys.stdout
    names = chosen_names(settings, streams)

    async def work(dlqs: list[DeadLetters]) -> None:
        letters: list[DeadLetter] = []
        per_stream: dict[str, tuple[int, int, str]] = {}
        for dlq in dlqs:
            letters += await dlq.newest(limit)
            per_stream[dlq.stream] = (await dlq.count(), await dlq.stream_length(), dlq.dead_stream)
        letters = sorted(letters, key=lambda d: d.id, reverse=True)[:limit]
        total = sum(rows for rows, _, _ in per_stream.values())
        length = sum(n for _, n, _ in per_stream.values())
        if as_json:
            payload = {
                "stream": dlqs[0].stream if len(dlqs) == 1 else None,
                "count": total,
                "stream_length": length,
                "streams": {
                    name: {"count": rows, "stream_length": n, "dead_stream": dead}
                    for name, (rows, n, dead) in per_stream.items()
                },
                "entries": [d.to_json() for d in letters],
            }
            out.write(orjson.dumps(payload).decode() + "\n")
        else:
            out.write(render_list(letters, total, length, settings, per_stream) + "\n")

    await _with_dlq(settings, names, work)


async def dlq_replay(
    settings: Settings,
    ids: Sequence[str],
    replay_all: bool,
    yes: bool,
    out: TextIO | None = None,
    interactive: bool | None = None,
    streams: Sequence[str] = (),
) -> int:
    """Returns how many entries were re-queued, each to its own stream."""
    out = out or sys.stdout
    if bool(ids) == replay_all:
        raise DlqError("say which dead letters to replay: --id ID (repeatable) or --all")
    names = chosen_names(settings, streams)

    async def work(dlqs: list[DeadLetters]) -> int:
        upto = {dlq.stream: await dlq.last_id() for dlq in dlqs}
        chosen: dict[str, list[DeadLetter]] = {}
        if replay_all:
            counts = {dlq.stream: await dlq.count() for dlq in dlqs}
        else:
            for dlq in dlqs:
                chosen[dlq.stream] = await dlq.select(ids)
            found = [d for letters in chosen.values() for d in letters]
            missing = set(ids) - {str(d.id) for d in found} - {d.entry_id for d in found}
            if missing:
                raise DlqError(f"no dead letter of {_which(dlqs)} with id {_ids(missing)}")
            counts = {name: len(letters) for name, letters in chosen.items()}
        busy = [dlq for dlq in dlqs if counts.get(dlq.stream)]
        count = sum(counts.values())
        if count == 0:
            out.write("No dead letters to replay.\n")
            return 0
        confirm(f"Replay {count} dead letter(s) to {_which(busy)}?", yes, interactive)
        done = 0
        for dlq in busy:
            if replay_all:
                after = 0
                while letters := await dlq.page(after, upto[dlq.stream]):
                    done += _report(await dlq.replay(_replayable(letters)), out)
                    after = letters[-1].id
            else:
                done += _report(await dlq.replay(_replayable(chosen[dlq.stream])), out)
        out.write(f"Replayed {done} dead letter(s) to {_which(busy)}.\n")
        return done

    return int(await _with_dlq(settings, names, work))


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
    streams: Sequence[str] = (),
) -> tuple[int, int]:
    out = out or sys.stdout
    cutoff = parse_before(before) if before else None
    names = chosen_names(settings, streams)

    async def work(dlqs: list[DeadLetters]) -> tuple[int, int]:
        counts = {dlq.stream: (await dlq.count(cutoff), await dlq.stream_length()) for dlq in dlqs}
        busy = [dlq for dlq in dlqs if any(counts[dlq.stream])]
        count = sum(rows for rows, _ in counts.values())
        older = f" that failed before {cutoff.isoformat()}" if cutoff else ""
        if not busy:
            out.write("No dead letters to purge.\n")
            return 0, 0
        dead = ", ".join(d.dead_stream for d in busy) if len(busy) <= 5 else "their dead streams"
        where = "stream" if len(busy) == 1 else "streams"
        confirm(
            f"Delete {count} dead letter(s){older} of {_which(busy)} "
            f"(table {settings.dlq_table} and {where} {dead})?",
            yes,
            interactive,
        )
        rows = trimmed = 0
        for dlq in busy:
            purged, cut = await dlq.purge(cutoff)
            rows, trimmed = rows + purged, trimmed + cut
        out.write(
            f"Purged {rows} dead letter(s) from table {settings.dlq_table} and "
            f"{trimmed} from {where} {dead}.\n"
        )
        return rows, trimmed

    result: tuple[int, int] = await _with_dlq(settings, names, work)
    return result
