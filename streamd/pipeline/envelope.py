"""The envelope contract: which stream entries become rows and which are dead letters.

An entry carries `type` (required, non-empty, at most 128 bytes), `data` (required, JSON text) and
`ts` (optional, integer epoch milliseconds). Extra fields are allowed. This module does the checks
that are cheap in Python (presence, sizes, `ts`); JSON syntax and text encoding are checked by
Postgres itself while it parses the COPY stream, and rows it refuses are isolated by the sink.
Everything here works on raw bytes, per batch, with no decoding on the fast path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import orjson

MAX_TYPE_BYTES = 128
# Postgres timestamps count microseconds from 2000-01-01 UTC.
PG_EPOCH_MS = 946_684_800_000
MAX_TS_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z: keeps produced_at a valid timestamptz


# One entry ready for COPY, the raw bytes Postgres will receive, as a plain tuple (one is made per
# event: a NamedTuple's Python-level constructor and getters cost ~20% of the parse):
#   (entry_id, event_type, payload, produced_us, meta, fields)
# produced_us: microseconds since 2000-01-01 UTC, the binary form of timestamptz; meta: a JSON
# object of extra fields, or None; fields: the raw entry, kept for a dead-letter record.
Row = tuple[bytes, bytes, bytes, int, bytes | None, list[bytes]]
ENTRY_ID: Final = 0
EVENT_TYPE: Final = 1
PAYLOAD: Final = 2
PRODUCED_US: Final = 3
META: Final = 4
FIELDS: Final = 5

# Every reason a dead letter can have (docs/dead-letters.md explains each; a test keeps this list
# equal to the ones the code gives). Metrics export each at 0 from the start, so an alert on
# their increase sees the very first one.
DEAD_LETTER_REASONS: Final = (
    "missing_type",
    "empty_type",
    "type_too_long",
    "missing_data",
    "oversize",
    "invalid_ts",
    "duplicate_field",
    "invalid_json",
    "invalid_encoding",
    "too_deeply_nested",
    "rejected_by_postgres",
    "invalid_column",
    "poison",
    "deleted",
)


@dataclass(frozen=True, slots=True)
class Rejection:
    """An entry that cannot become a row, with a short reason code and the precise error."""

    entry_id: bytes
    fields: list[bytes]
    reason: str
    error: str
    deliveries: int = 1

    @property
    def event_type(self) -> bytes | None:
        pairs = self.fields
        for i in range(0, len(pairs) - 1, 2):
            if pairs[i] == b"type":
                return pairs[i + 1]
        return None


# An entry as hiredis returns it from XREADGROUP / XAUTOCLAIM: [id, [field, value, ...]], an
# untyped wire reply. A deleted entry that was still pending comes back with None for its fields.
RawEntry = Any


def split_entries(
    entries: list[RawEntry], max_event_bytes: int, keep_extra_fields: bool = False
) -> tuple[list[Row], list[Rejection]]:
    """Turn raw entries into rows and rejections, in stream order."""
    rows: list[Row] = []
    rejects: list[Rejection] = []
    append = rows.append
    # The last valid `ts` and its value: entries of one millisecond share it.
    last_ts: bytes | None = None
    last_us = 0
    for entry_id, fields in entries:
        # Fast paths: the exact layouts well-behaved producers write, streamd's own included
        # (type, data, ts); anything else is checked field by field.
        size = len(fields) if fields is not None else 0
        if (
            (size == 4 or (size == 6 and fields[4] == b"ts"))
            and fields[0] == b"type"
            and fields[2] == b"data"
            and 0 < len(fields[1]) <= MAX_TYPE_BYTES
            and len(fields[3]) <= max_event_bytes
        ):
            if size == 4:
                produced_us = (int(entry_id[: entry_id.index(b"-")]) - PG_EPOCH_MS) * 1000
            elif fields[5] == last_ts:
                produced_us = last_us
            else:
                ts_us = _ts_us(fields[5])
                if ts_us is None:
                    rejects.append(_invalid_ts(entry_id, fields, fields[5]))
                    continue
                last_ts, last_us = fields[5], ts_us
                produced_us = ts_us
            append((entry_id, fields[1], fields[3], produced_us, None, fields))
            continue
        parsed = _parse_slow(entry_id, fields, max_event_bytes, keep_extra_fields)
        if isinstance(parsed, Rejection):
            rejects.append(parsed)
        else:
            append(parsed)
    return rows, rejects


def _id_us(entry_id: bytes) -> int:
    return (int(entry_id.partition(b"-")[0]) - PG_EPOCH_MS) * 1000


def _parse_slow(
    entry_id: bytes, fields: list[bytes] | None, max_event_bytes: int, keep_extra_fields: bool
) -> Row | Rejection:
    def reject(reason: str, error: str) -> Rejection:
        return Rejection(entry_id, fields or [], reason, error)

    if fields is None:
        return reject("deleted", "entry was deleted from the stream before it was ingested")
    values: dict[bytes, bytes] = {}
    for i in range(0, len(fields) - 1, 2):
        name = fields[i]
        if name in values and name in (b"type", b"data", b"ts"):
            return reject("duplicate_field", f"field {name.decode()!r} appears more than once")
        values.setdefault(name, fields[i + 1])
    event_type = values.get(b"type")
    data = values.get(b"data")
    if event_type is None:
        return reject("missing_type", "entry has no 'type' field")
    if not event_type:
        return reject("empty_type", "'type' is empty")
    if len(event_type) > MAX_TYPE_BYTES:
        return reject(
            "type_too_long", f"'type' is {len(event_type)} bytes; the limit is {MAX_TYPE_BYTES}"
        )
    if data is None:
        return reject("missing_data", "entry has no 'data' field")
    if len(data) > max_event_bytes:
        return reject(
            "oversize", f"'data' is {len(data)} bytes; max_event_bytes is {max_event_bytes}"
        )
    ts = values.get(b"ts")
    produced_us = _id_us(entry_id) if ts is None else _ts_us(ts)
    if produced_us is None:
        return _invalid_ts(entry_id, fields, ts or b"")
    meta = _extra_fields_json(values) if keep_extra_fields else None
    return (entry_id, event_type, data, produced_us, meta, fields)


def _extra_fields_json(values: dict[bytes, bytes]) -> bytes | None:
    extra = {_text(k): _text(v) for k, v in values.items() if k not in (b"type", b"data", b"ts")}
    return orjson.dumps(extra) if extra else None


def _invalid_ts(entry_id: bytes, fields: list[bytes], ts: bytes) -> Rejection:
    shown = ts[:40].decode("utf-8", "replace")
    error = f"'ts' must be integer epoch milliseconds, got {shown!r}"
    return Rejection(entry_id, fields, "invalid_ts", error)


def _ts_us(ts: bytes) -> int | None:
    """`ts` (epoch ms) as Postgres microseconds, or None if it is not a plausible epoch-ms.

    The length check comes first: int() of a huge digit string is slow (and refused past 4300
    digits); 20 digits leave room for leading zeros.
    """
    if len(ts) > 20 or not ts.isdigit():
        return None
    ms = int(ts)
    return (ms - PG_EPOCH_MS) * 1000 if ms <= MAX_TS_MS else None


def _text(raw: bytes) -> str:
    """Bytes as JSONB-safe text: invalid UTF-8 is replaced, NUL (which jsonb refuses) dropped."""
    return raw.decode("utf-8", "replace").replace("\x00", "")
