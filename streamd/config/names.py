"""Redis names that Redis accepts but streamd cannot sensibly use (checked per name, so a list of
streams gets the same check for each).

Redis takes any bytes as a key or a group name, the empty string included. streamd refuses:
- an empty name, or one with no letter or digit (`-`, `:`, `{}`): nobody means those, and in
  logs, metrics and `streamd monitor` they are unreadable;
- a stream whose name ends in ':dead', the suffix of dead-letter streams: its entries are dead
  letters of another stream, which have no `type`, so consuming it would dead-letter every entry
  again into '<name>:dead'.
"""

from __future__ import annotations

DEAD_SUFFIX = ":dead"


def _meaningless(name: str, what: str) -> str | None:
    if not name:
        return f"the {what} name must not be empty"
    if not any(c.isalnum() for c in name):
        return f"{name!r} is not a usable {what} name (it needs a letter or a digit)"
    return None


def stream_name_problem(name: str) -> str | None:
    """Why `name` cannot be a stream streamd consumes, or None."""
    problem = _meaningless(name, "stream")
    if problem is None and name.endswith(DEAD_SUFFIX):
        problem = (
            f"{name!r} ends in {DEAD_SUFFIX!r}, the suffix of dead-letter streams: its entries "
            "are another stream's dead letters (see `streamd dlq`), not events"
        )
    return problem


def group_name_problem(name: str) -> str | None:
    """Why `name` cannot be streamd's consumer group, or None."""
    return _meaningless(name, "consumer group")


def dead_stream_name_problem(name: str) -> str | None:
    """Why `name` cannot be the dead-letter stream, or None (empty: the default '<stream>:dead')."""
    return _meaningless(name, "dead-letter stream") if name else None
