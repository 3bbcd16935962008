"""The supervisor's children seen from the parent: fork, pipes, messages, reaping, signals.

Mechanics only: what an exit or a silence means is the supervisor's decision.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from streamd.config.settings import Settings
from streamd.supervisor.child import WORKER, ChildSpec, parse_line, run_child

Slot = tuple[str, int]  # (kind, index): the place a child fills; a replacement takes the same


@dataclass(slots=True, eq=False)
class Child:
    kind: str
    index: int
    pid: int
    fd: int  # read end of the child's pipe; -1 once closed
    settings: Settings
    started_at: float  # epoch seconds
    started_mono: float
    last_seen: float  # monotonic time of the last message
    last_heartbeat: float = 0.0  # epoch seconds, for the status file
    ready: bool = False
    retiring: bool = False  # told to stop: its exit is expected and not replaced
    kill_at: float | None = None  # SIGKILL if still alive then
    killed: bool = False
    hung: bool = False
    failure: tuple[int, str] | None = None  # from a `fail` line
    buffer: bytes = b""

    @property
    def slot(self) -> Slot:
        return self.kind, self.index


class ChildTable:
    """Every live child, and one poll() over their pipes and the signal wakeup pipe."""

    def __init__(self) -> None:
        self.by_pid: dict[int, Child] = {}
        self._by_fd: dict[int, Child] = {}
        self._poller = select.poll()
        self._wakeup = -1
        self._parent_fds: list[int] = []

    def __iter__(self) -> Iterator[Child]:
        return iter(list(self.by_pid.values()))

    def __len__(self) -> int:
        return len(self.by_pid)

    def watch_wakeup(self, read_end: int, parent_fds: Sequence[int]) -> None:
        """poll() also returns when a byte arrives on read_end (signal.set_wakeup_fd's pipe).
        parent_fds are closed in every child."""
        self._wakeup = read_end
        self._parent_fds = list(parent_fds)
        self._poller.register(read_end, select.POLLIN)

    # --- start --------------------------------------------------------------------------------

    def spawn(self, kind: str, index: int, settings: Settings, status_file: Path) -> Child:
        """Fork a child (raises OSError if fork fails); the child never returns from here."""
        parent_pid = os.getpid()
        read_end, write_end = os.pipe()
        os.set_blocking(read_end, False)
        try:
            pid = os.fork()
        except OSError:
            os.close(read_end)
            os.close(write_end)
            raise
        if pid == 0:
            run_child(
                ChildSpec(
                    kind=kind,
                    index=index,
                    settings=settings,
                    write_fd=write_end,
                    parent_pid=parent_pid,
                    close_fds=[read_end, *self._parent_fds, *self._by_fd],
                    status_file=status_file,
                )
            )
        os.close(write_end)
        now = time.monotonic()
        child = Child(kind, index, pid, read_end, settings, time.time(), now, now)
        self.by_pid[pid] = child
        self._by_fd[read_end] = child
        self._poller.register(read_end, select.POLLIN)
        return child

    # --- messages -----------------------------------------------------------------------------

    def poll(self, timeout_s: float) -> list[Child]:
        """Wait up to timeout_s for messages or a signal; the children that just became ready."""
        ready: list[Child] = []
        for fd, _event in self._poller.poll(timeout_s * 1000):
            if fd == self._wakeup:
                _drain_fd(fd)
            elif (child := self._by_fd.get(fd)) is not None and self._read(child):
                ready.append(child)
        return ready

    def _read(self, child: Child) -> bool:
        """Read what the child sent; True if it said `ready` for the first time."""
        became_ready = False
        while child.fd >= 0:
            try:
                data = os.read(child.fd, 4096)
            except BlockingIOError:
                break
            if not data:  # EOF: the child is gone; waitpid tells how
                self._close_pipe(child)
                break
            child.last_seen = time.monotonic()
            child.last_heartbeat = time.time()
            *lines, child.buffer = (child.buffer + data).split(b"\n")
            for line in lines:
                what, code, message = parse_line(line)
                if what == "ready" and not child.ready:
                    child.ready = became_ready = True
                elif what == "fail":
                    child.failure = (code, message)
        return became_ready

    def _close_pipe(self, child: Child) -> None:
        if child.fd < 0:
            return
        self._poller.unregister(child.fd)
        self._by_fd.pop(child.fd, None)
        os.close(child.fd)
        child.fd = -1

    def close(self) -> None:
        for child in self:
            self._close_pipe(child)

    # --- exits --------------------------------------------------------------------------------

    def reap(self) -> list[tuple[Child, int]]:
        """Children that exited (waitpid WNOHANG), with exit codes (-N: killed by signal N)."""
        exited: list[tuple[Child, int]] = []
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            child = self.by_pid.pop(pid, None)
            if child is not None:
                self._read(child)  # a `fail` line may still be in the pipe
                self._close_pipe(child)
                exited.append((child, os.waitstatus_to_exitcode(status)))
        return exited

    # --- signals ------------------------------------------------------------------------------

    def signal(self, child: Child, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child.pid, signum)

    def retire(self, child: Child, signum: int, timeout_s: float) -> None:
        """Ask a child to stop; it gets SIGKILL if still alive after timeout_s."""
        child.retiring = True
        child.kill_at = time.monotonic() + timeout_s
        self.signal(child, signum)

    def kill_overdue(self, now: float) -> list[Child]:
        overdue = [c for c in self if c.kill_at is not None and now >= c.kill_at and not c.killed]
        for child in overdue:
            child.killed = True
            self.signal(child, signal.SIGKILL)
        return overdue

    def next_kill_at(self) -> float | None:
        return min((c.kill_at for c in self if c.kill_at and not c.killed), default=None)

    # --- lookups ------------------------------------------------------------------------------

    def workers(self) -> list[Child]:
        return sorted((c for c in self if c.kind == WORKER), key=lambda c: c.index)

    def occupant(self, slot: Slot) -> Child | None:
        """The child that fills slot and is not on its way out."""
        return next((c for c in self if c.slot == slot and not c.retiring), None)

    def ready_count(self, procs: int) -> int:
        """Worker slots below procs filled by a ready child that is not on its way out."""
        return len(
            {c.index for c in self.workers() if c.ready and not c.retiring and c.index < procs}
        )


def _drain_fd(fd: int) -> None:
    with contextlib.suppress(BlockingIOError):
        while os.read(fd, 4096):
            pass
