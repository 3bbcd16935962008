"""Private Redis and PostgreSQL servers, for `streamd dev` and for the test suite.

Each server lives in its own directory, listens on 127.0.0.1 only, and runs in its own session so
that a terminal's Ctrl-C or a test's signals never reach it by accident. Tests start many of them:
PostgreSQL is initialised once into a template directory that each new instance copies.

Process inspection reads /proc (Linux), the platform streamd targets.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import pwd
import random
import re
import shlex
import shutil
import signal
import socket
import stat
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Self

from streamd.errors import StreamdError

DEV_ROOT = Path(".streamd/dev")
DEV_REDIS_PORT = 16379
DEV_POSTGRES_PORT = 15432
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
INSTALL_HINT = "install it with: apt-get install redis-server postgresql"
PG_USER_NAME = "streamd-dev"  # created when PostgreSQL must not run as root and no postgres user


class DevServerError(StreamdError):
    """A private server cannot be found, started or stopped; the message says what to do."""


# ---------------------------------------------------------------------------------------------
# binaries


def redis_server_binary() -> Path:
    """redis-server: $STREAMD_REDIS_SERVER, else PATH, else the usual install locations."""
    override = os.environ.get("STREAMD_REDIS_SERVER")
    if override:
        path = Path(override)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise DevServerError(
                f"redis-server not found at {override} (STREAMD_REDIS_SERVER); {INSTALL_HINT}"
            )
        return path
    found = shutil.which("redis-server") or _first_executable(
        [Path("/usr/bin/redis-server"), Path("/usr/local/bin/redis-server")]
    )
    if found is None:
        raise DevServerError(
            "redis-server not found on PATH (or set STREAMD_REDIS_SERVER); " + INSTALL_HINT
        )
    return Path(found)


def postgres_bindir() -> Path:
    """The directory holding initdb and postgres: $STREAMD_PG_BIN, else PATH, else the highest
    version under /usr/lib/postgresql/*/bin (Debian keeps them off PATH)."""
    override = os.environ.get("STREAMD_PG_BIN")
    if override:
        missing = _missing_pg_tools(Path(override))
        if missing:
            raise DevServerError(
                f"{' and '.join(missing)} not found in {override} (STREAMD_PG_BIN); " + INSTALL_HINT
            )
        return Path(override)
    for candidate in _pg_bindir_candidates():
        if not _missing_pg_tools(candidate):
            return candidate
    raise DevServerError(
        "PostgreSQL server binaries (initdb, postgres) not found on PATH or in "
        "/usr/lib/postgresql/*/bin (or set STREAMD_PG_BIN); " + INSTALL_HINT
    )


def _first_executable(paths: list[Path]) -> str | None:
    return next((str(p) for p in paths if p.is_file() and os.access(p, os.X_OK)), None)


def _missing_pg_tools(bindir: Path) -> list[str]:
    return [t for t in ("initdb", "postgres") if not os.access(bindir / t, os.X_OK)]


def _pg_bindir_candidates() -> Iterator[Path]:
    found = shutil.which("initdb")
    if found:
        yield Path(found).resolve().parent  # /usr/local/bin/initdb -> /usr/lib/postgresql/15/bin
        yield Path(found).parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=_version_key, reverse=True)
    yield from versions
    yield Path("/usr/local/pgsql/bin")


def _version_key(bindir: Path) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", bindir.parent.name))


@lru_cache(maxsize=8)
def has_pg_stat_statements(bindir: Path) -> bool:
    """Whether the server in `bindir` can preload pg_stat_statements (Debian ships it)."""
    real = (bindir / "postgres").resolve().parent
    libdirs = [real.parent / "lib"]
    pg_config = real / "pg_config"
    if os.access(pg_config, os.X_OK):
        out = subprocess.run(
            [str(pg_config), "--pkglibdir"], capture_output=True, text=True, check=False
        )
        if out.returncode == 0 and out.stdout.strip():
            libdirs.insert(0, Path(out.stdout.strip()))
    return any((d / "pg_stat_statements.so").is_file() for d in libdirs)


# ---------------------------------------------------------------------------------------------
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


