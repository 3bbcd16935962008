"""Private Redis and PostgreSQL servers, for `streamd dev` and for the test suite.

Each server lives in its own directory, listens on 127.0.0.1 only, and runs in its own session so
that a terminal's Ctrl-C or a test's signals never reach it by accident. Tests start many of them:
PostgreSQL is initialised once into a template directory that each new instance copies.

Process inspection reads /proc (Linux), the platform streamd targets.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Self

from streamd.common.procs import pid_alive, process_state
from streamd.dev.binaries import has_pg_stat_statements, postgres_bindir, redis_server_binary
from streamd.dev.common import START_TIMEOUT_S, STOP_TIMEOUT_S, DevServerError
from streamd.dev.pg_setup import (
    copy_tree,
    grant_traverse,
    initdb,
    postgres_os_user,
    postgres_ping,
    quoted_path,
    run_as,
)
from streamd.dev.processes import (
    descendants,
    die_with_parent,
    free_port,
    port_is_free,
    process_cwd,
    processes_in,
    signal_all,
    wait_gone,
)

# the servers


@dataclass(eq=False)
class _Server:
    """What Redis and PostgreSQL servers share: a directory, a port, a process and its life."""

    dir: Path
    port: int = 0  # 0: pick a free port
    detach: bool = False  # True: keep running after this process exits (`streamd dev up`)
    start_timeout_s: float = START_TIMEOUT_S
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _auto_port: bool = field(default=False, init=False, repr=False)
    _log_offset: int = field(default=0, init=False, repr=False)

    name: ClassVar[str] = "server"
    stop_signal: ClassVar[signal.Signals] = signal.SIGTERM
    parent_death_signal: ClassVar[signal.Signals] = signal.SIGKILL

    def __post_init__(self) -> None:
        self.dir = Path(self.dir).absolute()
        if self.port == 0:
            self.port = free_port()
            self._auto_port = True

    # --- what a subclass provides (or keeps: its files are <dir>/<file_stem>.log and .pid) ---
    file_stem: ClassVar[str] = "server"

    @property
    def log_path(self) -> Path:
        return self.dir / f"{self.file_stem}.log"

    @property
    def pid_file(self) -> Path:
        return self.dir / f"{self.file_stem}.pid"

    @property
    def work_dir(self) -> Path:
        """The server's working directory: it identifies our process behind a pid file."""
        return self.dir

    def _prepare(self) -> None:
        raise NotImplementedError

    def _command(self) -> list[str]:
        raise NotImplementedError

    def ping(self) -> bool:
        raise NotImplementedError

    def _popen_extra(self) -> dict[str, Any]:
        return {}

    # --- state ---
    @property
    def pid(self) -> int | None:
        """The server's pid if it is running (started here or found through its pid file)."""
        if self._proc is not None and self._proc.poll() is None:
            return self._proc.pid
        return self._pid_from_file()

    def is_running(self) -> bool:
        return self.pid is not None

    def _pid_from_file(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        if not pid_alive(pid):
            return None
        cwd = process_cwd(pid)
        # A pid file can outlive its server and the pid be reused: check it is ours.
        return pid if cwd is None or cwd.resolve() == self.work_dir.resolve() else None

    # --- life cycle ---
    def start(self) -> Self:
        """Start the server (no-op if running) and wait until it accepts connections."""
        if self.is_running():
            return self
        self.dir.mkdir(parents=True, exist_ok=True)
        self._prepare()
        if self.pid_file.exists() and not processes_in(self.work_dir):
            self.pid_file.unlink()  # stale, from a server that was killed
        for attempt in range(5):
            if not port_is_free(self.port):
                if self._auto_port and attempt < 4:
                    self.port = free_port()  # another test run took it meanwhile
                    continue
                raise DevServerError(
                    f"cannot start {self.name}: 127.0.0.1:{self.port} is already in use "
                    "by another program"
                )
            if self._launch():
                return self
        raise DevServerError(f"cannot start {self.name}: no free port found")

    def _launch(self) -> bool:
        """Start the process and wait for it; False if it lost a race for an automatic port."""
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        # The kernel tracks the forking *thread*: from any other thread the server would die
        # with that thread, so the safety net is only set from the main thread.
        on_main = threading.current_thread() is threading.main_thread()
        preexec = die_with_parent(self.parent_death_signal) if on_main and not self.detach else None
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                self._command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # no terminal signals; its own process group
                preexec_fn=preexec,  # only a prctl call: safe between fork and exec
                **self._popen_extra(),
            )
        deadline = time.monotonic() + self.start_timeout_s
        while not self.ping():
            code = self._proc.poll()
            if code is not None:
                tail = self.log_tail()
                if self._auto_port and "in use" in tail:
                    return False
                self._proc = None
                raise DevServerError(f"{self.name} exited with code {code} at start: {tail}")
            if time.monotonic() > deadline:
                self.kill()
                raise DevServerError(
                    f"{self.name} on port {self.port} not ready after {self.start_timeout_s:g} s: "
                    f"{self.log_tail()}"
                )
            time.sleep(0.01)
        return True

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Graceful shutdown; waits for the process to exit (SIGKILL after timeout_s)."""
        pid = self.pid
        if pid is not None:
            signal_all([pid, *descendants(pid)], signal.SIGCONT)  # a paused server cannot shut down
            signal_all([pid], self.stop_signal)
            if not wait_gone([pid], timeout_s):
                self.kill()
        self._reap()

    def kill(self) -> None:
        """SIGKILL the server and every process it forked: a crash, with no shutdown work.

        Children die first, while the server can still reap them: killed the other way round they
        become orphans, and zombies forever under an init that does not reap (some containers).
        """
        pid = self.pid
        if pid is not None:
            signal_all([pid], signal.SIGCONT)  # a paused server cannot reap
            kids = descendants(pid)
            signal_all(kids, signal.SIGKILL)
            wait_gone(kids, 5.0, reaped=True)
            signal_all([pid], signal.SIGKILL)
            wait_gone([pid], STOP_TIMEOUT_S)
        self._reap()

    def restart(self) -> Self:
        self.stop()
        return self.start()

    def pause(self) -> None:
        """SIGSTOP the server and its children: connections hang, nothing is refused."""
        pid = self._require_pid("pause")
        pids = [pid, *descendants(pid)]
        signal_all(pids, signal.SIGSTOP)
        # Signals arrive asynchronously: wait until every process (a backend, too, may still be
        # answering a query on a busy machine) has stopped, or is gone.
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and any(
            process_state(p) not in ("T", "t", "Z", None) for p in pids
        ):
            time.sleep(0.001)

    def resume(self) -> None:
        pid = self._require_pid("resume")
        signal_all([pid, *descendants(pid)], signal.SIGCONT)

    def _require_pid(self, doing: str) -> int:
        pid = self.pid
        if pid is None:
            raise DevServerError(f"cannot {doing} {self.name}: it is not running")
        return pid

    def _reap(self) -> None:
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=STOP_TIMEOUT_S)
            self._proc = None

    def log_tail(self, lines: int = 6) -> str:
        """The last lines this start wrote to the server log, on one line (for error messages)."""
        try:
            with open(self.log_path, "rb") as log:
                log.seek(self._log_offset)
                text = log.read().decode("utf-8", "replace")
        except OSError:
            return f"(no log at {self.log_path})"
        kept = [line.strip() for line in text.splitlines() if line.strip()][-lines:]
        return f"log {self.log_path}: " + (" | ".join(kept) if kept else "(empty)")

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *_exc_info: object) -> None:
        self.stop()


@dataclass(eq=False)
class RedisServer(_Server):
    """redis-server with AOF on, 10000 databases (tests use one per test), loopback only."""

    appendfsync: str = "everysec"  # "always": a restart keeps every acknowledged write
    config: dict[str, str] = field(default_factory=dict)  # extra redis.conf lines
    binary: Path | None = None

    name: ClassVar[str] = "redis-server"
    file_stem: ClassVar[str] = "redis"
    stop_signal: ClassVar[signal.Signals] = signal.SIGTERM  # shutdown, fsyncing the AOF

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _prepare(self) -> None:
        if self.binary is None:
            self.binary = redis_server_binary()
        settings = {
            "bind": "127.0.0.1",
            "port": str(self.port),
            "protected-mode": "yes",
            "daemonize": "no",
            "dir": quoted_path(self.dir),
            "pidfile": quoted_path(self.pid_file),
            "logfile": '""',  # stdout, which goes to redis.log
            "appendonly": "yes",
            "appendfsync": self.appendfsync,
            "save": '""',  # the AOF is the persistence; no RDB snapshots
            "databases": "10000",
            **self.config,
        }
        lines = [f"{key} {value}" for key, value in settings.items()]
        (self.dir / "redis.conf").write_text("\n".join(lines) + "\n")

    def _command(self) -> list[str]:
        return [str(self.binary), str(self.dir / "redis.conf")]

    def ping(self) -> bool:
        """PING answered with PONG (not -LOADING while the AOF is replayed)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1.0) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False


