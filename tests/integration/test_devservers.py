"""The private servers the tests and `streamd dev` run, and the test harness built on them."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from streamd.config.settings import Settings
from streamd.dev.binaries import has_pg_stat_statements, postgres_bindir
from streamd.dev.commands import dev_down
from streamd.dev.common import DevServerError
from streamd.dev.pg_setup import postgres_ping
from streamd.dev.processes import descendants, free_port, port_is_free
from streamd.dev.servers import PostgresServer, RedisServer
from tests.support.helpers import (
    count_rows,
    counts_by_type,
    event,
    pending_count,
    pg_execute,
    pg_fetchval,
    wait_until,
    xadd,
    xlen,
)

MakeRedis = Callable[..., RedisServer]
MakePostgres = Callable[..., PostgresServer]


def _state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return None


# --- Redis ------------------------------------------------------------------------------------


def test_redis_aof_keeps_every_acknowledged_entry_across_kill(make_redis: MakeRedis) -> None:
    server = make_redis()
    xadd(server.url, [event("user_created", {"user_id": i}) for i in range(500)])
    server.kill()
    assert not server.is_running()
    server.start()
    assert xlen(server.url) == 500


def test_redis_stop_start_restart(make_redis: MakeRedis) -> None:
    server = make_redis()
    pid, port = server.pid, server.port
    with redis.Redis.from_url(server.url) as client:
        client.set("k", "v")
    server.stop()
    assert not server.is_running() and server.pid is None
    assert port_is_free(port)
    server.restart()  # restart of a stopped server is a start
    assert server.pid != pid and server.port == port
    with redis.Redis.from_url(server.url) as client:
        assert client.get("k") == b"v"
        assert client.config_get("databases") == {"databases": "10000"}
        assert client.config_get("bind") == {"bind": "127.0.0.1"}
    server.restart()
    assert server.ping()


def test_redis_pause_hangs_clients_and_resume_releases_them(make_redis: MakeRedis) -> None:
    server = make_redis()
    server.pause()
    with (
        redis.Redis.from_url(server.url, socket_timeout=0.3) as client,
        pytest.raises(redis.TimeoutError),
    ):
        client.ping()
    server.resume()
    with redis.Redis.from_url(server.url, socket_timeout=5) as client:
        assert client.ping()


def test_stopping_a_paused_server_works(make_redis: MakeRedis) -> None:
    server = make_redis()
    server.pause()
    server.stop(timeout_s=10)
    assert not server.is_running()


# --- PostgreSQL -------------------------------------------------------------------------------


def test_postgres_keeps_committed_rows_across_restart_and_kill(make_postgres: MakePostgres) -> None:
    server = make_postgres()
    pg_execute(server.dsn, "CREATE TABLE t AS SELECT generate_series(1, 100) AS n")
    server.restart()
    assert count_rows(server.dsn, "t") == 100
    pg_execute(server.dsn, "INSERT INTO t SELECT generate_series(101, 150)")
    server.kill()  # no shutdown checkpoint: the next start replays the WAL
    server.start()
    assert count_rows(server.dsn, "t") == 150


def test_postgres_kill_leaves_no_process_behind(make_postgres: MakePostgres) -> None:
    server = make_postgres()
    assert server.pid is not None
    tree = [server.pid, *descendants(server.pid)]
    assert len(tree) > 3  # postmaster, checkpointer, walwriter, ...
    server.kill()
    # Gone and reaped: no orphans, and no zombies even under an init that does not reap.
    assert [pid for pid in tree if _state(pid) is not None] == []
    assert not postgres_ping(server.port)


def test_postgres_settings(postgres_server: PostgresServer) -> None:
    dsn = postgres_server.dsn
    assert pg_fetchval(dsn, "SHOW listen_addresses") == "127.0.0.1"
    assert pg_fetchval(dsn, "SHOW max_connections") == "200"
    assert pg_fetchval(dsn, "SELECT current_user") == "postgres"
    preload = pg_fetchval(dsn, "SHOW shared_preload_libraries")
    assert ("pg_stat_statements" in preload) == has_pg_stat_statements(postgres_bindir())


def test_postgres_pause_and_resume(make_postgres: MakePostgres) -> None:
    server = make_postgres()
    server.pause()
    assert not postgres_ping(server.port, timeout_s=0.3)
    server.resume()
    assert postgres_ping(server.port)


# --- binaries and ports -----------------------------------------------------------------------


def test_missing_redis_binary_names_it_and_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STREAMD_REDIS_SERVER", "/nonexistent/redis-server")
    with pytest.raises(DevServerError, match=r"redis-server.*apt-get install redis-server"):
        RedisServer(tmp_path / "r").start()


def test_missing_postgres_binaries_name_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STREAMD_PG_BIN", str(tmp_path))
    with pytest.raises(DevServerError, match=r"initdb and postgres not found in .*apt-get install"):
        PostgresServer(tmp_path / "p").start()


def test_a_taken_port_is_reported(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert not port_is_free(port)
        with pytest.raises(DevServerError, match=f"127.0.0.1:{port} is already in use"):
            RedisServer(tmp_path / "r", port=port).start()


def test_free_port_is_free() -> None:
    assert port_is_free(free_port())


# --- the test fixtures themselves -------------------------------------------------------------


@pytest.fixture
def polluted(monkeypatch: pytest.MonkeyPatch) -> None:
    """A developer's shell with streamd and seed settings exported (set before `env` is built)."""
    monkeypatch.setenv("STREAMD_BATCH_SIZE", "7")
    monkeypatch.setenv("REDIS_HOST", "elsewhere.invalid")
    monkeypatch.setenv("POSTGRES_DB", "production")


