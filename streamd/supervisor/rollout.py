"""Reload (SIGHUP): replace the children one at a time with ones on the new settings.

Start the new child, wait until it consumes, then drain the old one. A new child that fails to
start aborts the reload and the service keeps its running config; a second HUP during a rollout
runs another one after it, since the first may have read the file too early.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from streamd.backends.faults import describe
from streamd.config.settings import Settings
from streamd.errors import StreamdError
from streamd.observability.log import configure_logging
from streamd.supervisor.child import METRICS, WORKER
from streamd.supervisor.children import Child

if TYPE_CHECKING:
    from streamd.supervisor.arbiter import Supervisor

METRICS_STOP_TIMEOUT_S = 5.0


@dataclass(slots=True)
class Rollout:
    """A reload in progress: slots still to replace, and the new child being awaited."""

    previous: Settings
    slots: list[int]
    started: float
    incoming: Child | None = None
    replaced: int = 0


class Rollouts:
    """The supervisor's reloads: at most one rollout at a time, and whether another is owed."""

    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup
        self.current: Rollout | None = None
        self.again = False

    def begin(self) -> None:
        if self.sup.state == "stopping":
            return
        if self.current is not None:
            self.again = True  # after this one: it may have read the file too early
            return
        try:
            new = (
                self.sup.read_settings()
                if self.sup.read_settings is not None
                else self.sup.settings
            )
        except Exception as exc:  # a reload must never take the running service down
            error = str(exc) if isinstance(exc, StreamdError) else describe(exc)
            self.sup.log.error("reload_failed", error=error, note="keeping the running config")
            return
        configure_logging(new.log_level, new.log_format)
        self.sup.notifier.reloading()
        procs = new.resolved_procs()
        self.current = Rollout(self.sup.settings, list(range(procs)), time.monotonic())
        old = self.sup.settings
        if (new.metrics_host, new.metrics_port) != (old.metrics_host, old.metrics_port):
            for child in self.sup.children:
                if child.kind == METRICS:
                    self.sup.children.retire(child, signal.SIGTERM, METRICS_STOP_TIMEOUT_S)
        self.sup.use(new)
        self.sup.state = "reloading"
        self.sup.dirty = True
        self.sup.log.info("reload_started", procs=procs, tasks=new.tasks)

    def advance(self) -> None:
        rollout = self.current
        while rollout is not None and self.current is rollout:
            if rollout.incoming is None:
                if not rollout.slots:
                    self._finish(rollout)
                    return
                index = rollout.slots.pop(0)
                self.sup.restart.due.pop((WORKER, index), None)
                rollout.incoming = self.sup.spawn(WORKER, index)
                if rollout.incoming is None:
                    self._fail(rollout, "fork failed")
                return
            if not rollout.incoming.ready:
                return
            self._replace(rollout.incoming)
            rollout.replaced += 1
            rollout.incoming = None

    def _replace(self, incoming: Child) -> None:
        """Drain the children that incoming replaces, now that it consumes."""
        for old in self.sup.children:
            if old.slot == incoming.slot and old is not incoming and not old.retiring:
                self.sup.log.info(
                    "child_replaced", index=old.index, old_pid=old.pid, child_pid=incoming.pid
                )
                self.sup.children.retire(old, signal.SIGTERM, old.settings.graceful_timeout_s)

    def _finish(self, rollout: Rollout) -> None:
        procs = self.sup.settings.resolved_procs()
        for child in self.sup.children.workers():  # fewer procs than before: drain the rest
            if child.index >= procs and not child.retiring:
                self.sup.children.retire(child, signal.SIGTERM, child.settings.graceful_timeout_s)
        self.current = None
        self.sup.state = "running"
        self.sup.ever_ready = True
        ms = round((time.monotonic() - rollout.started) * 1000, 1)
        self.sup.log.info("reload_finished", replaced=rollout.replaced, procs=procs, ms=ms)
        self.sup.notifier.ready(self.sup.status_text())
        if self.again:
            self.again = False
            self.begin()

    def abort(self, child: Child, code: int) -> None:
        reason = child.failure[1] if child.failure else f"new worker exited with code {code}"
        self._fail(self.current, reason, code=code, index=child.index)

    def _fail(self, rollout: Rollout | None, reason: str, **fields: Any) -> None:
        if rollout is None:
            return
        self.sup.use(rollout.previous)
        self.current = None
        self.again = False
        self.sup.state = "running"
        self.sup.log.error(
            "reload_failed",
            error=reason,
            replaced=rollout.replaced,
            note="keeping the running config",
            **fields,
        )
        self.sup.notifier.ready(f"reload failed: {reason}"[:200])