def _state(pid: int) -> str | None:
    """The process state letter, or None if it is gone. A zombie ('Z') has exited already."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rpartition(")")[2].split()[0]


def _alive(pid: int) -> bool:
    return _state(pid) not in (None, "Z", "X")


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


def _cwd(pid: int) -> Path | None:
    try:
        return Path(os.readlink(f"/proc/{pid}/cwd"))
    except OSError:
        return None


def _processes_in(directory: Path) -> list[int]:
    """Live processes whose working directory is `directory` (a server and its children)."""
    target = str(directory.resolve())
    pids = [int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit()]
    return [p for p in pids if str(_cwd(p)) == target and _alive(p)]


def _signal(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def wait_gone(pids: list[int], timeout_s: float, *, reaped: bool = False) -> bool:
    """Wait until the processes have exited (or, with reaped=True, until their parent has also
    collected them: zombies count as gone only without it)."""

    def gone(pid: int) -> bool:
        return _state(pid) is None if reaped else not _alive(pid)

    deadline = time.monotonic() + timeout_s
    while not all(gone(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


_PR_SET_PDEATHSIG = 1


def _die_with_parent(sig: signal.Signals) -> Callable[[], None]:
    """A preexec_fn: the kernel sends `sig` to the server when the test process dies, even by
    SIGKILL, so an aborted test run leaves no server behind."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before fork, called after

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(sig))

    return preexec


# ---------------------------------------------------------------------------------------------
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

    # --- what a subclass provides ---
    @property
    def log_path(self) -> Path:
        raise NotImplementedError

    @property
    def pid_file(self) -> Path:
        raise NotImplementedError

    @property
    def work_dir(self) -> Path:
        """The server's working directory: it identifies our process behind a pid file."""
        raise NotImplementedError

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
        if not _alive(pid):
            return None
        cwd = _cwd(pid)
        # A pid file can outlive its server and the pid be reused: check it is ours.
        return pid if cwd is None or cwd.resolve() == self.work_dir.resolve() else None

    # --- life cycle ---
    def start(self) -> Self:
        """Start the server (no-op if running) and wait until it accepts connections."""
        if self.is_running():
            return self
        self.dir.mkdir(parents=True, exist_ok=True)
        self._prepare()
        if self.pid_file.exists() and not _processes_in(self.work_dir):
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
        preexec = (
            _die_with_parent(self.parent_death_signal) if on_main and not self.detach else None
        )
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
            _signal([pid, *descendants(pid)], signal.SIGCONT)  # a paused server cannot shut down
            _signal([pid], self.stop_signal)
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
            _signal([pid], signal.SIGCONT)  # a paused server cannot reap
            kids = descendants(pid)
            _signal(kids, signal.SIGKILL)
            wait_gone(kids, 5.0, reaped=True)
            _signal([pid], signal.SIGKILL)
            wait_gone([pid], STOP_TIMEOUT_S)
        self._reap()

    def restart(self) -> Self:
        self.stop()
        return self.start()

    def pause(self) -> None:
        """SIGSTOP the server and its children: connections hang, nothing is refused."""
        pid = self._require_pid("pause")
        pids = [pid, *descendants(pid)]
        _signal(pids, signal.SIGSTOP)
        # Signals arrive asynchronously: wait until every process (a backend, too, may still be
        # answering a query on a busy machine) has stopped, or is gone.
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and any(
            _state(p) not in ("T", "t", "Z", None) for p in pids
        ):
            time.sleep(0.001)

    def resume(self) -> None:
        pid = self._require_pid("resume")
        _signal([pid, *descendants(pid)], signal.SIGCONT)

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

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


