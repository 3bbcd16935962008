"""Redis stream entry IDs (`<ms>-<seq>`): ordering, the next one, and the time they carry."""

from __future__ import annotations


def next_id(entry_id: str) -> str:
    """The smallest stream ID greater than entry_id (XRANGE's exclusive "(" needs Redis 6.2)."""
    ms, _, seq = entry_id.partition("-")
    return f"{ms}-{int(seq or 0) + 1}"


def id_key(entry_id: str) -> tuple[int, int]:
    """entry_id as a sortable (ms, seq) pair."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def id_ms(entry_id: str) -> int:
    """The millisecond time in entry_id: when Redis (or the producer that chose it) made it."""
    return int(entry_id.partition("-")[0])
