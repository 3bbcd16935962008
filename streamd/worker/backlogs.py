"""Which streams have entries waiting, as a worker's consumers last saw them: the quiet lane's map.

A consumer's read asks for COUNT entries per stream; a stream that answered with all of them has
more waiting (a backlog), one that answered with fewer, or nothing, is drained. Every read of
every consumer of the worker updates this one view.

The quiet lane: while some of the worker's streams have a backlog and others do not, one of its
consumers (worker/consumer.py, `lane=True`) reads only the others. It waits blocked on them, so
Redis hands it a quiet stream's entry the moment it is added, and it commits it at once, instead
of the entry waiting for a consumer to finish its share of a backlog. When every stream has a
backlog, or none has, the lane reads them all like any consumer, and a single-stream serve loses
nothing to it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence


class Backlogs:
    """The streams whose last reply was full, shared by the consumers of one worker."""

    def __init__(self) -> None:
        self._busy: set[str] = set()
        self.seen = False  # a read has told what it found

    def saw(self, asked: Iterable[str], full: Iterable[str]) -> None:
        """After a read: of the streams asked, those in `full` have a backlog, the rest not."""
        self._busy.difference_update(asked)
        self._busy.update(full)
        self.seen = True

    def busy(self, name: str) -> bool:
        return name in self._busy

    def lane_streams(self, names: Sequence[str]) -> Sequence[str]:
        """What the quiet lane reads: the streams without a backlog, or all of them when that
        leaves none or changes nothing."""
        quiet = [name for name in names if name not in self._busy]
        return quiet if quiet and len(quiet) < len(names) else names

    def keep_only(self, names: Iterable[str]) -> None:
        """After a discovery: forget the streams no longer consumed (bounded as patterns move)."""
        self._busy.intersection_update(names)
