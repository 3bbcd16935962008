"""Which streams `streams` names: exact names as given, glob patterns resolved in Redis.

A pattern is resolved with SCAN MATCH <pattern> TYPE stream, so a key of another type that
happens to match is never consumed, and a stream created later is found on the next call.
Dead-letter streams (`<stream>:dead`) are never consumed, even when a pattern matches them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import redis.asyncio as aioredis

from streamd.common.text import as_text
from streamd.config.tables import is_pattern

DEAD_SUFFIX = ":dead"
MAX_STREAMS = 1000  # per serve: bounded memory, and one XREADGROUP call stays reasonable
SCAN_COUNT = 1000


@dataclass(frozen=True, slots=True)
class Resolved:
    """The streams to consume, in a stable order, and the patterns that matched none."""

    streams: tuple[str, ...]
    unmatched: tuple[str, ...]
    truncated: int = 0  # streams beyond MAX_STREAMS that were left out


def is_dead_stream(name: str, dead_stream: str = "") -> bool:
    return name.endswith(DEAD_SUFFIX) or (bool(dead_stream) and name == dead_stream)


async def scan_streams(client: aioredis.Redis, pattern: str) -> list[str]:
    """Every stream key matching the glob pattern (SCAN ... TYPE stream)."""
    found = [
        as_text(key)
        async for key in client.scan_iter(match=pattern, count=SCAN_COUNT, _type="stream")
    ]
    return sorted(set(found))


async def resolve_streams(
    client: aioredis.Redis,
    names: Iterable[str],
    *,
    dead_stream: str = "",
    limit: int = MAX_STREAMS,
) -> Resolved:
    """Exact names as given (whether or not they exist yet: the group creates them), then each
    pattern's matches, in the order `names` lists them, without repeats and without dead streams."""
    out: dict[str, None] = {}
    unmatched: list[str] = []
    for name in names:
        if not is_pattern(name):
            out[name] = None
            continue
        found = await scan_streams(client, name)
        matches = [s for s in found if not is_dead_stream(s, dead_stream)]
        if not matches:
            unmatched.append(name)
        out.update(dict.fromkeys(matches))
    streams = tuple(out)
    return Resolved(streams[:limit], tuple(unmatched), max(0, len(streams) - limit))
