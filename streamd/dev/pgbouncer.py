"""A private PgBouncer in front of a PostgreSQL server, for the tests of `postgres_pooler`.

Like the Redis and PostgreSQL servers of servers.py: its own directory, a free loopback port, its
own session, killed after. The configuration is the Debian package's defaults (no
ignore_startup_parameters, server_reset_query DISCARD ALL in session mode) with only what a
private instance needs on top: where to listen, which server to pool, who may log in, and the pool
mode. `config` adds or overrides pgbouncer.ini lines, as RedisServer's does for redis.conf.

PgBouncer refuses to run as root: as root it runs as the user PostgreSQL runs as. The Debian
`pgbouncer` package is installed when the binary is missing and this process is root.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from streamd.dev.common import DevServerError
from streamd.dev.pg_setup import grant_traverse, postgres_os_user, postgres_ping, run_as
from streamd.dev.servers import _Server

_INSTALL_LOCK = Path("/tmp/streamd-apt-pgbouncer.lock")  # parallel test workers install once


def pgbouncer_binary() -> Path:
    """pgbouncer: $STREAMD_PGBOUNCER, else PATH or /usr/sbin; installed with apt-get when missing
    and running as root (as run.sh's ensure_server_binaries does for redis-server)."""
    override = os.environ.get("STREAMD_PGBOUNCER")
    if override:
        if not os.access(override, os.X_OK):
            raise DevServerError(f"pgbouncer not found at {override} (STREAMD_PGBOUNCER)")
        return Path(override)
    found = _find_pgbouncer()
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        with open(_INSTALL_LOCK, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another worker may be installing it right now
            found = _find_pgbouncer() or _apt_install_pgbouncer()
    if found is None:
        raise DevServerError(
            "pgbouncer not found on PATH or in /usr/sbin (or set STREAMD_PGBOUNCER); "
            "install it with: apt-get install pgbouncer"
        )
    return found


def _find_pgbouncer() -> Path | None:
    found = shutil.which("pgbouncer")
    if found:
        return Path(found)
    default = Path("/usr/sbin/pgbouncer")
    return default if os.access(default, os.X_OK) else None


def _apt_install_pgbouncer() -> Path | None:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "pgbouncer"],
    ):
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if out.returncode != 0:
            tail = " | ".join((out.stdout + out.stderr).strip().splitlines()[-3:])
            raise DevServerError(f"{' '.join(cmd)} failed (exit {out.returncode}): {tail}")
    # The package enables a system-wide pgbouncer on port 6432; the tests never use that one.
    return _find_pgbouncer()


def _ini_value(value: str) -> str:
    if any(c in value for c in "\n\r;"):
        raise DevServerError(f"pgbouncer.ini value {value!r}: no newlines or ';'")
    return value


@dataclass(eq=False)
class PgBouncerServer(_Server):
    """pgbouncer on 127.0.0.1, pooling every database of the PostgreSQL on `backend_port`."""

    backend_port: int = 0
    backend_host: str = "127.0.0.1"
    pool_mode: Literal["session", "transaction"] = "session"
    auth_type: Literal["trust", "md5", "plain"] = "trust"
    # Users who may log in (auth_file), name -> password; trust still needs the names listed.
    users: dict[str, str] = field(default_factory=lambda: {"postgres": ""})
    config: dict[str, str] = field(default_factory=dict)  # extra or overriding [pgbouncer] lines
    binary: Path | None = None

    name: ClassVar[str] = "pgbouncer"
    file_stem: ClassVar[str] = "pgbouncer"
    stop_signal: ClassVar[signal.Signals] = signal.SIGINT  # "safe shutdown": waits for clients

    def dsn(self, database: str = "postgres", user: str = "postgres") -> str:
        return f"postgresql://{user}@127.0.0.1:{self.port}/{database}"

    def _prepare(self) -> None:
        if self.binary is None:
            self.binary = pgbouncer_binary()
        if not self.backend_port:
            raise DevServerError("PgBouncerServer needs backend_port (the PostgreSQL to pool)")
        settings = {
            "listen_addr": "127.0.0.1",
            "listen_port": str(self.port),
            "unix_socket_dir": "",  # TCP only: no socket in a shared directory
            "pidfile": str(self.pid_file),
            "logfile": "",  # stderr, which goes to pgbouncer.log
            "auth_type": self.auth_type,
            "auth_file": str(self.dir / "userlist.txt"),
            "admin_users": "postgres",  # the ping logs in to the admin console
            "pool_mode": self.pool_mode,
            **self.config,
        }
        lines = [
            "[databases]",
            f"* = host={self.backend_host} port={self.backend_port}",
            "[pgbouncer]",
            *(f"{key} = {_ini_value(value)}" for key, value in settings.items()),
        ]
        (self.dir / "pgbouncer.ini").write_text("\n".join(lines) + "\n")
        users = [f'"{_quote(name)}" "{_quote(password)}"' for name, password in self.users.items()]
        (self.dir / "userlist.txt").write_text("\n".join(users) + "\n")
        owner = postgres_os_user()
        if owner is not None:
            grant_traverse(self.dir, owner)
            for path in (self.dir, self.dir / "pgbouncer.ini", self.dir / "userlist.txt"):
                os.chown(path, owner.pw_uid, owner.pw_gid)
            with contextlib.suppress(FileNotFoundError):
                os.chown(self.log_path, owner.pw_uid, owner.pw_gid)

    def _command(self) -> list[str]:
        return [str(self.binary), str(self.dir / "pgbouncer.ini")]

    def _popen_extra(self) -> dict[str, Any]:
        return {"cwd": str(self.dir), **run_as(postgres_os_user())}

    def ping(self) -> bool:
        """The admin console answers: PgBouncer listens, whatever state its server is in."""
        return postgres_ping(self.port, database="pgbouncer")

    def reload(self) -> None:
        """Re-read pgbouncer.ini (after a change to `config`): SIGHUP, as `systemctl reload`."""
        self._prepare()
        pid = self._require_pid("reload")
        os.kill(pid, signal.SIGHUP)


def _quote(text: str) -> str:
    return text.replace('"', '""')
