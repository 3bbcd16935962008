"""Shrinking `shards` safely: serve refuses to start while a shard beyond the new count still
holds entries its group has not finished, since nothing would ever read them again.

Growing is always safe (new shards start empty; a key's events move to its new shard from then
on, so per-key order holds only within each era). To shrink: stop the producers, let serve drain
every shard (pending 0, nothing undelivered), then lower `shards`.
"""

from __future__ import annotations

import redis.asyncio as aioredis
import redis.exceptions

from streamd.common.text import as_text
from streamd.config.settings import Settings
from streamd.config.tables import is_pattern
from streamd.errors import BootError

MAX_SHARDS = 1024  # the `shards` setting's maximum


async def unfinished(client: aioredis.Redis, key: str, group: str) -> int:
    """Entries of the stream `key` the group has not acknowledged: pending, plus 1 when anything
    is left undelivered (an exact count would cost a scan; any is too many)."""
    groups = await client.xinfo_groups(key)
    mine = next((g for g in groups if as_text(g["name"]) == group), None)
    if mine is None:
        return int(await client.xlen(key))
    after = await client.xrange(key, min=f"({as_text(mine['last-delivered-id'])}", count=1)
    return int(mine["pending"]) + (1 if after else 0)


async def check_shrink(client: aioredis.Redis, settings: Settings) -> None:
    """BootError naming the first shard beyond `shards` that still holds unfinished entries.

    Shards are numbered without gaps and a stream with a group outlives its last entry, so the
    shards an earlier, larger `shards` made are `<name>:{N}`, `<name>:{N+1}`, ... up to the
    first that does not exist: a few EXISTS, no SCAN of the keyspace."""
    names = settings.streams or (settings.stream,)
    for name in (n for n in names if not is_pattern(n)):
        index = settings.shards if settings.shards > 1 else 0
        while index < MAX_SHARDS:
            key = f"{name}:{{{index}}}"
            try:
                if not await client.exists(key):
                    break
            except redis.exceptions.NoPermissionError:
                break  # the ACL keeps serve from this key: no shard of ours was ever there
            if await unfinished(client, key, settings.group):
                raise BootError(
                    f"stream {name!r}: shard {key!r} still holds entries not yet ingested, "
                    f"beyond shards = {settings.shards}; set shards back to at least "
                    f"{index + 1} until serve has drained it (see docs/scale-out.md)"
                )
            index += 1
