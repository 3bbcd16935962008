"""Shared fixtures (loaded by tests/conftest.py): private Redis and PostgreSQL servers that the
test run starts itself.

Per xdist worker (session scope): one Redis and one PostgreSQL, shared by every test, each test
isolated in its own Redis database index and its own PostgreSQL database (`env`). Tests that
stop, kill, pause or restart a server take a private one from `make_redis` / `make_postgres`.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis

from streamd.config.settings import Settings
from streamd.config.sources import field_names, load_settings
from streamd.dev.pg_setup import initdb
from streamd.dev.pgbouncer import PgBouncerServer
from streamd.dev.servers import PostgresServer, RedisServer
from tests.support.helpers import ServeProcess, pg_execute

# Names that would leak the developer's own setup into a test: streamd's, the seed's, systemd's.
_SEED_NAMES = frozenset(
    {"REDIS_HOST", "REDIS_PORT", "REDIS_PASSWORD", "NUM_WORKERS", "BATCH_SIZE"}
    | {"BATCH_TIMEOUT_SECONDS", "XREAD_COUNT", "XREAD_BLOCK_MS", "RUNTIME_DIRECTORY"}
    | {"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID"}
)
_REDIS_DATABASES = 10_000  # RedisServer's `databases`; index 0 stays unused by tests
_ids = itertools.count(1)


def _foreign(name: str) -> bool:
    return name.startswith(("STREAMD_", "POSTGRES_")) or name in _SEED_NAMES


def _scratch_parent() -> str | None:
    """tmpfs when it has room, so server data never waits for a disk (CREATE DATABASE: 10 ms
    instead of 0.3 s on a busy one); a process kill still loses nothing. $TMPDIR, if set, wins."""
    if os.environ.get("TMPDIR"):
        return None
    try:
        shm = os.statvfs("/dev/shm")
    except OSError:
        return None
    roomy = shm.f_bavail * shm.f_frsize >= 2 << 30  # Docker's default 64 MB /dev/shm is not
    return "/dev/shm" if roomy and os.access("/dev/shm", os.W_OK) else None


@pytest.fixture(scope="session")
def server_root() -> Iterator[Path]:
    """This worker's directory for server data. Not pytest's basetemp: that one is 0700, and
    PostgreSQL runs as another user when the tests run as root."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    root = Path(tempfile.mkdtemp(prefix=f"streamd-test-{worker}-", dir=_scratch_parent()))
    root.chmod(0o711)
    (root / "empty.toml").write_text("")
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_template(server_root: Path) -> Path:
    """An initdb'ed data directory, copied by every PostgreSQL instance (initdb takes ~1 s)."""
    return initdb(server_root / "pg-template", sync=False)


@pytest.fixture(scope="session")
def redis_server(server_root: Path) -> Iterator[RedisServer]:
    """The shared Redis. Do not stop or restart it: use make_redis() for that."""
    server = RedisServer(server_root / "redis-shared")
    try:
        yield server.start()
    finally:
        server.kill()


@pytest.fixture(scope="session")
def postgres_server(server_root: Path, pg_template: Path) -> Iterator[PostgresServer]:
    """The shared PostgreSQL (fsync off). Do not stop or restart it: use make_postgres()."""
    server = PostgresServer(server_root / "pg-shared", template=pg_template, fsync=False)
    try:
        yield server.start()
    finally:
        server.kill()


@pytest.fixture
def make_redis(server_root: Path) -> Iterator[Callable[..., RedisServer]]:
    """make_redis(start=True, **RedisServer fields) -> a private Redis (appendfsync always, so a
    restart keeps every acknowledged write), killed and deleted after the test."""
    servers: list[RedisServer] = []

    def make(start: bool = True, **kwargs: Any) -> RedisServer:
        kwargs.setdefault("appendfsync", "always")
        server = RedisServer(server_root / f"redis-{next(_ids)}", **kwargs)
        servers.append(server)
        return server.start() if start else server

    yield make
    _discard(servers)


@pytest.fixture
def make_postgres(server_root: Path, pg_template: Path) -> Iterator[Callable[..., PostgresServer]]:
    """make_postgres(start=True, **PostgresServer fields) -> a private PostgreSQL (from the
    template, fsync off: safe against process kills, not OS crashes), killed after the test."""
    servers: list[PostgresServer] = []

    def make(start: bool = True, **kwargs: Any) -> PostgresServer:
        kwargs.setdefault("template", pg_template)
        kwargs.setdefault("fsync", False)
        server = PostgresServer(server_root / f"pg-{next(_ids)}", **kwargs)
        servers.append(server)
        return server.start() if start else server

    yield make
    _discard(servers)


def _discard(servers: list[RedisServer] | list[PostgresServer]) -> None:
    for server in servers:
        server.kill()  # the data is thrown away: no need for a clean shutdown
        shutil.rmtree(server.dir, ignore_errors=True)


