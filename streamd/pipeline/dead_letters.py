"""Dead letters: how a rejected entry is recorded in the DLQ table and the DLQ stream.

The table row is written in the same transaction as the batch's good rows; the DLQ stream entry is
written by a Redis script that XACKs the source entry and XADDs the dead letter atomically, and only
when this consumer's XACK is the one that removed the entry from the pending list. So a replayed or
reclaimed batch never writes a dead letter twice, in either place.

Raw fields are stored as a JSON object that round-trips bytes exactly: valid UTF-8 without NUL
stays a string; anything else becomes {"$base64": "..."}; a field name that repeats maps to a list.
"""

from __future__ import annotations

import base64
from typing import Any

import orjson

from streamd.backends.scripts import RedisScript
from streamd.pipeline.envelope import Rejection

B64 = "$base64"
_B64_KEY_PREFIX = "$base64:"

# ARGV: group, maxlen (0: none), then per dead letter six values: entry_id, event_type, reason,
# error, deliveries, fields_json. Returns how many were dead-lettered.
ACK_AND_DEAD_LETTER = RedisScript(
    "ack_and_dead_letter",
    keys=("source stream", "dead stream"),
    source="""
local written = 0
for i = 3, #ARGV, 6 do
  if redis.call('XACK', KEYS[1], ARGV[1], ARGV[i]) == 1 then
    if tonumber(ARGV[2]) > 0 then
      redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*',
        'stream', KEYS[1], 'entry_id', ARGV[i], 'event_type', ARGV[i+1], 'reason', ARGV[i+2],
        'error', ARGV[i+3], 'deliveries', ARGV[i+4], 'fields', ARGV[i+5])
    else
      redis.call('XADD', KEYS[2], '*',
        'stream', KEYS[1], 'entry_id', ARGV[i], 'event_type', ARGV[i+1], 'reason', ARGV[i+2],
        'error', ARGV[i+3], 'deliveries', ARGV[i+4], 'fields', ARGV[i+5])
    end
    written = written + 1
  end
end
return written
""",
)


def _is_safe_text(raw: bytes) -> str | None:
    if b"\x00" in raw:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def encode_fields(fields: list[bytes]) -> dict[str, Any]:
    """Raw stream fields as a JSONB-safe object that `decode_fields` turns back into bytes."""
    out: dict[str, Any] = {}
    for i in range(0, len(fields) - 1, 2):
        name, value = fields[i], fields[i + 1]
        key = _is_safe_text(name)
        if key is None or key.startswith(_B64_KEY_PREFIX):
            key = _B64_KEY_PREFIX + base64.b64encode(name).decode()
        text = _is_safe_text(value)
        encoded: Any = text if text is not None else {B64: base64.b64encode(value).decode()}
        if key in out:
            previous = out[key]
            out[key] = [*previous, encoded] if isinstance(previous, list) else [previous, encoded]
        else:
            out[key] = encoded
    return out


def decode_fields(obj: dict[str, Any]) -> list[bytes]:
    """The original flat [name, value, ...] list from an `encode_fields` object."""
    flat: list[bytes] = []
    for key, value in obj.items():
        name = (
            base64.b64decode(key[len(_B64_KEY_PREFIX) :])
            if key.startswith(_B64_KEY_PREFIX)
            else key.encode()
        )
        for item in value if isinstance(value, list) else [value]:
            flat.append(name)
            flat.append(base64.b64decode(item[B64]) if isinstance(item, dict) else item.encode())
    return flat


def safe_type(rejection: Rejection) -> str | None:
    raw = rejection.event_type
    if raw is None:
        return None
    return raw.decode("utf-8", "replace").replace("\x00", "")[:128]


def table_rows(stream: str, rejections: list[Rejection]) -> list[tuple[Any, ...]]:
    """Parameters for `insert_sql`, one tuple per rejection."""
    return [
        (
            stream,
            r.entry_id.decode(),
            safe_type(r),
            orjson.dumps(encode_fields(r.fields)).decode(),
            r.reason,
            r.error,
            r.deliveries,
        )
        for r in rejections
    ]


def insert_sql(quoted_table: str) -> str:
    return (
        f"INSERT INTO {quoted_table} "
        "(stream, entry_id, event_type, fields, reason, error, deliveries) "
        "VALUES ($1, $2, $3, $4::jsonb, $5, $6, $7) ON CONFLICT (stream, entry_id) DO NOTHING"
    )


def script_args(group: str, maxlen: int, rejections: list[Rejection]) -> list[Any]:
    """ARGV for ACK_AND_DEAD_LETTER."""
    args: list[Any] = [group, maxlen]
    for r in rejections:
        args += [
            r.entry_id,
            safe_type(r) or "",
            r.reason,
            r.error,
            r.deliveries,
            orjson.dumps(encode_fields(r.fields)),
        ]
    return args
