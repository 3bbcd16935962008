"""Lua scripts for Redis, declared one way: a name, what each of its KEYS is, and the source.

Every key a script touches is declared here and passed on each call, never built inside the
script: that is what lets Redis route a call by its keys (in a Redis Cluster, a script's keys
must all hash to one slot).

A call is EVALSHA. When Redis does not know the script (it restarted, SCRIPT FLUSH, a failover to
a server that never saw it) the source is loaded with SCRIPT LOAD and the call sent once more:
NOSCRIPT means nothing ran, so sending it again is safe.

A script runs with the caller's ACL: each command it calls must be allowed too (`commands` lists
them, for the start-up check of backends/redis_acl.py). Redis's refusal inside a script names only
the script's line; `call` raises it as a ScriptPermissionError that names the command.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions

Key = str | bytes

# redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ...), call('XADD', KEYS[2], ...): the command, its
# subcommand for container commands, and the key it works on.
_CALL = re.compile(r"\bcall\(\s*'(\w+)'\s*,\s*(?:'(\w+)'\s*,\s*)?KEYS\[(\d+)\]")
_CONTAINERS = frozenset({"XGROUP", "XINFO", "CLIENT", "SCRIPT", "OBJECT", "CONFIG", "MEMORY"})
# Redis's refusal of a command or a key inside a script; it names the script's line.
_SCRIPT_REFUSAL = "The user executing the script can't"
_SCRIPT_LINE = re.compile(r"@user_script:(\d+)")


class ScriptPermissionError(redis.exceptions.NoPermissionError):
    """The ACL refused a command a script calls (`command`, its ACL name: 'xadd'), or the key
    that command works on (`key_refused`)."""

    def __init__(self, message: str, command: str | None, *, key_refused: bool = False) -> None:
        super().__init__(message)
        self.command = command
        self.key_refused = key_refused


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
            try:
                return await client.evalsha(self.sha, len(keys), *keys, *args)
            except redis.exceptions.NoScriptError:
                await self.load(client)
                return await client.evalsha(self.sha, len(keys), *keys, *args)
        except redis.exceptions.ResponseError as exc:
            refused = self.permission_error(exc)
            if refused is not None:
                raise refused from None
            raise

    @property
    def commands(self) -> tuple[tuple[str, int], ...]:
        """The commands the script calls, as ACL names them ('xack', 'xgroup|delconsumer'), each
        with the index in `keys` of the key it works on."""
        found: list[tuple[str, int]] = []
        for name, sub, key in _CALL.findall(self.source):
            command = f"{name}|{sub}" if sub and name in _CONTAINERS else name
            item = (command.lower(), int(key) - 1)
            if item not in found:
                found.append(item)
        return tuple(found)

    def permission_error(self, exc: redis.exceptions.ResponseError) -> ScriptPermissionError | None:
        """Redis's refusal of a command inside this script, as an error that names the command
        (from the script's line Redis names); None for any other error."""
        text = str(exc)
        if _SCRIPT_REFUSAL not in text:
            return None
        line = _SCRIPT_LINE.search(text)
        lines = self.source.splitlines()
        command = None
        number = int(line.group(1)) if line is not None else 0
        # The call on that line, or (a call written over several lines) the one it continues.
        for code in reversed(lines[: min(number, len(lines))]):
            called = _CALL.search(code)
            if called is not None:
                name, sub, _key = called.groups()
                command = (f"{name}|{sub}" if sub and name in _CONTAINERS else name).lower()
                break
        reason = text.split(" script:")[0]
        what = f"its call of {command.upper().replace('|', ' ')}" if command else "a call"
        key_refused = "access at least one of the keys" in text
        return ScriptPermissionError(
            f"script {self.name}, {what}: {reason}", command, key_refused=key_refused
        )

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
