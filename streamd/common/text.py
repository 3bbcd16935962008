"""Text from what Redis replies: bytes (hiredis) or already text."""

from __future__ import annotations

from typing import Any


def as_text(value: Any) -> str:
    """Bytes decoded as UTF-8 (anything invalid replaced, never an exception); else str()."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("utf-8", "replace")
    return str(value)


def human_bytes(size: int) -> str:
    """1536 -> "1.5 kB", as pg_size_pretty prints sizes (powers of 1024)."""
    value = float(size)
    for unit in ("bytes", "kB", "MB", "GB", "TB"):
        if value < 1024 or unit == "TB":
            return f"{size} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} bytes"
