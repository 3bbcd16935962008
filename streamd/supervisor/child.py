"""The child side of the supervisor: everything between fork and `os._exit`.

A child talks to the supervisor through one pipe, in short lines (a write of fewer than PIPE_BUF
bytes to a pipe is atomic, so lines never interleave):
  `hb`                  a heartbeat, sent from the child's event loop every second
  `ready`               every consumer task is reading
  `fail <code> <text>`  startup failed; <code> is the exit code that follows
The supervisor owns SIGINT: a child ignores it, so a Ctrl-C sent to the whole process group makes
the supervisor drain the children once, instead of each child reacting on its own as well.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib
import os
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streamd.config.settings import Settings
from streamd.errors import EXIT_FAILURE, EXIT_OK, StreamdError
from streamd.observability.log import configure_logging, get_logger
from streamd.supervisor import systemd

PR_SET_PDEATHSIG = 1
MSG_HEARTBEAT = b"hb\n"
MSG_READY = b"ready\n"
_FAIL = b"fail "
_MAX_LINE = 400  # well below PIPE_BUF (4096): one write, never split

WORKER = "worker"
METRICS = "metrics"


@dataclass(frozen=True, slots=True)
class ChildSpec:
    """What a child needs after fork; built by the supervisor, read only in the child."""

    kind: str  # WORKER or METRICS
    index: int
    settings: Settings
    write_fd: int  # the child's end of its pipe to the supervisor
    parent_pid: int
    close_fds: Sequence[int]  # the supervisor's descriptors, useless (and harmful) in the child
    status_file: Path


def encode_failure(code: int, message: str) -> bytes:
    text = " ".join(message.split())  # one line, whatever the message held
    line = _FAIL + f"{code} {text}".encode(errors="replace")
    return line[:_MAX_LINE] + b"\n"


def parse_line(line: bytes) -> tuple[str, int, str]:
    """('hb'|'ready'|'fail'|'unknown', exit code, message) for one line from a child."""
    if line == MSG_HEARTBEAT.strip():
        return "hb", 0, ""
    if line == MSG_READY.strip():
        return "ready", 0, ""
    if line.startswith(_FAIL):
        code, _, text = line[len(_FAIL) :].decode(errors="replace").partition(" ")
        return ("fail", int(code), text) if code.isdigit() else ("unknown", 0, "")
    return "unknown", 0, ""


class ParentLink:
    """The child's end of the pipe: heartbeats, readiness, failures; notices a dead parent."""

    def __init__(self, fd: int, parent_pid: int) -> None:
        self.fd = fd
        self.parent_pid = parent_pid
        self._orphaned = False

    def heartbeat(self) -> None:
        # PR_SET_PDEATHSIG covers the parent's death on Linux; this check is the fallback (a
        # subreaper, another OS) and costs one syscall a second.
        if os.getppid() != self.parent_pid:
            self._orphan()
            return
        self._send(MSG_HEARTBEAT)

    def ready(self) -> None:
        self._send(MSG_READY)

    def fail(self, code: int, message: str) -> None:
        self._send(encode_failure(code, message))

    def _send(self, data: bytes) -> None:
        try:
            os.write(self.fd, data)
        except BlockingIOError:
            pass  # the supervisor is behind on reading: the pipe already holds proof of life
        except OSError:  # EPIPE: nobody reads the other end any more
            self._orphan()

    def _orphan(self) -> None:
        """Drain and exit, as on SIGTERM: what is in hand is committed and acknowledged."""
        if not self._orphaned:
            self._orphaned = True
            os.kill(os.getpid(), signal.SIGTERM)


def set_parent_death_signal(signum: int) -> None:
    """Ask Linux to send us `signum` when the supervisor dies (no-op elsewhere)."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0)


def _reset_process_state(spec: ChildSpec) -> None:
    signal.set_wakeup_fd(-1)
    for signum in (signal.SIGTERM, signal.SIGQUIT, signal.SIGCHLD):
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor owns Ctrl-C
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # reloads are the supervisor's business
    for fd in spec.close_fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    os.set_blocking(spec.write_fd, False)
    systemd.unset_environment()  # only the supervisor speaks to systemd (NotifyAccess=main)
    set_parent_death_signal(signal.SIGTERM)
    if os.getppid() != spec.parent_pid:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _metrics_function(name: str) -> Callable[..., Any] | None:
    """A function of streamd.metrics, or None while that module (or the function) is absent."""
    try:
        metrics = importlib.import_module("streamd.observability.metrics")
    except ImportError:
        return None
    function = getattr(metrics, name, None)
    return function if callable(function) else None


@functools.cache
def metrics_available() -> bool:
    """Whether streamd.metrics can serve (asked once: the supervisor's loop asks every turn)."""
    return _metrics_function("serve_metrics") is not None


def _run_worker(spec: ChildSpec, link: ParentLink) -> None:
    from streamd.worker.process import WorkerHooks, run_worker

    make_observer = _metrics_function("worker_observer")
    observer = make_observer(spec.settings) if make_observer is not None else None
    hooks = WorkerHooks(heartbeat=link.heartbeat, on_ready=link.ready, observer=observer)
    run_worker(spec.settings, spec.index, hooks)


def _run_metrics(spec: ChildSpec) -> None:
    serve_metrics = _metrics_function("serve_metrics")
    if serve_metrics is not None:
        serve_metrics(spec.settings, spec.status_file)


def _body(spec: ChildSpec, link: ParentLink) -> int:
    configure_logging(spec.settings.log_level, spec.settings.log_format)  # a reload may change it
    try:
        if spec.kind == METRICS:
            _run_metrics(spec)
        else:
            _run_worker(spec, link)
    except StreamdError as exc:
        link.fail(exc.exit_code, str(exc))
        return exc.exit_code
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_FAILURE
    except BaseException:
        get_logger(proc=spec.index, pid=os.getpid()).exception("worker_crashed")
        return EXIT_FAILURE
    return EXIT_OK


def run_child(spec: ChildSpec) -> None:
    """Run the child to completion and leave the process; never returns to the supervisor's
    code (os._exit: no atexit handlers or finalizers that belong to the parent)."""
    code = EXIT_FAILURE
    try:
        _reset_process_state(spec)
        code = _body(spec, ParentLink(spec.write_fd, spec.parent_pid))
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)
