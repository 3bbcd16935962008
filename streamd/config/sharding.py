"""Names of shards and dead streams, as Redis Cluster routes them (pure: no I/O).

A Redis Cluster places a key by its hash tag (the text between the first `{` and the next `}`,
when not empty) or else by the whole key. Two keys a script touches must share a slot, so:

- A sharded stream `events` with `shards = N` is the N keys `events:{0}` ... `events:{N-1}`:
  each shard's tag is its number, so the cluster spreads the shards over its masters, and a
  shard's dead stream `events:{3}:dead` carries the same tag (the same slot).
- A stream with a tag of its own (`{orders}`, `orders:{eu}`) keeps `<stream>:dead`: same tag.
- A stream without a tag in a cluster gets `{<stream>}:dead`. The tag's text is the whole stream
  name, and a key with a tag hashes only its tag, so `{events}:dead` lands in exactly the slot of
  `events`: no renaming of the user's stream, and still one slot per script. On a single Redis
  (no slots) the dead stream stays `<stream>:dead`, as it always was.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from streamd.config.tables import is_pattern

DEAD_SUFFIX = ":dead"


def hash_tag(key: str) -> str | None:
    """The part of key Redis Cluster hashes when it is not the whole key (Redis's own rule)."""
    start = key.find("{")
    if start < 0:
        return None
    end = key.find("}", start + 1)
    if end < 0 or end == start + 1:
        return None
    return key[start + 1 : end]


def shard_keys(stream: str, shards: int) -> tuple[str, ...]:
    """The keys of a logical stream: itself when not sharded, else `<stream>:{i}`."""
    if shards <= 1:
        return (stream,)
    return tuple(f"{stream}:{{{i}}}" for i in range(shards))


def expand_shards(names: Iterable[str], shards: int) -> tuple[str, ...]:
    """`names` with each plain name replaced by its shard keys (patterns are kept as they are:
    a pattern already matches whatever keys exist)."""
    out: list[str] = []
    for name in names:
        out.extend((name,) if is_pattern(name) else shard_keys(name, shards))
    return tuple(dict.fromkeys(out))


_SHARD = re.compile(r"(.+):\{(\d+)\}")


def logical_stream(key: str) -> str:
    """The logical stream of a shard key (`events:{3}` -> `events`); other keys: themselves."""
    found = _SHARD.fullmatch(key)
    return found.group(1) if found else key


def dead_stream_of(stream: str, cluster: bool) -> str:
    """The dead-letter stream of `stream`, in the same cluster slot (see the module doc)."""
    if cluster and hash_tag(stream) is None:
        return f"{{{stream}}}{DEAD_SUFFIX}"
    return f"{stream}{DEAD_SUFFIX}"
