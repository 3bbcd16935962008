"""The supervisor: fork one worker per core, keep them alive, stop and reload them on signals.

Synchronous and single-threaded on purpose: nothing that cannot survive fork (event loop, pool,
thread) ever exists here. Signal handlers only enqueue; one loop waits on the children's pipes and
the signal wakeup pipe, then dispatches queued signals to `handle_<name>`, reaps exited children
(waitpid WNOHANG), kills children whose heartbeat went stale, and starts what is due.

- Crashes are restarted with capped exponential backoff and jitter, reset after a healthy period;
  `crash_loop_max` crashes within `crash_loop_window_s` stop the service (exit 70). Exit 69 (an
  outage at a child's start) is retried but not counted as a crash, except before the first
  successful start, when it stops the service like a boot error (78, 2) does: at once.
- TERM/INT: children drain (commit, ack, exit 0); stragglers are SIGKILLed after
  graceful_timeout_s. A second INT, or QUIT: children stop at once (what they hold stays pending,
  and is reclaimed by a reaper later).
- HUP: re-read the config, then replace the children one at a time: start the new one, wait until it
  consumes, then drain the old one. A new child that fails to start aborts the reload.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import signal
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from streamd.backends.faults import describe
from streamd.config.settings import Settings
from streamd.errors import (
    EXIT_BOOT,
    EXIT_CRASH_LOOP,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    BootError,
    ConfigError,
    ServiceUnavailable,
    StreamdError,
)
from streamd.observability.log import get_logger
from streamd.observability.status_file import (
    remove_stale,
    remove_status,
    status_path,
    write_status,
)
from streamd.supervisor.child import METRICS, WORKER, metrics_available
from streamd.supervisor.children import Child, ChildTable, Slot
from streamd.supervisor.restarts import RestartPolicy
from streamd.supervisor.rollout import METRICS_STOP_TIMEOUT_S, Rollouts
from streamd.supervisor.systemd import Notifier

TICK_S = 0.5  # the longest the loop sleeps: heartbeat checks and status refreshes run this often
STATUS_REFRESH_S = 1.0
HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGCHLD)
BOOT_FAILURES: dict[int, type[StreamdError]] = {
    EXIT_BOOT: BootError,
    EXIT_USAGE: ConfigError,
    EXIT_UNAVAILABLE: ServiceUnavailable,
}

State = Literal["starting", "running", "reloading", "stopping"]


class CrashLoopError(StreamdError):
    exit_code = EXIT_CRASH_LOOP


class Supervisor:
    def __init__(
        self,
        settings: Settings,
        reload: Callable[[], Settings] | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        # Nothing here touches the process: run() does, so a Supervisor can be built anywhere.
        self.settings = settings
        self.read_settings = reload
        self.notifier = notifier or Notifier()
        self.log: Any = get_logger()
        self.state: State = "starting"
        self.children = ChildTable()
        self.restart = RestartPolicy(settings)
        self.signals: deque[int] = deque()
        self.rollouts = Rollouts(self)
        self.ever_ready = False
        self.fast = False
        self.interrupts = 0
        self.restarts = 0
        self.exit_code = EXIT_OK
        self.failure: StreamdError | None = None
        self.pid = 0
        self.started_at = 0.0
        self.wakeup: tuple[int, int] = (-1, -1)
        self.status_file = Path()
        self.metrics_dir: Path | None = None
        self._old_handlers: dict[int, Any] = {}
        self.dirty = True
        self._last_write = 0.0
        self._last_status_text = ""
        self._last_tick = 0.0
        self._next_watchdog = 0.0

    # --- the loop -------------------------------------------------------------------------

    def run(self) -> int:
        """Supervise until stopped; returns the exit code, or raises the error that stopped it."""
        self._setup()
        try:
            self._spawn_missing()
            while len(self.children) or self.state != "stopping":
                for child in self.children.poll(self._timeout()):
                    self._on_ready(child)
                self._dispatch_signals()
                for child, code in self.children.reap():
                    self._on_exit(child, code)
                self._check_heartbeats()
                self._advance()
                self._publish()
        finally:
            self._teardown()
        self.log.info("supervisor_stopped", code=self.exit_code, restarts=self.restarts)
        if self.failure is not None:
            raise self.failure
        return self.exit_code

    def _advance(self) -> None:
        now = time.monotonic()
        self._start_due(now)
        self.rollouts.advance()
        if self.state in ("starting", "running"):
            self._spawn_missing()
        if self.state == "stopping":
            self._advance_stop()
        for child in self.children.kill_overdue(now):
            self.log.warning(
                "child_killed", kind=child.kind, index=child.index, child_pid=child.pid
            )
        self._watchdog(now)

    def _timeout(self) -> float:
        now = time.monotonic()
        moments = [self.restart.next_at(), self.children.next_kill_at()]
        if self.notifier.watchdog_interval_s() is not None:
            moments.append(self._next_watchdog)
        soonest = min((m for m in moments if m is not None), default=now + TICK_S)
        return max(0.0, min(TICK_S, soonest - now))

    # --- setup and teardown ---------------------------------------------------------------

    def _setup(self) -> None:
        self.pid = os.getpid()
        self.started_at = time.time()
        self._last_tick = time.monotonic()
        self.log = get_logger(role="supervisor", pid=self.pid)
        state_dir = self.settings.resolved_state_dir()
        try:
            state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            self.metrics_dir = _fresh_dir(state_dir / f"metrics-{self.pid}")
        except OSError as exc:
            raise BootError(f"state_dir {state_dir}: cannot create: {describe(exc)}") from None
        # prometheus_client's multiprocess mode: every child writes its samples here.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(self.metrics_dir)
        self.status_file = status_path(state_dir, self.pid)
        stale = remove_stale(state_dir, self.pid)
        read_end, write_end = os.pipe()
        for fd in (read_end, write_end):
            os.set_blocking(fd, False)
        self.wakeup = (read_end, write_end)
        self.children.watch_wakeup(read_end, self.wakeup)
        signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
        for signum in HANDLED_SIGNALS:
            self._old_handlers[signum] = signal.signal(signum, self._enqueue)
        self.log.info(
            "supervisor_started",
            procs=self.settings.resolved_procs(),
            tasks=self.settings.tasks,
            state_dir=str(state_dir),
        )
        if stale:
            self.log.info("stale_state_removed", state_dir=str(state_dir), removed=stale)

    def _teardown(self) -> None:
        signal.set_wakeup_fd(-1)
        for signum, handler in self._old_handlers.items():
            signal.signal(signum, handler)
        for fd in self.wakeup:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.children.close()
        remove_status(self.status_file)
        if self.metrics_dir is not None:
            shutil.rmtree(self.metrics_dir, ignore_errors=True)

    def _enqueue(self, signum: int, _frame: object) -> None:
        self.signals.append(signum)  # only this: the loop does the work

    # --- starting children ----------------------------------------------------------------

    def spawn(self, kind: str, index: int) -> Child | None:
        try:
            child = self.children.spawn(kind, index, self.settings, self.status_file)
        except OSError as exc:
            self.log.error("fork_failed", kind=kind, index=index, error=describe(exc))
            self.restart.schedule((kind, index), time.monotonic())
            return None
        self.log.info("child_started", kind=kind, index=index, child_pid=child.pid)
        self.dirty = True
        return child

    def _spawn_missing(self) -> None:
        for index in range(self.settings.resolved_procs()):
            self._fill((WORKER, index))
        metrics_gone = not any(c.kind == METRICS for c in self.children)  # even one retiring
        if metrics_gone and self._wanted((METRICS, 0)):
            self._fill((METRICS, 0))

    def _fill(self, slot: Slot) -> None:
        if slot not in self.restart.due and self.children.occupant(slot) is None:
            self.spawn(*slot)

    def _start_due(self, now: float) -> None:
        if self.state == "stopping":
            return
        for slot, due in self.restart.pop_due(now):
            if not self._wanted(slot) or self.children.occupant(slot) is not None:
                continue
            child = self.spawn(*slot)
            if child is not None:
                self.restarts += 1
                self.log.info(
                    "child_restarted",
                    kind=child.kind,
                    index=child.index,
                    child_pid=child.pid,
                    restarts=self.restarts,
                    down_ms=round((now - due.down_since) * 1000, 1),
                )

    def _wanted(self, slot: Slot) -> bool:
        kind, index = slot
        if kind == METRICS:
            return self.settings.metrics_port != 0 and metrics_available()
        return index < self.settings.resolved_procs()

    def _on_ready(self, child: Child) -> None:
        self.dirty = True
        boot_ms = round((time.monotonic() - child.started_mono) * 1000, 1)
        self.log.info("child_ready", index=child.index, child_pid=child.pid, boot_ms=boot_ms)
        if self.state == "starting" and self._all_ready():
            self.state = "running"
            self.ever_ready = True
            self.log.info("serve_ready", procs=self.settings.resolved_procs())
            self.notifier.ready(self.status_text())

    def _all_ready(self) -> bool:
        procs = self.settings.resolved_procs()
        return self.children.ready_count(procs) == procs

    # --- exits ----------------------------------------------------------------------------

    def _on_exit(self, child: Child, code: int) -> None:
        self.dirty = True
        self._mark_dead(child.pid)
        expected = child.retiring or self.state == "stopping"
        self._log_exit(child, code, expected)
        if expected:
            return
        boot_error = code in (EXIT_BOOT, EXIT_USAGE)
        if self.rollouts.current is not None and child is self.rollouts.current.incoming:
            self.rollouts.abort(child, code)
        elif child.kind == METRICS and not (boot_error and not self.ever_ready):
            # Metrics are not worth stopping ingest for, except a bad setup at the very start
            # (say, the port is taken), which a person should see at once.
            self._schedule(child)
        elif boot_error or (code == EXIT_UNAVAILABLE and not self.ever_ready):
            self._fail_boot(child, code)
        else:
            # An outage (69) may heal and an unasked clean exit is no crash: neither counts.
            crashed = code not in (EXIT_OK, EXIT_UNAVAILABLE)
            if not (crashed and self._crash_loop()):
                self._schedule(child)

    def _schedule(self, child: Child) -> None:
        delay = self.restart.schedule(child.slot, time.monotonic())
        self.log.info(
            "child_restart_scheduled", kind=child.kind, index=child.index, in_s=round(delay, 3)
        )

    def _log_exit(self, child: Child, code: int, expected: bool) -> None:
        fields: dict[str, Any] = {
            "kind": child.kind,
            "index": child.index,
            "child_pid": child.pid,
            "code": code,
            "uptime_s": round(time.monotonic() - child.started_mono, 3),
        }
        if code < 0:
            fields["signal"] = signal.Signals(-code).name
        if child.hung:
            fields["reason"] = "hung"
        if child.failure is not None:
            fields["error"] = child.failure[1]
        (self.log.info if expected else self.log.warning)("child_exited", **fields)

    def _mark_dead(self, pid: int) -> None:
        """Let prometheus_client merge the dead child's live gauges away (if it is installed)."""
        try:
            multiprocess = importlib.import_module("prometheus_client.multiprocess")
        except ImportError:
            return
        with contextlib.suppress(Exception):
            multiprocess.mark_process_dead(pid, str(self.metrics_dir))

    def _crash_loop(self) -> bool:
        """Count a crash; True (and stopping) when there were too many in the window."""
        crashes = self.restart.crash(time.monotonic())
        if not self.restart.is_crash_loop(crashes):
            return False
        window = self.settings.crash_loop_window_s
        self.log.error("crash_loop", crashes=crashes, window_s=window)
        self.failure = CrashLoopError(
            f"children crashed {crashes} times within {window:g} s (crash_loop_max); stopped. "
            "See the child_exited lines above."
        )
        self._begin_stop(EXIT_CRASH_LOOP, "crash_loop")
        return True

    def _fail_boot(self, child: Child, code: int) -> None:
        message = child.failure[1] if child.failure else f"{child.kind} exited with code {code}"
        self.log.error("boot_failed", index=child.index, code=code, error=message)
        self.failure = BOOT_FAILURES[code](message)
        self._begin_stop(code, "boot_failed")

    # --- liveness -------------------------------------------------------------------------

    def _check_heartbeats(self) -> None:
        now = time.monotonic()
        gap, self._last_tick = now - self._last_tick, now
        workers = self.children.workers()
        limit = min(
            (c.settings.heartbeat_timeout_s for c in workers),
            default=self.settings.heartbeat_timeout_s,
        )
        if gap > max(3 * TICK_S, limit / 2):
            # We were not running (suspended, starved): silence now proves nothing.
            for child in workers:
                child.last_seen = max(child.last_seen, now)
            return
        for child in workers:
            silent = now - child.last_seen
            if not child.hung and silent > child.settings.heartbeat_timeout_s:
                child.hung = True
                self.log.warning(
                    "child_hung", index=child.index, child_pid=child.pid, silent_s=round(silent, 2)
                )
                self.children.signal(child, signal.SIGKILL)

    # --- signals --------------------------------------------------------------------------

    def _dispatch_signals(self) -> None:
        while self.signals:
            name = signal.Signals(self.signals.popleft()).name.lower()
            getattr(self, f"handle_{name}")()

    def handle_sigterm(self) -> None:
        self._begin_stop(EXIT_OK, "SIGTERM")

    def handle_sigint(self) -> None:
        self.interrupts += 1
        self._begin_stop(EXIT_OK, "SIGINT", fast=self.interrupts > 1)

    def handle_sigquit(self) -> None:
        self._begin_stop(EXIT_OK, "SIGQUIT", fast=True)

    def handle_sighup(self) -> None:
        self.rollouts.begin()

    def handle_sigchld(self) -> None:
        pass  # waking up was the point: reaping runs on every turn of the loop

    # --- stop -----------------------------------------------------------------------------

    def _begin_stop(self, code: int, reason: str, fast: bool = False) -> None:
        workers = self.children.workers()
        if self.state == "stopping":
            if fast and not self.fast:
                self.fast = True
                self.log.info("stop_fast", reason=reason, children=len(workers))
                for child in workers:
                    self.children.signal(child, signal.SIGQUIT)
            return
        self.state = "stopping"
        self.exit_code = code
        self.fast = fast
        self.restart.due.clear()
        self.rollouts.current = None
        timeout = self.settings.graceful_timeout_s
        self.log.info(
            "stopping", reason=reason, fast=fast, children=len(workers), timeout_s=timeout
        )
        self.notifier.stopping(f"stopping ({reason})")
        self.dirty = True
        for child in workers:
            self.children.retire(child, signal.SIGQUIT if fast else signal.SIGTERM, timeout)

    def _advance_stop(self) -> None:
        if self.children.workers():
            return
        for child in self.children:  # the metrics child goes last
            if not child.retiring:
                self.children.retire(child, signal.SIGTERM, METRICS_STOP_TIMEOUT_S)

    def use(self, settings: Settings) -> None:
        self.settings = settings
        self.restart.settings = settings

    # --- status ---------------------------------------------------------------------------

    def _watchdog(self, now: float) -> None:
        interval = self.notifier.watchdog_interval_s()
        if interval is not None and now >= self._next_watchdog:
            self.notifier.watchdog()
            self._next_watchdog = now + interval

    def status_text(self) -> str:
        procs = self.settings.resolved_procs()
        if self.state == "reloading" and self.rollouts.current is not None:
            return f"reloading: {self.rollouts.current.replaced}/{procs} workers replaced"
        if self.state == "stopping":
            return "stopping"
        ready = self.children.ready_count(procs)
        return f"{self.state}: {ready}/{procs} workers consuming, {self.restarts} restarts"

    def _publish(self) -> None:
        now = time.monotonic()
        if self.dirty or now - self._last_write >= STATUS_REFRESH_S:
            self._write_status()
            self.dirty = False
            self._last_write = now
        text = self.status_text()
        if text != self._last_status_text:
            self._last_status_text = text
            self.notifier.status(text)

    def _write_status(self) -> None:
        metrics = [c.pid for c in self.children if c.kind == METRICS]
        status = {
            "pid": self.pid,
            "started_at": self.started_at,
            "stream": self.settings.stream,
            "group": self.settings.group,
            "procs": self.settings.resolved_procs(),
            "tasks": self.settings.tasks,
            "state": self.state,
            "ready": self.state in ("running", "reloading") and self._all_ready(),
            "restarts": self.restarts,
            "children": [_child_status(c) for c in self.children.workers()],
            "metrics_pid": metrics[0] if metrics else None,
            "updated_at": time.time(),
        }
        try:
            write_status(self.status_file, status)
        except OSError as exc:
            self.log.warning("status_write_failed", error=describe(exc))


def _child_status(child: Child) -> dict[str, Any]:
    return {
        "index": child.index,
        "pid": child.pid,
        "started_at": child.started_at,
        "ready": child.ready,
        "retiring": child.retiring,
        "last_heartbeat": child.last_heartbeat or None,
    }


def _fresh_dir(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(mode=0o700)
    return path
