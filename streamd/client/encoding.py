"""Validation and encoding of events for the producer: everything is checked before anything is
sent, and an invalid event raises InvalidEvent naming its position in the batch."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import orjson

from streamd.client.errors import InvalidEvent
from streamd.pipeline.envelope import MAX_TYPE_BYTES

Event = tuple[str, Any]

# `\u0000` that is not itself escaped: Postgres' jsonb refuses it, so the event would be a dead
# letter. An even run of backslashes before it means the backslash itself was escaped.
_NUL_ESCAPE = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000")


class Encoder:
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
