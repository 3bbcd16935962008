"""Rows Postgres refuses for their data, told apart from the rest of a batch: the row an
error's COPY line names is split off (else the batch is bisected), becomes a dead letter with
Postgres's own reason, and the others are written again. Both sinks (sink.py, typed_sink.py)
isolate their rows this way.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable

import asyncpg

from streamd.pipeline.envelope import ENTRY_ID, FIELDS, Rejection, Row

_COPY_LINE = re.compile(r"COPY \S+, line (\d+)")

# Errors about the rows themselves: bad values (22), constraint violations other than the unique
# key (23), and per-row limits such as JSON nested too deep or a value too large (54).
ROW_ERRORS = (
    asyncpg.DataError,
    asyncpg.IntegrityConstraintViolationError,
    asyncpg.ProgramLimitExceededError,
)


async def isolate_rows(
    conn: asyncpg.Connection,
    rows: list[Row],
    attempt: Callable[[list[Row]], Awaitable[None]],
    refused: list[Rejection],
    keep_raising: Callable[[BaseException], bool] = lambda _exc: False,
) -> None:
    """Run attempt(rows) in a savepoint of the open transaction; when Postgres refuses a row, it
    goes to `refused` and the others are tried again: the row the error's COPY line names, else
    found by bisection. Errors keep_raising picks (not the rows' fault) propagate."""
    while rows:
        try:
            async with conn.transaction():  # a savepoint: a refusal undoes only this attempt
                await attempt(rows)
        except ROW_ERRORS as exc:
            if keep_raising(exc):
                raise
            if len(rows) == 1:
                refused.append(refusal(rows[0], exc))
                return
            bad = failing_row(exc, len(rows))
            if bad is None:  # no line number: bisect
                middle = len(rows) // 2
                await isolate_rows(conn, rows[:middle], attempt, refused, keep_raising)
                rows = rows[middle:]
                continue
            if bad:
                await isolate_rows(conn, rows[:bad], attempt, refused, keep_raising)
            refused.append(refusal(rows[bad], exc))
            rows = rows[bad + 1 :]
        else:
            return


def failing_row(exc: asyncpg.PostgresError, count: int) -> int | None:
    """The index of the row a COPY error names ("COPY events, line 7, ..."), if any."""
    found = _COPY_LINE.search(getattr(exc, "context", None) or "")
    if found is None:
        return None
    index = int(found.group(1)) - 1
    return index if 0 <= index < count else None


_REASONS = {
    "22P02": "invalid_json",  # invalid_text_representation: JSON syntax
    "22021": "invalid_encoding",  # character_not_in_repertoire: bad UTF-8 or NUL in text
    "22P05": "invalid_json",  # untranslatable_character: \u0000 in JSON
    "54001": "too_deeply_nested",  # statement_too_complex: stack depth while parsing JSON
}


def refusal(row: Row, exc: asyncpg.PostgresError) -> Rejection:
    where = getattr(exc, "context", None) or ""
    column = re.search(r"column (\w+)", where)
    field_name = {"payload": "data", "event_type": "type", "meta": "meta"}.get(
        column.group(1) if column else "", ""
    )
    detail = f" ({exc.detail})" if getattr(exc, "detail", None) else ""
    message = str(exc).splitlines()[0] + detail
    error = f"{field_name}: {message}" if field_name else message
    reason = _REASONS.get(exc.sqlstate or "", "rejected_by_postgres")
    return Rejection(row[ENTRY_ID], row[FIELDS], reason, f"Postgres refused the row: {error}")