# Test speed, still safe against process kills (not OS crashes). wal_init_zero off and big WAL
# buffers make CREATE DATABASE several times faster.
_NO_FSYNC = {
    "fsync": "off",
    "full_page_writes": "off",
    "wal_init_zero": "off",
    "wal_buffers": "16MB",
}


_TEST_SERVER = {
    # After a crash, exit instead of reinitialising: kill() then leaves no orphans, and a crashed
    # test server stays down until the test restarts it.
    "restart_after_crash": "off",
    # Shared memory segments as files in the data directory, not /dev/shm: a killed server's are
    # then deleted with its directory instead of leaking.
    "dynamic_shared_memory_type": "mmap",
}


@dataclass(eq=False)
class PostgresServer(_Server):
    """postgres with trust auth for superuser `postgres`, loopback only, its socket in its dir."""

    fsync: bool = True  # False: for tests, see _NO_FSYNC
    template: Path | None = None  # an initdb'ed data dir to copy instead of running initdb
    settings: dict[str, str] = field(default_factory=dict)  # extra -c name=value
    bindir: Path | None = None

    name: ClassVar[str] = "postgres"
    file_stem: ClassVar[str] = "postgres"
    stop_signal: ClassVar[signal.Signals] = signal.SIGINT  # "fast": SIGTERM waits for clients
    parent_death_signal: ClassVar[signal.Signals] = signal.SIGQUIT  # immediate, takes children

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def data_dir(self) -> Path:
        return self.dir / "data"

    @property
    def socket_dir(self) -> Path:
        return self.dir / "run"

    @property
    def pid_file(self) -> Path:
        return self.data_dir / "postmaster.pid"

    @property
    def work_dir(self) -> Path:
        return self.data_dir

    def _prepare(self) -> None:
        if self.bindir is None:
            self.bindir = postgres_bindir()
        owner = postgres_os_user()
        if not (self.data_dir / "PG_VERSION").is_file():
            if self.template is not None:
                copy_tree(self.template, self.data_dir)
            else:
                initdb(self.data_dir, bindir=self.bindir, sync=self.fsync)
        self.socket_dir.mkdir(exist_ok=True)
        if owner is not None:
            os.chown(self.socket_dir, owner.pw_uid, owner.pw_gid)
            grant_traverse(self.dir, owner)

    def _command(self) -> list[str]:
        assert self.bindir is not None
        options = {
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            "unix_socket_directories": self._socket_option(),
            "max_connections": "200",
            "logging_collector": "off",
            **(_TEST_SERVER if not self.detach else {}),
            **(_NO_FSYNC if not self.fsync else {}),
            **(
                {"shared_preload_libraries": "pg_stat_statements"}
                if has_pg_stat_statements(self.bindir)
                else {}
            ),
            **self.settings,
        }
        cmd = [str(self.bindir / "postgres"), "-D", str(self.data_dir)]
        for key, value in options.items():
            cmd += ["-c", f"{key}={value}"]
        return cmd

    def _socket_option(self) -> str:
        # A unix socket path is limited to 107 bytes; deep directories get TCP only.
        too_long = len(str(self.socket_dir / f".s.PGSQL.{self.port}.lock")) > 100
        return "" if too_long else str(self.socket_dir)

    def _popen_extra(self) -> dict[str, Any]:
        return {"cwd": str(self.data_dir), **run_as(postgres_os_user())}

    def ping(self) -> bool:
        return postgres_ping(self.port)


# ---------------------------------------------------------------------------------------------
