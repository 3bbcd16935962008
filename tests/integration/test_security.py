"""Security: TLS to Redis and Postgres with certificates made here, secrets that never show,
metrics on loopback, names that cannot inject, a least-privilege role (conf/least-privilege.sql).

The TLS servers keep a plain port for the test's own helpers (and the servers' readiness pings);
streamd is pointed at the TLS port, which speaks nothing but TLS.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import asyncpg
import psutil
import pytest

from streamd.dev.binaries import postgres_bindir
from streamd.dev.pg_setup import postgres_os_user
from streamd.dev.processes import free_port
from streamd.dev.servers import PostgresServer, RedisServer
from tests.support.helpers import (
    ServeProcess,
    count_rows,
    event,
    pending_count,
    pg_execute,
    pg_fetch,
    pg_fetchval,
    wait_until,
    xadd,
)
from tests.support.streamd_cli import explain, run_streamd
from tests.support.tls import OPENSSL, Pki, make_pki

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).resolve().parents[2]
LEAST_PRIVILEGE_SQL = ROOT / "conf" / "least-privilege.sql"
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="openssl not installed")


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("streamd: error:")]


def assert_one_line_exit(result: subprocess.CompletedProcess[str], code: int, *texts: str) -> str:
    """The command failed with `code` and exactly one `streamd: error:` line holding `texts`."""
    assert result.returncode == code, explain(result)
    assert "Traceback" not in result.stderr, explain(result)
    lines = error_lines(result.stderr)
    assert len(lines) == 1, explain(result)
    for text in texts:
        assert text in lines[0], explain(result)
    return lines[0]


def owned_by_postgres(path: Path) -> Path:
    """Postgres refuses a key file that is not its own and 0600 (it runs as another user when the
    tests run as root)."""
    owner = postgres_os_user()
    path.chmod(0o600)
    if owner is not None:
        os.chown(path, owner.pw_uid, owner.pw_gid)
    return path


def start_postgres(
    make_postgres: Callable[..., PostgresServer],
    hba: list[str],
    settings: dict[str, str] | None = None,
    files: dict[str, Path] | None = None,
) -> PostgresServer:
    """A private Postgres with its own pg_hba.conf; `files` maps a setting (ssl_key_file) to a file
    that is copied into the server's dir, made the server's own, and set."""
    server = make_postgres(start=False)
    server.dir.mkdir(parents=True, exist_ok=True)
    server.dir.chmod(0o711)
    options = dict(settings or {})
    for name, source in (files or {}).items():
        target = server.dir / name
        shutil.copyfile(source, target)
        options[name] = str(owned_by_postgres(target))
    hba_file = server.dir / "pg_hba.conf"
    hba_file.write_text("\n".join(["local all all trust", *hba]) + "\n")
    options["hba_file"] = str(owned_by_postgres(hba_file))
    server.settings = options
    return server.start()


# ---------------------------------------------------------------------------------------------
# TLS


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    if OPENSSL is None:
        pytest.skip("openssl not installed")
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def tls_redis(make_redis: Callable[..., RedisServer], pki: Pki) -> tuple[RedisServer, int]:
    """Redis with a TLS port that requires client certificates signed by the test CA."""
    tls_port = free_port()
    server = make_redis(
        config={
            "tls-port": str(tls_port),
            "tls-cert-file": str(pki.server_cert),
            "tls-key-file": str(pki.server_key),
            "tls-ca-cert-file": str(pki.ca),
            "tls-auth-clients": "yes",
        }
    )
    return server, tls_port


@pytest.fixture
def tls_postgres(make_postgres: Callable[..., PostgresServer], pki: Pki) -> PostgresServer:
    """Postgres with ssl=on; role `streamd` may only connect over TLS with a client certificate
    (auth method `cert`: the certificate's CN is the role)."""
    server = start_postgres(
        make_postgres,
        hba=[
            "hostnossl all postgres 127.0.0.1/32 trust",
            "hostssl all postgres 127.0.0.1/32 trust",
            f"hostssl all {pki.client_cn} 127.0.0.1/32 cert",
        ],
        settings={"ssl": "on"},
        files={
            "ssl_cert_file": pki.server_cert,
            "ssl_key_file": pki.server_key,
            "ssl_ca_file": pki.ca,  # client certificates must chain to it
        },
    )
    pg_execute(server.dsn, f"CREATE ROLE {pki.client_cn} LOGIN")
    pg_execute(server.dsn, f"CREATE DATABASE tls OWNER {pki.client_cn}")
    return server


def tls_env(
    env: dict[str, str],
    pki: Pki,
    redis_tls_port: int,
    postgres: PostgresServer,
    *,
    redis_ca: Path | None = None,
    postgres_ca: Path | None = None,
) -> dict[str, str]:
    dsn = (
        f"postgresql://{pki.client_cn}@127.0.0.1:{postgres.port}/tls?sslmode=verify-full"
        f"&sslrootcert={postgres_ca or pki.ca}&sslcert={pki.client_cert}&sslkey={pki.client_key}"
    )
    return {
        **env,
        "STREAMD_REDIS_URL": f"rediss://127.0.0.1:{redis_tls_port}/0",
        "STREAMD_REDIS_CA_FILE": str(redis_ca or pki.ca),
        "STREAMD_REDIS_CERT_FILE": str(pki.client_cert),
        "STREAMD_REDIS_KEY_FILE": str(pki.client_key),
        "STREAMD_POSTGRES_DSN": dsn,
    }


@needs_openssl
def test_serve_over_tls_to_redis_and_postgres_with_client_certificates(
    env: dict[str, str],
    pki: Pki,
    tls_redis: tuple[RedisServer, int],
    tls_postgres: PostgresServer,
    start_serve: Callable[..., ServeProcess],
) -> None:
    redis, tls_port = tls_redis
    environ = tls_env(env, pki, tls_port, tls_postgres)
    serve = start_serve(environ=environ)
    serve.wait_ready()
    ids = xadd(redis.url, [event("user_created", {"i": i}) for i in range(50)])
    db = tls_postgres.dsn.rsplit("/", 1)[0] + "/tls"
    wait_until(lambda: count_rows(db, missing_ok=True) == len(ids), timeout=30)
    # Every streamd session in Postgres is encrypted, as the client certificate's role.
    sessions = pg_fetch(
        db,
        "SELECT s.ssl, a.usename FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) "
        "WHERE a.application_name = 'streamd'",
    )
    assert sessions and all(r["ssl"] and r["usename"] == pki.client_cn for r in sessions)
    assert pending_count(redis.url) == 0
    assert serve.terminate() == 0


@needs_openssl
@pytest.mark.parametrize("service", ["redis", "postgres"])
def test_a_wrong_ca_stops_serve_at_start_with_exit_78(
    service: str,
    env: dict[str, str],
    pki: Pki,
    tls_redis: tuple[RedisServer, int],
    tls_postgres: PostgresServer,
) -> None:
    wrong = {"redis_ca": pki.other_ca} if service == "redis" else {"postgres_ca": pki.other_ca}
    environ = tls_env(env, pki, tls_redis[1], tls_postgres, **wrong)  # type: ignore[arg-type]
    result = run_streamd(environ, "serve")
    target = "Redis at rediss://" if service == "redis" else "Postgres at postgresql://"
    assert_one_line_exit(result, 78, target, "certificate verify failed")


@needs_openssl
def test_redis_tls_without_a_client_certificate_is_refused_exit_78(
    env: dict[str, str], pki: Pki, tls_redis: tuple[RedisServer, int]
) -> None:
    environ = {
        **env,
        "STREAMD_REDIS_URL": f"rediss://127.0.0.1:{tls_redis[1]}/0",
        "STREAMD_REDIS_CA_FILE": str(pki.ca),
    }
    result = run_streamd(environ, "serve")
    assert_one_line_exit(result, 78, "Redis at rediss://")


@needs_openssl
def test_postgres_role_that_must_use_tls_cannot_connect_in_clear(
    env: dict[str, str], pki: Pki, tls_postgres: PostgresServer
) -> None:
    dsn = f"postgresql://{pki.client_cn}@127.0.0.1:{tls_postgres.port}/tls?sslmode=disable"
    result = run_streamd({**env, "STREAMD_POSTGRES_DSN": dsn}, "db", "init")
    assert_one_line_exit(result, 78, "no pg_hba.conf entry", "no encryption")


@needs_openssl
def test_tls_files_without_rediss_are_a_config_error(env: dict[str, str], pki: Pki) -> None:
    """A CA file with a redis:// URL would silently talk in clear: refuse it."""
    result = run_streamd({**env, "STREAMD_REDIS_CA_FILE": str(pki.ca)}, "config")
    assert_one_line_exit(result, 2, "redis_ca_file", "rediss://")


# ---------------------------------------------------------------------------------------------
# secrets


def serve_processes(serve: ServeProcess) -> list[psutil.Process]:
    root = psutil.Process(serve.pid)
    return [root, *root.children(recursive=True)]


def process_texts(serve: ServeProcess) -> list[str]:
    """What `ps`, `top` and /proc show of every serve process: command lines and titles."""
    out: list[str] = []
    for proc in serve_processes(serve):
        pid = proc.pid
        for name in ("cmdline", "comm", "status"):
            out.append(Path(f"/proc/{pid}/{name}").read_bytes().replace(b"\0", b" ").decode())
    return out


def http_get(port: int, path: str) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as reply:
            return str(reply.read().decode())
    except urllib.error.HTTPError as exc:  # /readyz may be 503 at a bad moment: its body counts
        return str(exc.read().decode())


def state_files(state_dir: Path) -> bytes:
    """Every file serve keeps in its state dir (status files, metrics mmaps), concatenated."""
    return b"".join(p.read_bytes() for p in sorted(state_dir.rglob("*")) if p.is_file())


@pytest.fixture
def password_redis(make_redis: Callable[..., RedisServer]) -> Callable[[str], RedisServer]:
    """A Redis where user `streamd` needs a password (the default user stays open for the test's
    own helpers and the server's readiness ping)."""

    def make(password: str) -> RedisServer:
        return make_redis(config={"user": f"streamd on >{password} ~* &* +@all"})

    return make


@pytest.fixture
def password_postgres(make_postgres: Callable[..., PostgresServer]) -> Callable[[str], str]:
    """A Postgres where role `writer` logs in with a SCRAM password; returns the DSN (no password
    in it) of a database it owns."""

    def make(password: str) -> str:
        server = start_postgres(
            make_postgres,
            hba=[
                "host all writer 127.0.0.1/32 scram-sha-256",
                "host all all 127.0.0.1/32 trust",
            ],
        )
        pg_execute(server.dsn, f"CREATE ROLE writer LOGIN PASSWORD '{password}'")
        pg_execute(server.dsn, "CREATE DATABASE app OWNER writer")
        return f"postgresql://writer@127.0.0.1:{server.port}/app"

    return make


def test_passwords_never_show_in_logs_config_metrics_or_process_titles(
    env: dict[str, str],
    tmp_path: Path,
    password_redis: Callable[[str], RedisServer],
    password_postgres: Callable[[str], str],
    start_serve: Callable[..., ServeProcess],
) -> None:
    redis_pw, postgres_pw = "RedisPw-7f3a9c-secret", "PgPw-2b8e41-secret"
    redis = password_redis(redis_pw)
    dsn = password_postgres(postgres_pw)
    pw_file = tmp_path / "pg-password"
    pw_file.write_text(postgres_pw + "\n")
    port = free_port()
    environ = {
        **env,
        "STREAMD_REDIS_URL": f"redis://streamd@127.0.0.1:{redis.port}/0",
        "STREAMD_REDIS_PASSWORD": redis_pw,  # from the environment
        "STREAMD_POSTGRES_DSN": dsn,
        "STREAMD_POSTGRES_PASSWORD_FILE": str(pw_file),  # from a file
        "STREAMD_METRICS_PORT": str(port),
        "STREAMD_LOG_LEVEL": "debug",
        "STREAMD_RETRY_MAX_S": "0.3",
    }
    serve = start_serve(environ=environ)
    serve.wait_ready()
    xadd(redis.url, [event("t", {"i": 1}), {"type": "t", "data": "{broken"}])
    wait_until(lambda: len(pg_fetch(dsn.replace("writer@", "postgres@"), "SELECT 1 FROM events")))
    redis.restart()  # reconnects and retries: error lines that name the connection
    wait_until(lambda: serve.events("read_retrying"), timeout=30)
    xadd(redis.url, [event("t", {"i": 2})])
    seen = [http_get(port, path) for path in ("/metrics", "/healthz", "/readyz")]
    seen += process_texts(serve)
    for args in (["config"], ["config", "--json"]):
        result = run_streamd(environ, *args)
        assert result.returncode == 0, explain(result)
        seen += [result.stdout, result.stderr]
    assert serve.terminate() == 0
    seen += [serve.output(), serve.stdout()]
    everything = "\n".join(seen)
    assert "streamd_events_ingested" in everything and "batch_flushed" in everything
    for secret in (redis_pw, postgres_pw):
        assert secret not in everything
        assert secret.encode() not in state_files(Path(environ["STREAMD_STATE_DIR"]))


@pytest.mark.parametrize("service", ["redis", "postgres"])
def test_a_wrong_password_is_exit_78_and_is_not_echoed(
    service: str,
    env: dict[str, str],
    password_redis: Callable[[str], RedisServer],
    password_postgres: Callable[[str], str],
) -> None:
    wrong = "Wrong-Pw-5d1c0e"
    if service == "redis":
        redis = password_redis("right-password")
        environ = {
            **env,
            "STREAMD_REDIS_URL": f"redis://streamd:{wrong}@127.0.0.1:{redis.port}/0",
        }
        expected = ["Redis at redis://streamd:***@", "invalid username-password pair"]
    else:
        environ = {
            **env,
            "STREAMD_POSTGRES_DSN": password_postgres("right-password"),
            "STREAMD_POSTGRES_PASSWORD": wrong,
        }
        expected = ["Postgres at", "password authentication failed"]
    result = run_streamd(environ, "serve")
    assert_one_line_exit(result, 78, *expected)
    assert wrong not in result.stderr + result.stdout


# ---------------------------------------------------------------------------------------------
# metrics on loopback


def test_metrics_listen_on_loopback_only_by_default(
    env: dict[str, str], start_serve: Callable[..., ServeProcess]
) -> None:
    port = free_port()
    serve = start_serve(environ={**env, "STREAMD_METRICS_PORT": str(port)})
    serve.wait_ready()
    wait_until(lambda: "streamd_workers" in http_get(port, "/metrics"), timeout=20)
    listening = [
        conn.laddr
        for proc in serve_processes(serve)
        for conn in proc.net_connections(kind="inet")
        if conn.status == psutil.CONN_LISTEN
    ]
    assert [(a.ip, a.port) for a in listening] == [("127.0.0.1", port)]
    assert serve.terminate() == 0


# ---------------------------------------------------------------------------------------------
# identifiers


def test_sql_keywords_as_table_names_work_because_they_are_quoted(
    env: dict[str, str], start_serve: Callable[..., ServeProcess]
) -> None:
    """`select` and `order` pass validation (plain identifiers); every statement quotes them, on
    the COPY path, the replay (staging table) path and the dead-letter path."""
    environ = {**env, "STREAMD_EVENTS_TABLE": "select", "STREAMD_DLQ_TABLE": "order"}
    environ["STREAMD_LOG_LEVEL"] = "debug"  # batch_flushed, whose duplicates are counted below
    assert run_streamd(environ, "db", "init").returncode == 0
    url, dsn = env["STREAMD_REDIS_URL"], env["STREAMD_POSTGRES_DSN"]
    ids = xadd(url, [event("t", {"i": i}) for i in range(5)] + [{"type": "t", "data": "{"}])
    # One entry is already in the table, as after a crash between COMMIT and XACK.
    pg_execute(
        dsn,
        """INSERT INTO "select" (stream, entry_id, entry_ms, entry_seq, event_type, payload,
           produced_at) VALUES ('events', $1, split_part($1, '-', 1)::bigint,
           split_part($1, '-', 2)::bigint, 't', '{"i": 0}', now())""",
        ids[0],
    )
    serve = start_serve(environ=environ)
    serve.wait_ready()
    wait_until(lambda: count_rows(dsn, "order") == 1, timeout=20)
    wait_until(lambda: count_rows(dsn, "select") == 5, timeout=20)
    assert sum(e["duplicates"] for e in serve.events("batch_flushed")) == 1
    assert pending_count(url) == 0
    assert serve.terminate() == 0


# ---------------------------------------------------------------------------------------------
# least privilege


def psql_binary() -> str | None:
    with contextlib.suppress(Exception):
        candidate = postgres_bindir() / "psql"
        if candidate.is_file():
            return str(candidate)
    return shutil.which("psql")


def apply_least_privilege(dsn: str, **variables: str) -> None:
    psql = psql_binary()
    if psql is None:
        pytest.skip("psql not installed")
    args = [psql, dsn, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-f", str(LEAST_PRIVILEGE_SQL)]
    for name, value in variables.items():
        args += ["-v", f"{name}={value}"]
    out = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "ERROR" not in out.stderr, out.stderr


@pytest.fixture
def least_privilege(env: dict[str, str]) -> dict[str, str]:
    """conf/least-privilege.sql applied to this test's database (roles named for the test, as
    roles are global to the server); returns the DSNs of the owner and the ingest role."""
    superuser_dsn = env["STREAMD_POSTGRES_DSN"]
    suffix = superuser_dsn.rsplit("/", 1)[1]
    roles = {"owner_role": f"owner_{suffix}", "ingest_role": f"ingest_{suffix}"}
    apply_least_privilege(superuser_dsn, **roles)
    apply_least_privilege(superuser_dsn, **roles)  # a second run changes nothing, fails nothing
    return {
        "superuser": superuser_dsn,
        "owner": superuser_dsn.replace("postgres@", f"{roles['owner_role']}@"),
        "ingest": superuser_dsn.replace("postgres@", f"{roles['ingest_role']}@"),
        "ingest_role": roles["ingest_role"],
    }


def test_serve_as_the_least_privilege_role_with_a_replay_and_dead_letters(
    env: dict[str, str],
    least_privilege: dict[str, str],
    start_serve: Callable[..., ServeProcess],
) -> None:
    owner, ingest = least_privilege["owner"], least_privilege["ingest"]
    init = run_streamd({**env, "STREAMD_POSTGRES_DSN": owner}, "db", "init")
    assert init.returncode == 0, explain(init)
    # The ingest role cannot create or change the schema: db init says so, once, exit 78.
    refused = run_streamd({**env, "STREAMD_POSTGRES_DSN": ingest}, "db", "init")
    assert_one_line_exit(refused, 78, "permission denied for schema", "streamd db init")
    url = env["STREAMD_REDIS_URL"]
    ids = xadd(url, [event("t", {"i": i}) for i in range(20)] + [{"type": "t", "data": "nope"}])
    pg_execute(  # committed before a crash, never acknowledged: the batch replays (TEMP table)
        owner,
        "INSERT INTO events (stream, entry_id, entry_ms, entry_seq, event_type, payload,"
        " produced_at) VALUES ('events', $1, split_part($1, '-', 1)::bigint,"
        " split_part($1, '-', 2)::bigint, 't', '{\"i\": 0}', now())",
        ids[0],
    )
    # debug: batch_flushed, whose duplicates are counted below
    serve = start_serve(
        environ={**env, "STREAMD_POSTGRES_DSN": ingest, "STREAMD_LOG_LEVEL": "debug"}
    )
    serve.wait_ready()
    su = least_privilege["superuser"]
    wait_until(lambda: pg_fetchval(su, "SELECT count(*) FROM streamd.events") == 20, timeout=20)
    wait_until(
        lambda: pg_fetchval(su, "SELECT count(*) FROM streamd.dead_letter_queue") == 1, timeout=20
    )
    assert sum(e["duplicates"] for e in serve.events("batch_flushed")) == 1
    wait_until(lambda: pending_count(url) == 0, timeout=20)
    assert serve.terminate() == 0
    # ... and nothing beyond what it needs.
    for statement in (
        "DELETE FROM events",
        "UPDATE dead_letter_queue SET reason = 'x'",
        "TRUNCATE events",
        "CREATE TABLE streamd.other (i int)",
        "DROP TABLE events",
    ):
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            pg_execute(ingest, statement)


def test_a_missing_privilege_stops_serve_at_start_with_exit_78(
    env: dict[str, str], least_privilege: dict[str, str]
) -> None:
    owner, ingest = least_privilege["owner"], least_privilege["ingest"]
    assert run_streamd({**env, "STREAMD_POSTGRES_DSN": owner}, "db", "init").returncode == 0
    database = owner.rsplit("/", 1)[1]
    role = least_privilege["ingest_role"]
    pg_execute(
        least_privilege["superuser"],
        f'REVOKE TEMPORARY ON DATABASE "{database}" FROM PUBLIC, "{role}"',
    )
    pg_execute(owner, f'REVOKE INSERT ON dead_letter_queue FROM "{role}"')
    result = run_streamd({**env, "STREAMD_POSTGRES_DSN": ingest}, "serve")
    assert_one_line_exit(
        result,
        78,
        f"role {role} lacks what streamd needs",
        "INSERT on table dead_letter_queue",
        f"TEMPORARY on database {database}",
        "conf/least-privilege.sql",
    )
