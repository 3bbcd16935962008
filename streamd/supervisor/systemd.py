"""sd_notify(3) over $NOTIFY_SOCKET with a plain datagram socket: no extra dependency.

Only the supervisor (systemd's main process) sends; children get the variables removed.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping

_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def unset_environment() -> None:
    for name in _VARIABLES:
        os.environ.pop(name, None)


def _socket_address(value: str) -> str | None:
    if value.startswith("@"):  # an abstract socket
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None  # vsock:… and other transports are not supported here


class Notifier:
    """Reads the environment once, at construction (before children are forked)."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.address = _socket_address(env.get("NOTIFY_SOCKET", ""))
        self.watchdog_usec = _watchdog_usec(env)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *fields: str) -> bool:
        """Send `KEY=value` fields in one datagram; False when there is no socket or it fails
        (systemd going away must never take the service down)."""
        if self.address is None:
            return False
        payload = "\n".join(fields).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(payload, self.address)
        except OSError:
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.send("READY=1", f"STATUS={status}")

    def status(self, status: str) -> bool:
        return self.send(f"STATUS={status}")

    def reloading(self) -> bool:
        # MONOTONIC_USEC lets systemd (253+) match this reload to the HUP it sent.
        return self.send("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")

    def stopping(self, status: str) -> bool:
        return self.send("STOPPING=1", f"STATUS={status}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def watchdog_interval_s(self) -> float | None:
        """How often to send WATCHDOG=1 (half the timeout, as sd_watchdog_enabled advises)."""
        if not self.enabled or self.watchdog_usec is None:
            return None
        return self.watchdog_usec / 2 / 1_000_000


def _watchdog_usec(env: Mapping[str, str]) -> int | None:
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid != str(os.getpid()):
        return None  # meant for another process
    return int(usec)
