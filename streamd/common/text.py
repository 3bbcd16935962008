"""Text from what Redis replies: bytes (hiredis) or already text."""

from __future__ import annotations

from typing import Any


def as_text(value: Any) -> str:
    """Bytes decoded as UTF-8 (anything invalid replaced, never an exception); else str()."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("utf-8", "replace")
    return str(value)
