"""Recovery of the consumer group: adopt what dead local processes held, reclaim stale entries,
dead-letter poison, delete dead consumers, trim the stream.

Every step is safe with reapers running in many processes and hosts at once:
- XAUTOCLAIM only hands an entry to one claimer (claiming resets its idle time), and a reclaimed
  batch goes through the same BatchWriter as any batch, so Postgres holds it exactly once.
- Adoption claims with a minimum idle time too, so two reapers racing for a dead consumer's
  entries split them instead of taking them from each other.
- A consumer is deleted by a script that first checks, atomically, that it owns nothing.
- XTRIM MINID removes only entries below the oldest one any group still needs; that bound only
  moves forward, so a trim computed a moment ago is still safe.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import redis.asyncio as aioredis

from streamd.backends.faults import TRANSIENT_ERRORS
from streamd.backends.redis_groups import command
from streamd.backends.scripts import RedisScript
from streamd.common.aio import wait_event
from streamd.common.entry_ids import id_key, next_id
from streamd.common.procs import pid_alive
from streamd.common.text import as_text
from streamd.config.settings import Settings
from streamd.observability.log import get_logger
from streamd.pipeline.batch import BatchWriter
from streamd.pipeline.envelope import RawEntry, Rejection
from streamd.pipeline.retry import log_fault
from streamd.pipeline.streams import GroupStream
from streamd.worker.group_watch import GroupWatch

# ARGV: group, consumer. Deletes the consumer only if it has nothing pending, so an entry it read
# a moment ago can never be orphaned. Returns -1 when it kept the consumer.
DELETE_IF_IDLE = RedisScript(
    "delete_if_idle",
    keys=("stream",),
    source="""
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2])
if #pending == 0 then
  return redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
