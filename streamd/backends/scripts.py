"""Lua scripts for Redis, declared one way: a name, what each of its KEYS is, and the source.

Every key a script touches is declared here and passed on each call, never built inside the
script: that is what lets Redis route a call by its keys (in a Redis Cluster, a script's keys
must all hash to one slot).

A call is EVALSHA. When Redis does not know the script (it restarted, SCRIPT FLUSH, a failover to
a server that never saw it) the source is loaded with SCRIPT LOAD and the call sent once more:
NOSCRIPT means nothing ran, so sending it again is safe.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions

Key = str | bytes


@dataclass(frozen=True, slots=True)
class RedisScript:
    name: str
    keys: tuple[str, ...]  # what KEYS[1], KEYS[2], ... are, in order
    source: str
    sha: str = field(init=False, repr=False)  # SHA1 of the source: what EVALSHA names it by

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.source.encode()).hexdigest())

    async def load(self, client: aioredis.Redis) -> None:
        """SCRIPT LOAD: make the server know the script (and check that it compiles)."""
        await client.script_load(self.source)

    async def call(self, client: aioredis.Redis, keys: Sequence[Key], args: Sequence[Any]) -> Any:
        """EVALSHA with these keys (as declared, in order) and args, loading it if need be."""
        self._check(keys)
        try:
            return await client.evalsha(self.sha, len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:
            await self.load(client)
            return await client.evalsha(self.sha, len(keys), *keys, *args)

    def evalsha_head(self, keys: Sequence[bytes]) -> tuple[bytes, ...]:
        """`EVALSHA sha numkeys key...`, for callers that pack and pipeline commands themselves;
        the args follow. They load the script (and reload it on NOSCRIPT) with `load`."""
        self._check(keys)
        return (b"EVALSHA", self.sha.encode(), str(len(keys)).encode(), *keys)

    def _check(self, keys: Sequence[Key]) -> None:
        if len(keys) != len(self.keys):
            raise ValueError(
                f"script {self.name} takes {len(self.keys)} keys ({', '.join(self.keys)}), "
                f"got {len(keys)}"
            )
