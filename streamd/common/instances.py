"""A serve's instance id: how its consumers are told apart from every other serve's.

A hostname is not enough (two containers or pods may share one, and each numbers its pids from 1
in its own PID namespace), so a serve without a configured `instance_id` takes a random one at
start: `<hostname>-<8 hex digits>`, readable in `XINFO CONSUMERS` and unique in practice.
"""

from __future__ import annotations

import re
import secrets
import socket

_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]")


def new_instance_id() -> str:
    host = _UNSAFE.sub("-", socket.gethostname())[:60] or "host"
    return f"{host}-{secrets.token_hex(4)}"
