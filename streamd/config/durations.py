"""Retention periods as written in the config: "30 days", "12 hours", "6 months"."""

from __future__ import annotations

import re
from dataclasses import dataclass

_RETENTION = re.compile(r"\s*(\d+)\s*(hour|day|week|month)s?\s*", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class Retention:
    """A count of calendar units: months are calendar months, the rest fixed lengths."""

    count: int
    unit: str  # "hour" | "day" | "week" | "month"

    def __str__(self) -> str:
        return f"{self.count} {self.unit}{'s' if self.count != 1 else ''}"


def parse_retention(text: str) -> Retention | None:
    """The retention a setting names; None for "" (off). ValueError for anything else."""
    if not text.strip():
        return None
    found = _RETENTION.fullmatch(text)
    if found is None or int(found.group(1)) < 1:
        raise ValueError('must be "" (off) or a count and a unit, e.g. "30 days", "12 hours"')
    return Retention(int(found.group(1)), found.group(2).lower())
