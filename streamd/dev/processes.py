"""Free ports and process inspection through /proc, for servers started in their own sessions."""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

from streamd.common.procs import pid_alive, process_state

# ports


_rng = random.SystemRandom()  # not the `random` module: tests may seed that identically per worker


def free_port() -> int:
    """A free TCP port on 127.0.0.1, chosen below the ephemeral range when possible, so that a
    client's outgoing connection cannot grab a server's port while that server restarts."""
    low = _ephemeral_low()
    if low > 21000:
        for _ in range(200):
            port = _rng.randrange(20000, low)
            if port_is_free(port):
                return port
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        chosen: int = sock.getsockname()[1]
        return chosen


def port_is_free(port: int) -> bool:
    """True when a server could listen on 127.0.0.1:port now."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


# ---------------------------------------------------------------------------------------------
# processes (/proc)


def descendants(pid: int) -> list[int]:
    """All descendants of pid (PostgreSQL backends are their own process groups: killpg is not
    enough)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        parents.setdefault(ppid, []).append(int(entry.name))
    out: list[int] = []
    todo = [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        out.extend(kids)
        todo.extend(kids)
    return out


def process_cwd(pid: int) -> Path | None:
    try:
        return Path(os.readlink(f"/proc/{pid}/cwd"))
    except OSError:
        return None


def processes_in(directory: Path) -> list[int]:
    """Live processes whose working directory is `directory` (a server and its children)."""
    target = str(directory.resolve())
    pids = [int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit()]
    return [p for p in pids if str(process_cwd(p)) == target and pid_alive(p)]


def signal_all(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def wait_gone(pids: list[int], timeout_s: float, *, reaped: bool = False) -> bool:
    """Wait until the processes have exited (or, with reaped=True, until their parent has also
    collected them: zombies count as gone only without it)."""

    def gone(pid: int) -> bool:
        return process_state(pid) is None if reaped else not pid_alive(pid)

    deadline = time.monotonic() + timeout_s
    while not all(gone(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: signal.Signals) -> Callable[[], None]:
    """A preexec_fn: the kernel sends `sig` to the server when the test process dies, even by
    SIGKILL, so an aborted test run leaves no server behind."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before fork, called after

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(sig))

    return preexec


# ---------------------------------------------------------------------------------------------
