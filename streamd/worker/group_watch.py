"""Noticing an operator's XGROUP SETID: the group's position (its last-delivered-id) moved other
than by consuming. Per stream, from the reaper's look at XINFO GROUPS each round.

- Moved back: the entries after the new position are delivered again. Nothing is lost and
  nothing is duplicated (Postgres skips the rows it holds), but it is work, and worth a line.
- Moved forward over entries never delivered: those are skipped, never ingested, unless the
  position is set back. Consuming moves the position forward too, but keeps `entries-read`
  counting; XGROUP SETID (without ENTRIESREAD) makes Redis forget it (nil), which tells the two
  apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from streamd.common.entry_ids import id_key
from streamd.common.text import as_text


@dataclass(frozen=True, slots=True)
class Position:
    last_delivered: tuple[int, int]
    entries_read: int | None

    @classmethod
    def of(cls, info: dict[Any, Any]) -> Position:
        ms, _, seq = as_text(info["last-delivered-id"]).partition("-")
        read = info.get("entries-read")
        return cls((int(ms), int(seq or 0)), None if read is None else int(read))

    @property
    def entry_id(self) -> str:
        return f"{self.last_delivered[0]}-{self.last_delivered[1]}"


def position_change(before: Position, after: Position) -> str | None:
    """'back', 'forward' (set by hand over undelivered entries), or None (consumed, or still)."""
    if after.last_delivered < before.last_delivered:
        return "back"
    moved = after.last_delivered > before.last_delivered
    if moved and before.entries_read is not None and after.entries_read is None:
        return "forward"
    return None


@dataclass(frozen=True, slots=True)
class Moved:
    """A position moved by hand. `now` is None when the consumers found it (entries delivered
    again, the first of them `first_again`) before the reaper looked: the position set is then
    known only to be below that entry (finding the entry before it would need XREVRANGE, which
    serve's ACL does not grant)."""

    direction: str
    previous: tuple[int, int]
    now: tuple[int, int] | None
    first_again: tuple[int, int] | None = None


def as_id(key: tuple[int, int]) -> str:
    return f"{key[0]}-{key[1]}"


Key = tuple[int, int]


class GroupWatch:
    """The position of each stream's group as this worker knows it: the reaper's last look at
    XINFO GROUPS, and the highest entry its consumers were delivered. One per worker, shared by
    its consumers and reapers, so a look never misses a position the consumers reached in between.

    Either side can see a move back. The reaper: the position is below the highest entry
    delivered. A consumer: `>` delivered an entry at or below it (Redis delivers only entries
    after the position, and only a hand moves that back). Replies of concurrent reads are handled
    in any order, so a delivery counts only against the highest entry of a reply handled before
    this read (or look) was sent: `replies` numbers them, and the caller passes the number it saw
    before sending. A move is logged once, by the reaper's next round.
    """

    def __init__(self) -> None:
        self._seen: dict[tuple[str, str], Position] = {}
        self._high: dict[str, tuple[Key, int]] = {}  # stream: (highest delivered, its reply no)
        self._again: dict[str, tuple[Key, Key, Key]] = {}  # previous, first and last again
        self.replies = 0

    def _known_high(self, stream: str, sent: int) -> Key | None:
        high = self._high.get(stream)
        return high[0] if high is not None and high[1] <= sent else None

    def delivered(self, stream: str, first: bytes, last: bytes, sent: int) -> None:
        """A `>` read, sent when `replies` was `sent`, delivered first..last of stream."""
        self.replies += 1
        low, top = id_key(as_text(first)), id_key(as_text(last))
        high = self._known_high(stream, sent)
        if high is not None and low <= high:
            found = self._again.get(stream)
            if found is None:
                self._again[stream] = (high, low, top)
            else:
                self._again[stream] = (found[0], min(found[1], low), max(found[2], top))
        current = self._high.get(stream)
        if current is None or top > current[0]:
            self._high[stream] = (top, self.replies)

    def forget(self, stream: str) -> None:
        """The stream or its group was made again: what was known of it no longer holds."""
        self._high.pop(stream, None)
        self._again.pop(stream, None)
        for key in [k for k in self._seen if k[0] == stream]:
            del self._seen[key]

    def check(
        self, stream: str, group: str, groups: list[dict[Any, Any]], sent: int
    ) -> Moved | None:
        """Compare the group's entry in XINFO GROUPS (sent when `replies` was `sent`) with what
        was known; a move by hand, if any."""
        info = next((g for g in groups if as_text(g.get("name")) == group), None)
        if info is None:
            self.forget(stream)
            return None
        after = Position.of(info)
        before = self._seen.get((stream, group))
        self._seen[(stream, group)] = after
        again = self._again.pop(stream, None)
        seen = before.last_delivered if before is not None else None
        known = [p for p in (seen, self._known_high(stream, sent)) if p is not None]
        previous = max(known) if known else None
        if again is not None:
            moved = Moved("back", again[0], None, again[1])
        elif previous is not None and after.last_delivered < previous:
            moved = Moved("back", previous, after.last_delivered)
        elif before is not None and position_change(before, after) == "forward":
            return Moved("forward", before.last_delivered, after.last_delivered)
        else:
            return None
        # From here on the group delivers from its new position: a read sent after this look
        # gets entries after what it showed (and after the entries delivered again so far); one
        # sent before may not, so the mark gets a number of its own, above any such read's.
        since = max(after.last_delivered, again[2]) if again else after.last_delivered
        self.replies += 1
        self._high[stream] = (since, self.replies)
        return moved


def log_moved(log: Any, stream: str, group: str, moved: Moved) -> None:
    note = (
        "entries after it are delivered again; rows Postgres already holds are skipped"
        if moved.direction == "back"
        else "entries between the two were never delivered and are not ingested, unless the "
        "position is set back (XGROUP SETID)"
    )
    log.warning(
        "group_position_moved",
        stream=stream,
        group=group,
        direction=moved.direction,
        previous=as_id(moved.previous),
        now=None if moved.now is None else as_id(moved.now),
        delivered_again_from=None if moved.first_again is None else as_id(moved.first_again),
        cause="XGROUP SETID (or CREATE) by someone else",
        note=note,
    )