@pytest.fixture
def env(
    redis_server: RedisServer, postgres_server: PostgresServer, server_root: Path, tmp_path: Path
) -> Iterator[dict[str, str]]:
    """The environment of a fully isolated test: this process's environment without any
    STREAMD_*/seed/systemd names, plus a Redis database index and a PostgreSQL database of its
    own (dropped afterwards), JSON logs, BLOCK 200 ms, metrics off, one worker process, an empty
    config file and a private state dir."""
    n = next(_ids)
    db_index = n % (_REDIS_DATABASES - 1) + 1
    database = f"test_{n}"
    # FILE_COPY: ~40 ms with fsync off, several times faster than the default WAL_LOG here.
    pg_execute(postgres_server.dsn, f'CREATE DATABASE "{database}" STRATEGY FILE_COPY')
    environ = {k: v for k, v in os.environ.items() if not _foreign(k)}
    environ |= {
        "STREAMD_REDIS_URL": f"redis://127.0.0.1:{redis_server.port}/{db_index}",
        "STREAMD_POSTGRES_DSN": f"postgresql://postgres@127.0.0.1:{postgres_server.port}/{database}",
        "STREAMD_LOG_FORMAT": "json",
        "STREAMD_BLOCK_MS": "200",
        "STREAMD_METRICS_PORT": "0",
        "STREAMD_PROCS": "1",
        "STREAMD_CONFIG": str(server_root / "empty.toml"),
    }
    if "state_dir" in field_names():
        environ["STREAMD_STATE_DIR"] = str(tmp_path / "state")
    yield environ
    # FORCE: connections a test left open must not keep its database alive.
    pg_execute(postgres_server.dsn, f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
    with redis.Redis.from_url(environ["STREAMD_REDIS_URL"]) as client:
        client.flushdb()


@pytest.fixture
def settings(env: dict[str, str]) -> Settings:
    """Settings resolved from `env`, as `streamd serve` would resolve them."""
    return load_settings(environ=env)[0]


@pytest.fixture
def make_settings(env: dict[str, str]) -> Callable[..., Settings]:
    """make_settings(**overrides) -> Settings from `env` with keys overridden (as --set)."""

    def make(**overrides: Any) -> Settings:
        return load_settings(environ=env, set_values=overrides)[0]

    return make


@pytest.fixture
def start_serve(env: dict[str, str], tmp_path: Path) -> Iterator[Callable[..., ServeProcess]]:
    """start_serve(*args, environ=None, cwd=None) -> the real `streamd serve ARGS` as a
    subprocess (environment `env` unless given); its process group is killed after the test."""
    started: list[ServeProcess] = []

    def start(
        *args: str, environ: Mapping[str, str] | None = None, cwd: Path | None = None
    ) -> ServeProcess:
        proc = ServeProcess(environ or env, *args, log_dir=tmp_path / "logs", cwd=cwd)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.close()


# ---------------------------------------------------------------------------------------------
# PgBouncer in front of PostgreSQL (tests of postgres_pooler)


@pytest.fixture
def make_pgbouncer(server_root: Path) -> Iterator[Callable[..., PgBouncerServer]]:
    """make_pgbouncer(backend, pool_mode="session", start=True, **PgBouncerServer fields) -> a
    private PgBouncer pooling every database of the PostgresServer `backend`, with the Debian
    package's default settings unless `config` overrides some; killed after the test."""
    servers: list[PgBouncerServer] = []

    def make(
        backend: PostgresServer, pool_mode: str = "session", start: bool = True, **kwargs: Any
    ) -> PgBouncerServer:
        server = PgBouncerServer(
            server_root / f"pgbouncer-{next(_ids)}",
            backend_port=backend.port,
            pool_mode=pool_mode,  # type: ignore[arg-type]
            **kwargs,
        )
        servers.append(server)
        return server.start() if start else server

    yield make
    for server in servers:
        server.kill()
        shutil.rmtree(server.dir, ignore_errors=True)


def through_pgbouncer(env: Mapping[str, str], bouncer: PgBouncerServer) -> dict[str, str]:
    """`env` with STREAMD_POSTGRES_DSN pointing at the same database through `bouncer`."""
    database = urlsplit(env["STREAMD_POSTGRES_DSN"]).path.lstrip("/")
    return {**env, "STREAMD_POSTGRES_DSN": bouncer.dsn(database)}


# ---------------------------------------------------------------------------------------------
# Redis ACL users (tests of the permission checks)


@pytest.fixture
def acl_user(
    redis_server: RedisServer, env: dict[str, str]
) -> Iterator[Callable[..., dict[str, str]]]:
    """acl_user(*rules) -> `env` logged in as a new Redis user made with `ACL SETUSER <name> on
    >pw <rules...>` on the shared Redis (users are server-wide: each gets a name of its own,
    deleted after the test). The user's name is in the returned env's STREAMD_REDIS_URL."""
    made: list[str] = []

    def make(*rules: str) -> dict[str, str]:
        name = f"acl{next(_ids)}"
        with redis.Redis(port=redis_server.port) as admin:
            admin.execute_command("ACL", "SETUSER", name, "reset", "on", ">pw", *rules)
        made.append(name)
        url = urlsplit(env["STREAMD_REDIS_URL"])
        return {**env, "STREAMD_REDIS_URL": url._replace(netloc=f"{name}:pw@{url.netloc}").geturl()}

    yield make
    with redis.Redis(port=redis_server.port) as admin:
        for name in made:
            admin.execute_command("ACL", "DELUSER", name)
