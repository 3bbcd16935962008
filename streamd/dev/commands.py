"""`streamd dev up|down|status`: project-local servers that outlive the command."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from streamd.dev.binaries import has_pg_stat_statements, postgres_bindir, redis_server_binary
from streamd.dev.common import DEV_POSTGRES_PORT, DEV_REDIS_PORT, DEV_ROOT, DevServerError
from streamd.dev.processes import port_is_free
from streamd.dev.servers import PostgresServer, RedisServer

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

    Both ports are checked before either server starts, and a server this call started is
    stopped again if the other one fails: a failed `up` leaves nothing behind.
    Returns the environment that points streamd at them (STREAMD_REDIS_URL, STREAMD_POSTGRES_DSN).
    """
    root = root.absolute()
    redis, postgres = _dev_servers(root, redis_port, postgres_port)
    redis.binary, postgres.bindir = redis_server_binary(), postgres_bindir()  # both, or neither
    servers = ((redis, "--redis-port"), (postgres, "--postgres-port"))
    to_start = [server for server, _ in servers if not _running(server)]
    for server, flag in servers:
        if server in to_start and not port_is_free(server.port):
            raise DevServerError(
                f"port {server.port} on 127.0.0.1 is already in use by another program, not "
                f"streamd's dev {server.name}; stop it or pick another port: "
                f"{command_hint()} dev up {flag} N"
            )
    started: list[RedisServer | PostgresServer] = []
    try:
        for server in to_start:
            server.start()
            started.append(server)
    except BaseException:
        for server in reversed(started):
            server.stop()
        raise
    _enable_pg_stat_statements(postgres)
    _write_state(root, {"redis_port": redis.port, "postgres_port": postgres.port})
    env = {"STREAMD_REDIS_URL": redis.url, "STREAMD_POSTGRES_DSN": postgres.dsn}
    lines = [f"# streamd dev servers; load with: source {root / 'env'}", *export_lines(env)]
    (root / "env").write_text("\n".join(lines) + "\n")
    return env


def command_hint() -> str:
    """How the user runs streamd, for the commands a hint names: `./run.sh` when run.sh called
    us ($STREAMD_INVOKED_AS), `streamd` when that is on PATH, else the path that was run."""
    invoked = os.environ.get("STREAMD_INVOKED_AS")
    if invoked:
        return invoked
    if shutil.which("streamd"):
        return "streamd"
    argv0 = Path(sys.argv[0])
    if argv0.name == "__main__.py":  # python -m streamd
        return "python -m streamd"
    with contextlib.suppress(ValueError):
        return str(argv0.absolute().relative_to(Path.cwd()))
    return str(argv0)


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


def _running(server: RedisServer | PostgresServer) -> bool:
    """Whether this dev server runs already (and answers: one that does not is an error)."""
    if not server.is_running():
        return False
    if not server.ping():
        raise DevServerError(
            f"dev {server.name} (pid {server.pid}) runs but does not answer on port "
            f"{server.port}; see {server.log_path}, or run `{command_hint()} dev down`"
        )
    return True


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
