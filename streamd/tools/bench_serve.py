"""A `streamd serve` that `streamd bench --serve` starts for itself, and stops at the end.

It runs as a real subprocess (`python -m streamd serve`), in its own session so that a Ctrl-C
meant for the benchmark reaches it only through our SIGTERM; its logs go to a file in state_dir
that an error message points to.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from streamd.config.settings import Settings
from streamd.errors import StreamdError
from streamd.observability.status_file import read_status_files

READY_TIMEOUT_S = 60.0


class ServeFailed(StreamdError):
    """The benchmark's own serve did not start (the message quotes its log)."""


class ServeRunner:
    def __init__(self, settings: Settings, procs: int, global_args: Sequence[str] = ()) -> None:
        self.settings = settings
        self.procs = procs
        self.argv = [sys.executable, "-m", "streamd", *global_args, "serve", "--procs", str(procs)]
        state_dir = settings.resolved_state_dir()
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.log_path = state_dir / f"bench-serve-{os.getpid()}.log"
        self.proc: asyncio.subprocess.Process | None = None

    def _open_log(self) -> BinaryIO:
        return open(self.log_path, "wb")  # handed to the child, closed after it starts

    async def start(self) -> None:
        """Start serve and wait until its supervisor reports every worker consuming."""
        env = {**os.environ, "STREAMD_LOG_FORMAT": "json"}
        log = self._open_log()
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        finally:
            log.close()
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not self._ready():
            if self.proc.returncode is not None:
                code = self.proc.returncode
                raise ServeFailed(f"streamd serve exited with {code} at start; {self._tail()}")
            if time.monotonic() > deadline:
                waited = f"{READY_TIMEOUT_S:g}s"
                raise ServeFailed(f"streamd serve not ready after {waited}; {self._tail()}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.proc.wait(), timeout=0.05)

    def _ready(self) -> bool:
        assert self.proc is not None
        pid = self.proc.pid
        statuses = read_status_files(self.settings.resolved_state_dir())
        return any(s.get("pid") == pid and s.get("ready") for s in statuses)

    def _tail(self, lines: int = 8) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            text = []
        return f"its log ({self.log_path}) ends with:\n" + "\n".join(text)

    async def stop(self) -> int | None:
        """SIGTERM (serve drains: commits and acknowledges), then SIGKILL if it takes too long."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), timeout=self.settings.graceful_timeout_s + 10)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
        return proc.returncode

    @property
    def log(self) -> Path:
        return self.log_path