@dataclass(eq=False)
class RedisServer(_Server):
    """redis-server with AOF on, 10000 databases (tests use one per test), loopback only."""

    appendfsync: str = "everysec"  # "always": a restart keeps every acknowledged write
    config: dict[str, str] = field(default_factory=dict)  # extra redis.conf lines
    binary: Path | None = None

    name: ClassVar[str] = "redis-server"
    stop_signal: ClassVar[signal.Signals] = signal.SIGTERM  # shutdown, fsyncing the AOF

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.dir / "redis.log"

    @property
    def pid_file(self) -> Path:
        return self.dir / "redis.pid"

    @property
    def work_dir(self) -> Path:
        return self.dir

    def _prepare(self) -> None:
        if self.binary is None:
            self.binary = redis_server_binary()
        settings = {
            "bind": "127.0.0.1",
            "port": str(self.port),
            "protected-mode": "yes",
            "daemonize": "no",
            "dir": _quoted(self.dir),
            "pidfile": _quoted(self.pid_file),
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
    def log_path(self) -> Path:
        return self.dir / "postgres.log"

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
                _copy_tree(self.template, self.data_dir)
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
        return {"cwd": str(self.data_dir), **_run_as(postgres_os_user())}

    def ping(self) -> bool:
        return postgres_ping(self.port)


# ---------------------------------------------------------------------------------------------
# PostgreSQL specifics


def postgres_ping(port: int, host: str = "127.0.0.1", timeout_s: float = 2.0) -> bool:
    """True once the server accepts a session (as pg_isready does): a startup packet answered by
    authentication and ReadyForQuery, not by 'the database system is starting up'."""
    body = b"user\0postgres\0database\0postgres\0\0"
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            sock.sendall(struct.pack("!ii", 8 + len(body), 196608) + body)
            reader = sock.makefile("rb")
            while True:
                header = reader.read(5)
                if len(header) < 5:
                    return False
                kind, length = header[:1], struct.unpack("!i", header[1:])[0]
                reader.read(length - 4)
                if kind == b"Z":
                    sock.sendall(b"X\0\0\0\4")  # Terminate
                    return True
                if kind == b"E":
                    return False
    except OSError:
        return False


def postgres_os_user() -> pwd.struct_passwd | None:
    """The unprivileged user PostgreSQL runs as when we are root (it refuses to run as root):
    `postgres` if it exists, else a system user `streamd-dev` that we create."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", PG_USER_NAME):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    with contextlib.suppress(OSError):
        # Parallel test workers may race here: whoever loses sees "already exists", which is fine.
        subprocess.run(
            [
                "useradd",
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                PG_USER_NAME,
            ],
            capture_output=True,
            check=False,
        )
    try:
        return pwd.getpwnam(PG_USER_NAME)
    except KeyError:
        raise DevServerError(
            "PostgreSQL refuses to run as root and there is no unprivileged user to run it as; "
            f"create one: useradd --system {PG_USER_NAME}"
        ) from None


def grant_traverse(path: Path, user: pwd.struct_passwd) -> None:
    """Let `user` reach `path`: add the execute (search) bit for others on every parent that
    stops it. This does not let anyone list or read those directories."""
    for parent in [*reversed(path.absolute().parents), path.absolute()]:
        st = parent.stat()
        if st.st_uid == user.pw_uid:
            continue
        # The group bits, not the others bits, decide for members of the directory's group.
        bit = stat.S_IXGRP if st.st_gid == user.pw_gid else stat.S_IXOTH
        if not st.st_mode & bit:
            os.chmod(parent, stat.S_IMODE(st.st_mode) | bit)


def initdb(data_dir: Path, *, bindir: Path | None = None, sync: bool = True) -> Path:
    """Create a PostgreSQL cluster in data_dir (superuser `postgres`, trust auth, UTF-8)."""
    bindir = bindir or postgres_bindir()
    owner = postgres_os_user()
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    if owner is not None:
        os.chown(data_dir, owner.pw_uid, owner.pw_gid)
        grant_traverse(data_dir.parent, owner)
    cmd = [str(bindir / "initdb"), "-D", str(data_dir), "-U", "postgres", "--auth=trust"]
    cmd += ["--encoding=UTF8", "--locale=C", *([] if sync else ["--no-sync"])]
    out = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        check=False,
        cwd=str(data_dir),
        **_run_as(owner),
    )
    if out.returncode != 0:
        tail = " | ".join((out.stdout + out.stderr).strip().splitlines()[-6:])
        raise DevServerError(f"initdb into {data_dir} failed (exit {out.returncode}): {tail}")
    return data_dir


def _run_as(user: pwd.struct_passwd | None) -> dict[str, Any]:
    if user is None:
        return {}
    env = {**os.environ, "HOME": user.pw_dir, "USER": user.pw_name, "LOGNAME": user.pw_name}
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": [], "env": env}


def _copy_tree(src: Path, dst: Path) -> None:
    # cp -a keeps owners and modes, which PostgreSQL checks on its data directory.
    out = subprocess.run(["cp", "-a", str(src), str(dst)], capture_output=True, text=True)
    if out.returncode != 0:
        raise DevServerError(f"cannot copy {src} to {dst}: {out.stderr.strip()}")


def _quoted(path: Path) -> str:
    return '"' + str(path).replace("\\", "\\\\").replace('"', '\\"') + '"'


# ---------------------------------------------------------------------------------------------
# `streamd dev`: project-local servers that outlive the command


def _dev_servers(
    root: Path, redis_port: int | None = None, postgres_port: int | None = None
) -> tuple[RedisServer, PostgresServer]:
    state = _read_state(root)
    redis = RedisServer(
        root / "redis", port=redis_port or state.get("redis_port", DEV_REDIS_PORT), detach=True
    )
    postgres = PostgresServer(
        root / "postgres",
        port=postgres_port or state.get("postgres_port", DEV_POSTGRES_PORT),
        detach=True,
    )
    return redis, postgres


def dev_up(
    root: Path = DEV_ROOT, *, redis_port: int | None = None, postgres_port: int | None = None
) -> dict[str, str]:
    """Start (or find running) the dev Redis and PostgreSQL under root; write root/env.

    Returns the environment that points streamd at them (STREAMD_REDIS_URL, STREAMD_POSTGRES_DSN).
    """
    root = root.absolute()
    redis, postgres = _dev_servers(root, redis_port, postgres_port)
    redis.binary, postgres.bindir = redis_server_binary(), postgres_bindir()  # both, or neither
    for server, flag in ((redis, "--redis-port"), (postgres, "--postgres-port")):
        _dev_start(server, flag)
    _enable_pg_stat_statements(postgres)
    _write_state(root, {"redis_port": redis.port, "postgres_port": postgres.port})
    env = {"STREAMD_REDIS_URL": redis.url, "STREAMD_POSTGRES_DSN": postgres.dsn}
    lines = [f"# streamd dev servers; load with: source {root / 'env'}", *export_lines(env)]
    (root / "env").write_text("\n".join(lines) + "\n")
    return env


def _enable_pg_stat_statements(postgres: PostgresServer) -> None:
    """The dev server preloads pg_stat_statements; creating the extension lets `streamd monitor`
    show insert latency. Best effort: without it the dashboard prints a hint instead."""
    assert postgres.bindir is not None
    if not has_pg_stat_statements(postgres.bindir):
        return
    sql = "CREATE EXTENSION IF NOT EXISTS pg_stat_statements"
    cmd = [str(postgres.bindir / "psql"), "-h", "127.0.0.1", "-p", str(postgres.port)]
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        subprocess.run(
            [*cmd, "-U", "postgres", "-d", "postgres", "-qXc", sql],
            capture_output=True,
            timeout=30,
            check=False,
        )


def export_lines(env: dict[str, str]) -> list[str]:
    """`export NAME=value` lines that sh can eval or source."""
    return [f"export {key}={shlex.quote(value)}" for key, value in env.items()]


def _dev_start(server: RedisServer | PostgresServer, flag: str) -> None:
    if server.is_running():
        if not server.ping():
            raise DevServerError(
                f"dev {server.name} (pid {server.pid}) runs but does not answer on port "
                f"{server.port}; see {server.log_path}, or run `streamd dev down`"
            )
        return
    if not port_is_free(server.port):
        raise DevServerError(
            f"port {server.port} on 127.0.0.1 is already in use by another program, not "
            f"streamd's dev {server.name}; stop it or pick another port: streamd dev up {flag} N"
        )
    server.start()


def dev_down(root: Path = DEV_ROOT) -> dict[str, bool]:
    """Stop the dev servers under root (their data stays); returns which ones were running."""
    root = root.absolute()
    redis, postgres = _dev_servers(root)
    was = {"postgres": postgres.is_running(), "redis": redis.is_running()}
    postgres.stop()
    redis.stop()
    with contextlib.suppress(FileNotFoundError):
        (root / "env").unlink()
    return was


def dev_status(root: Path = DEV_ROOT) -> dict[str, Any]:
    """Where the dev servers live, whether they run, and how to reach them."""
    root = root.absolute()
    redis, postgres = _dev_servers(root)
    out: dict[str, Any] = {"root": str(root), "env_file": str(root / "env")}
    out["redis"] = {
        "running": redis.is_running(),
        "pid": redis.pid,
        "port": redis.port,
        "url": redis.url,
        "dir": str(redis.dir),
    }
    out["postgres"] = {
        "running": postgres.is_running(),
        "pid": postgres.pid,
        "port": postgres.port,
        "dsn": postgres.dsn,
        "dir": str(postgres.dir),
    }
    return out


def format_status(status: dict[str, Any]) -> str:
    """dev_status() as lines for a terminal."""
    lines = []
    for name, target in (("redis", "url"), ("postgres", "dsn")):
        info = status[name]
        state = f"running (pid {info['pid']})" if info["running"] else "stopped"
        lines.append(f"{name:<9} {state:<20} {info[target]}")
    lines.append(f"data in {status['root']}")
    return "\n".join(lines)


def _read_state(root: Path) -> dict[str, int]:
    try:
        data = json.loads((root / "state.json").read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, int)} if isinstance(data, dict) else {}


def _write_state(root: Path, state: dict[str, int]) -> None:
    (root / "state.json").write_text(json.dumps(state) + "\n")
