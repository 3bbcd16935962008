"""When to restart a child: capped exponential backoff with jitter per slot, reset after a healthy
stretch, and the crash-loop window that makes the supervisor give up."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from streamd.common.backoff import Backoff
from streamd.config.settings import Settings
from streamd.supervisor.children import Slot

RESTART_INITIAL_S = 0.2  # the first restart comes 0.1-0.2 s after the exit (equal jitter)


@dataclass(slots=True)
class Due:
    at: float  # monotonic time to start the slot again
    down_since: float  # when its previous child's exit was seen


class RestartPolicy:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings  # replaced on reload
        self.due: dict[Slot, Due] = {}
        self._backoffs: dict[Slot, Backoff] = {}
        self._crashes: deque[float] = deque()

    def schedule(self, slot: Slot, now: float) -> float:
        """Plan a restart of slot; returns the delay."""
        backoff = self._backoffs.get(slot)
        if backoff is None:
            cap = max(RESTART_INITIAL_S, self.settings.restart_backoff_max_s)
            # A slot that ran for a whole crash-loop window without failing starts over.
            backoff = Backoff(RESTART_INITIAL_S, cap, self.settings.crash_loop_window_s)
            self._backoffs[slot] = backoff
        delay = backoff.next_delay()
        self.due[slot] = Due(now + delay, now)
        return delay

    def pop_due(self, now: float) -> list[tuple[Slot, Due]]:
        ready = [(slot, due) for slot, due in self.due.items() if due.at <= now]
        for slot, _due in ready:
            del self.due[slot]
        return ready

    def next_at(self) -> float | None:
        return min((d.at for d in self.due.values()), default=None)

    def crash(self, now: float) -> int:
        """Count a crash; returns the crashes within crash_loop_window_s, this one included."""
        self._crashes.append(now)
        while self._crashes[0] < now - self.settings.crash_loop_window_s:
            self._crashes.popleft()
        return len(self._crashes)

    def is_crash_loop(self, crashes: int) -> bool:
        return crashes >= self.settings.crash_loop_max
