"""Redis ACLs: which commands (on which keys) a streamd command needs, a check at start that the
user may run every one of them, and the minimal `ACL SETUSER` rule.

Each family of commands (serve, produce, monitor, dlq) declares its `Need`s next to its code; a
script's needs are the EVALSHA and SCRIPT LOAD that run it plus every command it calls, since a
script runs with the caller's ACL. The check asks Redis with ACL DRYRUN when the user may run
that (an administrator), and otherwise sends a harmless probe of each command: the command on
streamd's own keys with arguments that fail right after the ACL check (a consumer group that does
not exist, the ID 0-0, a client ID nobody has), so nothing is read, written or created but the
scripts themselves (SCRIPT LOAD, which the first call would do anyway). The ACL check comes before
every other check in Redis, so a refusal (NOPERM) answers the probe if and only if the command
is not allowed.

A need may be optional: without it streamd works, less well (`effect` says how), and the check
warns instead of failing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
import redis.exceptions

from streamd.backends.scripts import RedisScript
from streamd.config.settings import Settings

PROBE_GROUP = "streamd-acl-probe"  # a consumer group nobody creates: probes naming it fail after
PROBE_FIELD = "streamd-acl-probe"  # the ACL check (NOGROUP), as do those naming this hash field
NO_SCRIPT = "0" * 40  # an SHA1 no script has: EVALSHA answers NOSCRIPT once the ACL let it by


@dataclass(frozen=True, slots=True)
class Need:
    """A command (as ACL names it: 'xreadgroup', 'xinfo|consumers') on a key (None: no key)."""

    command: str
    key: str | None = None
    effect: str = ""  # optional: what degrades without it; required when empty
    script: RedisScript | None = None  # for evalsha and script|load: which script

    @property
    def optional(self) -> bool:
        return bool(self.effect)


@dataclass(frozen=True, slots=True)
class Refusal:
    need: Need
    reason: str  # Redis's words


# How to call each command harmlessly (key, need) -> arguments.
_PROBES: dict[str, Callable[[str, Need], tuple[Any, ...]]] = {
    "ping": lambda k, n: ("PING",),
    "scan": lambda k, n: ("SCAN", 0, "MATCH", PROBE_GROUP, "COUNT", 1),
    "select": lambda k, n: ("SELECT", k),  # k: the database number the client already uses
    "client|id": lambda k, n: ("CLIENT", "ID"),
    "client|unblock": lambda k, n: ("CLIENT", "UNBLOCK", 0),  # client IDs start at 1
    "client|setname": lambda k, n: ("CLIENT", "SETNAME", PROBE_GROUP),
    "xgroup|create": lambda k, n: ("XGROUP", "CREATE", k, PROBE_GROUP, "not-an-id"),
    "xgroup|delconsumer": lambda k, n: ("XGROUP", "DELCONSUMER", k, PROBE_GROUP, PROBE_GROUP),
    "xreadgroup": lambda k, n: (
        *("XREADGROUP", "GROUP", PROBE_GROUP, PROBE_GROUP, "COUNT", 1, "STREAMS", k, ">"),
    ),
    "xack": lambda k, n: ("XACK", k, PROBE_GROUP, "0-1"),
    "xclaim": lambda k, n: ("XCLAIM", k, PROBE_GROUP, PROBE_GROUP, 0, "0-1"),
    "xautoclaim": lambda k, n: ("XAUTOCLAIM", k, PROBE_GROUP, PROBE_GROUP, 0, "0-0", "COUNT", 1),
    "xpending": lambda k, n: ("XPENDING", k, PROBE_GROUP),
    "xinfo|groups": lambda k, n: ("XINFO", "GROUPS", k),
    "xinfo|consumers": lambda k, n: ("XINFO", "CONSUMERS", k, PROBE_GROUP),
    "xtrim": lambda k, n: ("XTRIM", k, "MINID", "0-0"),  # entries below 0-0: there are none
    "xadd": lambda k, n: ("XADD", k, "0-0", PROBE_FIELD, ""),  # 0-0 is never a valid new ID
    "xlen": lambda k, n: ("XLEN", k),
    "xrange": lambda k, n: ("XRANGE", k, "+", "-", "COUNT", 1),  # an empty range
    "xdel": lambda k, n: ("XDEL", k, "0-0"),  # no entry has the ID 0-0
    "hget": lambda k, n: ("HGET", k, PROBE_FIELD),
    "hset": lambda k, n: ("HSET", k, PROBE_FIELD, "", PROBE_FIELD),  # odd pairs: refused after
    "hdel": lambda k, n: ("HDEL", k, PROBE_FIELD),
    "evalsha": lambda k, n: ("EVALSHA", NO_SCRIPT, len(_keys(n)), *_keys(n)),
    "script|load": lambda k, n: ("SCRIPT", "LOAD", n.script.source if n.script else "return 0"),
}


def _keys(need: Need) -> list[str]:
    return [need.key] if need.key is not None else []


def script_needs(script: RedisScript, keys: Sequence[str]) -> list[Need]:
    """EVALSHA (with the script's keys: the ACL checks those too) and SCRIPT LOAD of `script`,
    and every command it calls, each on its key."""
    needs = [Need("evalsha", key, script=script) for key in keys]
    needs.append(Need("script|load", script=script))
    needs += [Need(command, keys[index]) for command, index in script.commands]
    return needs


def database_needs(settings: Settings) -> list[Need]:
    """SELECT, when the URL names a database other than 0 (redis-py selects it at connect)."""
    db = (urlsplit(settings.redis_url).path or "/0").strip("/") or "0"
    return [Need("select", db)] if db != "0" else []


def username(settings: Settings) -> str:
    """The ACL user streamd logs in as: the URL's, else `default`."""
    return unquote(urlsplit(settings.redis_url).username or "") or "default"


def probe_args(need: Need) -> tuple[Any, ...]:
    probe = _PROBES.get(need.command)
    if probe is None:
        raise KeyError(f"no harmless probe for {need.command!r}: add one to _PROBES")
    return probe(need.key or "", need)


def dedupe(needs: Iterable[Need]) -> list[Need]:
    out: list[Need] = []
    for need in needs:
        if not any((n.command, n.key) == (need.command, need.key) for n in out):
            out.append(need)
    return out


async def refused(client: aioredis.Redis, needs: Sequence[Need], user: str) -> list[Refusal]:
    """The needs the user's ACL refuses (all in one round trip)."""
    needs = dedupe(needs)
    if await _may_dry_run(client, user):
        async with client.pipeline(transaction=False) as pipe:
            for need in needs:
                pipe.execute_command("ACL", "DRYRUN", user, *probe_args(need))
            replies = await pipe.execute(raise_on_error=False)
        return [
            Refusal(need, _text(reply))
            for need, reply in zip(needs, replies, strict=True)
            if not isinstance(reply, Exception) and _text(reply) != "OK"
        ]
    async with client.pipeline(transaction=False) as pipe:
        for need in needs:
            pipe.execute_command(*probe_args(need))
        replies = await pipe.execute(raise_on_error=False)
    return [
        Refusal(need, str(reply))
        for need, reply in zip(needs, replies, strict=True)
        if isinstance(reply, redis.exceptions.NoPermissionError)
    ]


async def _may_dry_run(client: aioredis.Redis, user: str) -> bool:
    try:
        await client.execute_command("ACL", "DRYRUN", user, "PING")  # type: ignore[no-untyped-call]
    except redis.exceptions.ResponseError:  # NOPERM; or a Redis before 7.0, without DRYRUN
        return False
    return True


def _text(reply: Any) -> str:
    return reply.decode("utf-8", "replace") if isinstance(reply, bytes) else str(reply)


# --- what to tell the operator -------------------------------------------------------------


def _is_key_refusal(refusal: Refusal) -> bool:
    return "access" in refusal.reason and "key" in refusal.reason


def grant(user: str, refusals: Sequence[Refusal]) -> str:
    """The ACL SETUSER rule that allows what was refused, and nothing else."""
    keys = dict.fromkeys(
        f"~{r.need.key}" for r in refusals if _is_key_refusal(r) and r.need.key is not None
    )
    commands = dict.fromkeys(f"+{r.need.command}" for r in refusals if not _is_key_refusal(r))
    return " ".join(["ACL SETUSER", user, *keys, *commands])


def describe_refusals(refusals: Sequence[Refusal]) -> str:
    """'XINFO GROUPS, XINFO CONSUMERS' and/or 'the key events:dead'."""
    commands = dict.fromkeys(
        r.need.command.upper().replace("|", " ") for r in refusals if not _is_key_refusal(r)
    )
    keys = dict.fromkeys(
        repr(r.need.key) for r in refusals if _is_key_refusal(r) and r.need.key is not None
    )
    parts = []
    if commands:
        parts.append("run " + ", ".join(commands))
    if keys:
        parts.append("access the key" + ("s " if len(keys) > 1 else " ") + ", ".join(keys))
    return " or ".join(parts)


def minimal_rule(user: str, needs: Sequence[Need]) -> str:
    """The whole minimal ACL for these needs: only their keys, only their commands."""
    needs = dedupe(needs)
    keys = dict.fromkeys(
        f"~{n.key}" for n in needs if n.key is not None and n.command not in _NOT_KEYS
    )
    commands = dict.fromkeys(f"+{n.command}" for n in needs)
    rule = ["ACL SETUSER", user, "on", ">PASSWORD", "resetkeys", *keys, "-@all", *commands]
    return " ".join(rule)


_NOT_KEYS = frozenset({"select"})  # a Need whose `key` is not a Redis key
