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


class GroupWatch:
    """The last position seen of each (stream, group)."""

    def __init__(self) -> None:
        self._seen: dict[tuple[str, str], Position] = {}

    def check(self, stream: str, group: str, groups: list[dict[Any, Any]], log: Any) -> None:
        """Compare the group's entry in XINFO GROUPS with the last look; log a move by hand."""
        info = next((g for g in groups if as_text(g.get("name")) == group), None)
        if info is None:
            self._seen.pop((stream, group), None)
            return
        after = Position.of(info)
        before = self._seen.get((stream, group))
        self._seen[(stream, group)] = after
        change = None if before is None else position_change(before, after)
        if change is None or before is None:
            return
        note = (
            "entries after it are delivered again; rows Postgres already holds are skipped"
            if change == "back"
            else "entries between the two were never delivered and are not ingested, unless the "
            "position is set back (XGROUP SETID)"
        )
        log.warning(
            "group_position_moved",
            stream=stream,
            group=group,
            direction=change,
            previous=before.entry_id,
            now=after.entry_id,
            cause="XGROUP SETID (or CREATE) by someone else",
            note=note,
        )