end
return -1
""",
)


# Adoption's XCLAIM min-idle-time (capped by claim_min_idle_ms): long enough that an entry another
# reaper adopted a moment ago (claiming resets its idle time) is not claimed again.
ADOPT_MIN_IDLE_MS = 1000


def dead_local_pid(consumer: str, host: str | None) -> int | None:
    """The pid of a consumer named `<host>:<pid>:<task>` when host is this one and no process with
    that pid exists here any more; else None (another host, a live or unknown process)."""
    parts = consumer.rsplit(":", 2)
    if host is None or len(parts) != 3 or parts[0] != host or not parts[1].isdigit():
        return None
    pid = int(parts[1])
    if pid == os.getpid() or pid <= 1:
        return None
    return None if pid_alive(pid) else pid


class Reaper:
    """The recovery of one stream; its consumer name is `<host>:<pid>:reaper`. A worker runs one
    per stream it consumes, a few streams per round (worker/reapers.py)."""

    def __init__(
        self, settings: Settings, client: aioredis.Redis, stream: GroupStream, writer: BatchWriter
    ) -> None:
        self.settings = settings
        self.client = client
        self.stream = stream
        self.name = stream.stream
        self.writer = writer
        self.log = get_logger(consumer=stream.consumer)
        self._stopping = asyncio.Event()
        # Consumers of this host are `<host>:<pid>:<task>`, like this reaper's own name.
        parts = stream.consumer.rsplit(":", 2)
        self.host = parts[0] if len(parts) == 3 else None
        self.reclaimed = 0
        self.poisoned = 0
        self._watch = GroupWatch()

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        while not self._stopping.is_set():
            try:
                await self.run_once()
            except Exception as exc:
                await self.round_failed(exc)
            await wait_event(self._stopping, self.settings.reaper_interval_s)

    async def round_failed(self, exc: BaseException) -> None:
        """A round that failed is tried again next interval: the stream or group recreated if
        they are gone, a transient fault (a permission revoked, too) logged. Others propagate."""
        try:
            if await self.stream.recover(exc, self.log):
                return
        except TRANSIENT_ERRORS as again:
            exc = again
        if not isinstance(exc, TRANSIENT_ERRORS):
            raise exc
        log_fault(self.log, "reaper", exc, retry_in_s=self.settings.reaper_interval_s)

    async def run_once(self) -> None:
        """One round. A stream with nothing pending costs four commands (XINFO GROUPS and
        CONSUMERS, read once and shared by the steps, and an XTRIM): a worker may reap 1,000."""
        s = self.settings
        groups = await self.watch_group()
        consumers = await self.client.xinfo_consumers(self.name, s.group)
        await self.adopt_dead_local_consumers(consumers)
        mine = next((g for g in groups if as_text(g["name"]) == s.group), None)
        # Nothing pending when the round began: nothing can be idle long enough to reclaim.
        if mine is None or int(mine["pending"]):
            await self.reclaim()
        # Dead local consumers are adoption's: the rest are looked at for idleness.
        others = [c for c in consumers if dead_local_pid(as_text(c["name"]), self.host) is None]
        await self.delete_idle_consumers(others)
        if s.trim:
            await self.trim(groups)

    async def watch_group(self) -> list[dict[Any, Any]]:
        """Log an operator's XGROUP SETID (group_watch.py); a missing stream is recreated by
        the round's error handling, like any NOGROUP. Returns XINFO GROUPS."""
        s = self.settings
        groups: list[dict[Any, Any]] = await self.client.xinfo_groups(self.name)
        self._watch.check(self.name, s.group, groups, self.log)
        return groups

    # --- reclaim ---------------------------------------------------------------------------

    async def reclaim(self) -> int:
        """Take over entries idle longer than claim_min_idle_ms and ingest them (or dead-letter
        them as poison). Returns how many entries were handled."""
        s = self.settings
        cursor: Any = "0-0"
        handled = 0
        while not self._stopping.is_set():
            reply = await command(
                self.client,
                "XAUTOCLAIM",
                self.name,
                s.group,
                self.stream.consumer,
                s.claim_min_idle_ms,
                cursor,
                "COUNT",
                s.batch_size,
            )
            cursor, entries = reply[0], reply[1]
            deleted = reply[2] if len(reply) > 2 else []
            if deleted:
                self.log.warning(
                    "pending_entries_deleted",
                    count=len(deleted),
                    note="removed from the stream by another client before ingest",
                )
            if entries:
                handled += await self._ingest_claimed(entries)
            if as_text(cursor) == "0-0":
                return handled
        return handled

    # --- adopt ----------------------------------------------------------------------------

    async def adopt_dead_local_consumers(
        self, consumers: list[dict[Any, Any]] | None = None
    ) -> int:
        """Take over at once what consumers of processes that died on this host held, then
        delete those consumers. Returns how many entries were handled.

        claim_min_idle_ms must outlast a slow but live consumer's batch, so waiting for it delays
        a killed worker's entries by a minute. A consumer whose process is gone (its pid no longer
        exists on this host: killed, crashed, or a previous serve) cannot be working on anything,
        so there is nothing to wait for.
        """
        if self.host is None:
            return 0
        handled = 0
        if consumers is None:
            consumers = await self.client.xinfo_consumers(self.name, self.settings.group)
        for info in consumers:
            name = as_text(info["name"])
            if dead_local_pid(name, self.host) is None:
                continue
            adopted = await self._adopt(name) if int(info["pending"]) else 0
            handled += adopted
            if await self._delete_if_idle(name) != -1:
                # After every restart each dead consumer of the last run goes this way: only
                # one that held entries is worth a line at info.
                log = self.log.info if adopted else self.log.debug
                log("dead_consumer_adopted", dead_consumer=name, entries=adopted)
        return handled

    async def _adopt(self, dead: str) -> int:
        s = self.settings
        min_idle = min(ADOPT_MIN_IDLE_MS, s.claim_min_idle_ms)
        handled = 0
        while not self._stopping.is_set():
            rows = await self.client.xpending_range(
                self.name, s.group, min="-", max="+", count=s.batch_size, consumername=dead
            )
            ids = [_raw_id(row["message_id"]) for row in rows]
            if not ids:
                break
            entries = await command(
                self.client, "XCLAIM", self.name, s.group, self.stream.consumer, min_idle, *ids
            )
            # Entries deleted from the stream meanwhile come back as nothing: drop those.
            entries = [e for e in entries if e is not None and e[1] is not None]
            if not entries:
                break  # too fresh, or another reaper took them: the next round looks again
            handled += await self._ingest_claimed(entries)
        return handled

    async def _ingest_claimed(self, entries: list[RawEntry]) -> int:
        deliveries = await self._delivery_counts(entries)
        limit = self.settings.max_deliveries
        live: list[RawEntry] = []
        poison: list[Rejection] = []
        for entry in entries:
            entry_id, fields = entry[0], entry[1]
            count = deliveries.get(entry_id, 1)
            if count > limit and fields is not None:
                poison.append(
                    Rejection(
                        entry_id,
                        fields,
                        "poison",
                        f"delivered {count} times (max_deliveries is {limit}), never committed",
                        deliveries=count,
                    )
                )
            else:
                live.append(entry)
        report = await self.writer.flush(self.stream, live, self.log, extra_dead=poison)
        self.reclaimed += len(live)
        self.poisoned += len(poison)
        # duplicates: already in Postgres (committed by a consumer that died before its XACK)
        self.log.info(
            "entries_reclaimed",
            count=len(live),
            poison=len(poison),
            rows=report.inserted,
            duplicates=report.duplicates,
        )
        return len(entries)

    async def _delivery_counts(self, entries: list[RawEntry]) -> dict[bytes, int]:
        """Delivery counters (XPENDING) of entries this reaper just claimed."""
        first, last = entries[0][0], entries[-1][0]
        # xpending_range, not a raw XPENDING: redis-py would parse that reply as the summary form.
        rows = await self.client.xpending_range(
            self.name,
            self.settings.group,
            min=first,
            max=last,
            count=len(entries),
            consumername=self.stream.consumer,
        )
        return {_raw_id(row["message_id"]): int(row["times_delivered"]) for row in rows}

    # --- consumers -------------------------------------------------------------------------

    async def delete_idle_consumers(
        self, consumers: list[dict[Any, Any]] | None = None
    ) -> list[str]:
        """Delete consumers idle longer than consumer_idle_delete_ms that own nothing (of
        `consumers`, an XINFO CONSUMERS reply, when given)."""
        s = self.settings
        deleted: list[str] = []
        if consumers is None:
            consumers = await self.client.xinfo_consumers(self.name, s.group)
        for info in consumers:
            name = as_text(info["name"])
            if int(info["pending"]) or int(info["idle"]) < s.consumer_idle_delete_ms:
                continue
            if await self._delete_if_idle(name) != -1:
                deleted.append(name)
        if deleted:
            self.log.info("consumers_deleted", count=len(deleted), names=deleted)
        return deleted

    async def _delete_if_idle(self, consumer: str) -> Any:
        s = self.settings
        return await DELETE_IF_IDLE.call(self.client, keys=[self.name], args=[s.group, consumer])

    # --- trim ------------------------------------------------------------------------------

    async def trim(self, groups: list[dict[Any, Any]] | None = None) -> int:
        """XTRIM MINID to the oldest entry any group still needs (by `groups`, an XINFO GROUPS
        reply of a moment ago, when given: the bound only moves forward); returns entries
        removed."""
        minid = await self.oldest_needed_id(groups)
        if minid is None:
            return 0
        # An approximate trim (whole listpack nodes only: cheap) does at most ~10,000 entries of
        # work per call, to keep Redis responsive; repeat until it has caught up with the group.
        removed = 0
        while not self._stopping.is_set():
            step = int(await self.client.xtrim(self.name, minid=minid, approximate=True))
            removed += step
            if step == 0:
                break
        if removed:
            self.log.debug("stream_trimmed", removed=removed, minid=minid)
        return removed

    async def oldest_needed_id(self, groups: list[dict[Any, Any]] | None = None) -> str | None:
        """The lowest ID any group still needs: its oldest pending entry, else the entry after its
        last delivered one. None when the stream has no group (then nothing is known to be done).
        """
        if groups is None:
            groups = await self.client.xinfo_groups(self.name)
        if not groups:
            return None
        needed: list[tuple[int, int]] = []
        for group in groups:
            name = as_text(group["name"])
            if int(group["pending"]):
                summary = await self.client.xpending(self.name, name)
                if summary["min"] is None:
                    return None  # acked in between: decide next round, never guess
                needed.append(id_key(as_text(summary["min"])))
            else:
                needed.append(id_key(next_id(as_text(group["last-delivered-id"]))))
        if not needed:
            return None
        ms, seq = min(needed)
        return f"{ms}-{seq}"


def _raw_id(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()