def test_env_is_isolated(polluted: None, env: dict[str, str], settings: Settings) -> None:
    assert "REDIS_HOST" not in env and "POSTGRES_DB" not in env
    assert settings.batch_size == Settings().batch_size
    assert settings.redis_url == env["STREAMD_REDIS_URL"]
    assert not settings.redis_url.endswith("/0")  # a database index of its own
    assert settings.log_format == "json" and settings.block_ms == 200
    assert settings.metrics_port == 0
    assert pg_fetchval(settings.postgres_dsn, "SELECT current_database()").startswith("test_")


def test_make_settings_overrides(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(batch_size=3, stream="other")
    assert (settings.batch_size, settings.stream) == (3, "other")


def test_serve_harness_end_to_end(env: dict[str, str], start_serve: Callable[..., Any]) -> None:
    serve = start_serve()
    serve.wait_ready()
    types = ["user_created", "order_placed", "payment_processed", "product_viewed"]
    xadd(env["STREAMD_REDIS_URL"], [event(types[i % 4], {"i": i}) for i in range(200)])
    dsn = env["STREAMD_POSTGRES_DSN"]
    wait_until(lambda: count_rows(dsn) == 200, timeout=30, message="all rows in Postgres")
    assert counts_by_type(dsn) == dict.fromkeys(types, 50)
    assert pending_count(env["STREAMD_REDIS_URL"]) == 0
    assert serve.terminate() == 0
    assert serve.events("worker_started")


# --- streamd dev ------------------------------------------------------------------------------


def _streamd(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("STREAMD_")} | env
    return subprocess.run(
        [sys.executable, "-m", "streamd", *args],
        cwd=cwd,
        env=environ,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )


@pytest.fixture
def dev_dir(server_root: Path) -> Iterator[Path]:
    """A project directory whose dev servers are stopped at the end, whatever happens. Not
    under tmp_path: PostgreSQL (another user under root) could not reach into that."""
    project = Path(tempfile.mkdtemp(prefix="dev-", dir=server_root))
    project.chmod(0o755)
    try:
        yield project
    finally:
        dev_down(project / ".streamd" / "dev")
        shutil.rmtree(project, ignore_errors=True)


def test_dev_up_status_down(dev_dir: Path) -> None:
    ports = ["--redis-port", str(free_port()), "--postgres-port", str(free_port())]
    up = _streamd(dev_dir, "dev", "up", *ports)
    assert up.returncode == 0, up.stderr
    exported = dict(line.removeprefix("export ").split("=", 1) for line in up.stdout.splitlines())
    assert set(exported) == {"STREAMD_REDIS_URL", "STREAMD_POSTGRES_DSN"}
    env_file = dev_dir / ".streamd" / "dev" / "env"
    sourced = subprocess.run(
        ["sh", "-c", f". {env_file} && echo $STREAMD_POSTGRES_DSN"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert sourced.stdout.strip() == exported["STREAMD_POSTGRES_DSN"]

    # The servers outlive the command, and a second `up` finds them.
    dsn, url = exported["STREAMD_POSTGRES_DSN"], exported["STREAMD_REDIS_URL"]
    pg_execute(dsn, "CREATE TABLE kept AS SELECT 1 AS n")
    again = _streamd(dev_dir, "dev", "up")
    assert (again.returncode, again.stdout) == (0, up.stdout)
    status = _streamd(dev_dir, "dev", "status")
    assert status.stdout.count("running (pid") == 2, status.stdout

    down = _streamd(dev_dir, "dev", "down")
    assert down.returncode == 0 and down.stdout.count(": stopped") == 2, down.stdout
    assert "stopped" in _streamd(dev_dir, "dev", "status").stdout
    assert not env_file.exists()
    with (
        redis.Redis.from_url(url, socket_connect_timeout=1) as client,
        pytest.raises(redis.ConnectionError),
    ):
        client.ping()

    # Data stays between down and up.
    assert _streamd(dev_dir, "dev", "up").returncode == 0
    assert count_rows(dsn, "kept") == 1


def test_dev_up_says_when_a_port_is_taken(dev_dir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _streamd(dev_dir, "dev", "up", "--redis-port", str(port))
    assert result.returncode != 0
    assert result.stderr.count("\n") == 1, result.stderr  # one line, no traceback
    assert f"port {port} on 127.0.0.1 is already in use by another program" in result.stderr
    assert "--redis-port" in result.stderr


def test_dev_up_without_binaries_says_what_to_install(dev_dir: Path) -> None:
    result = _streamd(dev_dir, "dev", "up", STREAMD_PG_BIN=str(dev_dir / "nowhere"))
    assert result.returncode != 0
    assert result.stderr.count("\n") == 1, result.stderr
    assert "initdb and postgres not found" in result.stderr
    assert "apt-get install redis-server postgresql" in result.stderr
    assert not (dev_dir / ".streamd" / "dev" / "redis" / "redis.pid").exists()  # nothing started
