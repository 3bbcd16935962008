"""The ingest path end to end: the real `streamd serve`, real Redis and Postgres, stock producers.

Each test asserts what a user checks: one row per good entry (no loss, no duplicate), one
dead-letter row per bad entry with its reason, nothing left pending.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable
from urllib.parse import urlsplit

import orjson
import pytest

from streamd.dev.processes import free_port
from streamd.dev.servers import PostgresServer, RedisServer
from tests.support.helpers import (
    ServeProcess,
    count_rows,
    event,
    pending_count,
    pg_fetch,
    pg_fetchval,
    redis_client,
    wait_until,
    xadd,
)
from tests.support.load import producing
from tests.support.streamd_cli import run_streamd

REDIS_CLI = shutil.which("redis-cli")


def resp(*args: bytes) -> bytes:
    """One command in the Redis protocol, as `redis-cli --pipe` reads it."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        out.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(out)


def assert_exactly_once(dsn: str, expected_ids: set[str]) -> None:
    rows = pg_fetch(dsn, "SELECT entry_id FROM events")
    got = [r["entry_id"] for r in rows]
    assert len(got) == len(set(got)), "duplicated rows"
    missing = expected_ids - set(got)
    extra = set(got) - expected_ids
    assert not missing, f"{len(missing)} events lost, e.g. {sorted(missing)[:5]}"
    assert not extra, f"{len(extra)} unexpected rows, e.g. {sorted(extra)[:5]}"


@pytest.mark.skipif(REDIS_CLI is None, reason="redis-cli not installed")
def test_stock_redis_cli_load_with_malformed_entries(
    env: dict[str, str], start_serve: Callable[..., ServeProcess]
) -> None:
    """Tens of thousands of entries piped by redis-cli, with every kind of bad entry mixed in:
    exactly one row per good entry, one dead letter per bad one, zero pending."""
    serve = start_serve("--tasks", "4")
    serve.wait_ready()
    bad_kinds: list[tuple[list[bytes], str]] = [
        ([b"data", b"{}"], "missing_type"),
        ([b"type", b"", b"data", b"{}"], "empty_type"),
        ([b"type", b"t" * 129, b"data", b"{}"], "type_too_long"),
        ([b"type", b"t"], "missing_data"),
        ([b"type", b"t", b"data", b"{oops"], "invalid_json"),
        ([b"type", b"t", b"data", b'{"a": "\\u0000"}'], "invalid_json"),
        ([b"type", b"t", b"data", b"\xc3\x28"], "invalid_encoding"),
        ([b"type", b"t", b"data", b"{}", b"ts", b"yesterday"], "invalid_ts"),
    ]
    commands: list[bytes] = []
    expected_reasons: dict[int, str] = {}
    total = 30_000
    for i in range(total):
        if i % 997 == 13:
            fields, reason = bad_kinds[len(expected_reasons) % len(bad_kinds)]
            expected_reasons[i] = reason
        else:
            payload = b'{"user_id": %d, "email": "user%d@example.com", "n": [1, 2, 3]}' % (i, i)
            fields = [b"type", b"user_created", b"data", payload, b"seq", b"%d" % i]
        commands.append(resp(b"XADD", b"events", b"*", *fields))
    url = urlsplit(env["STREAMD_REDIS_URL"])
    piped = subprocess.run(
        [REDIS_CLI, "-h", "127.0.0.1", "-p", str(url.port), "-n", url.path.strip("/"), "--pipe"],
        input=b"".join(commands),
        capture_output=True,
        timeout=60,
        check=True,
    )
    assert b"errors: 0" in piped.stdout
    good = total - len(expected_reasons)
    dsn = env["STREAMD_POSTGRES_DSN"]
    wait_until(
        lambda: count_rows(dsn) + count_rows(dsn, "dead_letter_queue") == total,
        timeout=90,
        message="all entries ingested or dead-lettered",
    )
    assert count_rows(dsn) == pg_fetchval(dsn, "SELECT count(DISTINCT entry_id) FROM events")
    assert count_rows(dsn) == good
    reasons = pg_fetch(dsn, "SELECT reason, count(*) AS n FROM dead_letter_queue GROUP BY 1")
    expected: dict[str, int] = {}
    for reason in expected_reasons.values():
        expected[reason] = expected.get(reason, 0) + 1
    assert {r["reason"]: r["n"] for r in reasons} == expected
    with redis_client(env["STREAMD_REDIS_URL"]) as r:
        assert r.xlen("events:dead") == len(expected_reasons)
    wait_until(lambda: pending_count(env["STREAMD_REDIS_URL"]) == 0, timeout=20)
    # The columns of a good row, as a consumer of the table sees them.
    row = pg_fetch(dsn, "SELECT * FROM events WHERE payload->>'user_id' = '0'")[0]
    assert (row["stream"], row["event_type"]) == ("events", "user_created")
    assert orjson.loads(row["payload"]) == {
        "user_id": 0,
        "email": "user0@example.com",
        "n": [1, 2, 3],
    }
    ms = int(row["entry_id"].split("-")[0])
    assert round(row["produced_at"].timestamp() * 1000) == ms
    assert row["ingested_at"] >= row["produced_at"]
    assert serve.terminate() == 0


def test_every_consumer_dead_lettering_at_once_needs_no_retry(
    env: dict[str, str], start_serve: Callable[..., ServeProcess]
) -> None:
    """Bad entries in every batch: all consumers write dead letters at the same moment, and the
    connections they need must be there (no 'Too many connections', no retry warnings)."""
    total = 40_000
    xadd(
        env["STREAMD_REDIS_URL"],
        (event("t", {"i": i}) if i % 50 else {"type": "t", "data": "{oops"} for i in range(total)),
    )
    serve = start_serve("--procs", "1", "--tasks", "8")
    dsn = env["STREAMD_POSTGRES_DSN"]
    wait_until(
        lambda: (
            count_rows(dsn, missing_ok=True) + count_rows(dsn, "dead_letter_queue", missing_ok=True)
            == total
        ),
        timeout=90,
        message="all entries ingested or dead-lettered",
    )
    assert count_rows(dsn, "dead_letter_queue") == total // 50
    assert serve.terminate() == 0
    warnings = [r for r in serve.logs() if r.get("level") in ("warning", "error")]
    # The dead letters' own warnings are expected, and on a busy machine a batch_slow line (but
    # without a retry); nothing else may warn.
    expected = ("dead_letter", "dead_letters_suppressed", "batch_slow")
    assert [r for r in warnings if r["event"] not in expected] == []
    assert all(r["retries"] == 0 for r in warnings if r["event"] == "batch_slow")


def test_a_lone_event_is_flushed_when_the_stream_drains(
    env: dict[str, str], start_serve: Callable[..., ServeProcess]
) -> None:
    """With a 60 s batch timeout, a single event still lands at once: the batch is flushed as
    soon as a read comes back short."""
    serve = start_serve("--batch-size", "5000", environ={**env, "STREAMD_BATCH_TIMEOUT_S": "60"})
    serve.wait_ready()
    (entry_id,) = xadd(env["STREAMD_REDIS_URL"], [event("user_created", {"user_id": 7})])
    dsn = env["STREAMD_POSTGRES_DSN"]
    wait_until(lambda: count_rows(dsn) == 1, timeout=15)
    assert pg_fetchval(dsn, "SELECT entry_id FROM events") == entry_id
    assert serve.terminate() == 0


def test_sigterm_flushes_what_it_holds_and_exits_0(
    env: dict[str, str], start_serve: Callable[..., ServeProcess]
) -> None:
    ids = set(xadd(env["STREAMD_REDIS_URL"], [event("t", {"i": i}) for i in range(20_000)]))
    serve = start_serve()
    serve.wait_ready()
    wait_until(lambda: count_rows(env["STREAMD_POSTGRES_DSN"], missing_ok=True) > 0, timeout=30)
    assert serve.terminate(timeout=30) == 0
    assert pending_count(env["STREAMD_REDIS_URL"]) == 0
    committed = count_rows(env["STREAMD_POSTGRES_DSN"])
    assert 0 < committed <= len(ids)
    # What was not read yet is still in the stream, undelivered: a new serve takes it all.
    serve = start_serve()
    serve.wait_ready()
    wait_until(lambda: count_rows(env["STREAMD_POSTGRES_DSN"]) == len(ids), timeout=60)
    assert_exactly_once(env["STREAMD_POSTGRES_DSN"], ids)
    assert serve.terminate() == 0


def private_env(
    env: dict[str, str], redis: RedisServer | None = None, postgres: PostgresServer | None = None
) -> dict[str, str]:
    out = dict(env)
    if redis is not None:
        out["STREAMD_REDIS_URL"] = redis.url
    if postgres is not None:
        out["STREAMD_POSTGRES_DSN"] = postgres.dsn
    return out


def test_postgres_stopped_and_restarted_mid_run_loses_nothing(
    env: dict[str, str],
    start_serve: Callable[..., ServeProcess],
    make_postgres: Callable[..., PostgresServer],
) -> None:
    postgres = make_postgres()
    environ = private_env(env, postgres=postgres)
    environ["STREAMD_RETRY_MAX_S"] = "0.5"
    serve = start_serve(environ=environ)
    serve.wait_ready()
    with producing(environ["STREAMD_REDIS_URL"], rate=2000, batch=20) as producer:
        wait_until(lambda: count_rows(postgres.dsn) > 200, timeout=30)
        postgres.stop()
        wait_until(lambda: serve.events("write_retrying"), timeout=30, message=serve.tail(40))
        time.sleep(1.0)  # keep producing into the outage
        postgres.start()
        wait_until(lambda: serve.events("write_recovered"), timeout=30)
        time.sleep(0.5)
    wait_until(lambda: count_rows(postgres.dsn) >= len(producer.ids), timeout=60)
    assert_exactly_once(postgres.dsn, set(producer.ids))
    assert count_rows(postgres.dsn, "dead_letter_queue") == 0
    wait_until(lambda: pending_count(environ["STREAMD_REDIS_URL"]) == 0, timeout=20)
    assert serve.terminate() == 0


def test_redis_restarted_mid_run_loses_nothing(
    env: dict[str, str],
    start_serve: Callable[..., ServeProcess],
    make_redis: Callable[..., RedisServer],
) -> None:
    redis = make_redis()  # AOF with appendfsync always: a restart keeps every acknowledged XADD
    environ = private_env(env, redis=redis)
    environ["STREAMD_RETRY_MAX_S"] = "0.5"
    dsn = environ["STREAMD_POSTGRES_DSN"]
    serve = start_serve(environ=environ)
    serve.wait_ready()
    with producing(redis.url, rate=2000, batch=20) as producer:
        wait_until(lambda: count_rows(dsn, missing_ok=True) > 200, timeout=30)
        redis.restart()
        produced_before_restart = len(producer.ids)
        # Ingest goes on past the restart, then the producer stops.
        wait_until(lambda: count_rows(dsn) > produced_before_restart + 200, timeout=30)
    wait_until(lambda: count_rows(dsn) >= len(producer.ids), timeout=60)
    assert_exactly_once(dsn, set(producer.ids))
    assert count_rows(dsn, "dead_letter_queue") == 0
    wait_until(lambda: pending_count(redis.url) == 0, timeout=20)
    assert serve.terminate() == 0


def test_unreachable_services_at_start_give_one_line_and_exit_69(env: dict[str, str]) -> None:
    closed = free_port()
    for key, value, target in [
        ("STREAMD_POSTGRES_DSN", f"postgresql://postgres@127.0.0.1:{closed}/x", "Postgres at"),
        ("STREAMD_REDIS_URL", f"redis://127.0.0.1:{closed}/0", "Redis at"),
    ]:
        result = run_streamd({**env, key: value}, "serve", timeout=60)
        assert result.returncode == 69, result.stderr
        errors = [line for line in result.stderr.splitlines() if "streamd: error:" in line]
        assert len(errors) == 1, result.stderr
        assert target in errors[0] and str(closed) in errors[0]
        assert "Traceback" not in result.stderr


def test_a_missing_database_is_a_boot_error_exit_78(env: dict[str, str]) -> None:
    dsn = env["STREAMD_POSTGRES_DSN"].rsplit("/", 1)[0] + "/no_such_database"
    result = run_streamd({**env, "STREAMD_POSTGRES_DSN": dsn}, "db", "init")
    assert result.returncode == 78, result.stderr
    assert 'database "no_such_database" does not exist' in result.stderr
    assert "Traceback" not in result.stderr


def test_db_init_is_idempotent(env: dict[str, str]) -> None:
    for _ in range(2):
        result = run_streamd(env, "db", "init")
        assert result.returncode == 0, result.stderr
        assert "schema ready" in result.stdout
    tables = pg_fetch(
        env["STREAMD_POSTGRES_DSN"],
        "SELECT relname FROM pg_class WHERE relnamespace = 'public'::regnamespace"
        " AND relkind IN ('r', 'p') AND NOT relispartition ORDER BY 1",
    )
    assert [t["relname"] for t in tables] == ["dead_letter_queue", "events"]
    # The default partition_interval ("day"): today's partition and the next two, made once.
    parts = pg_fetchval(
        env["STREAMD_POSTGRES_DSN"],
        "SELECT count(*) FROM pg_inherits WHERE inhparent = 'events'::regclass",
    )
    assert parts == 3


def test_configured_names_are_used_and_quoted(
    env: dict[str, str], start_serve: Callable[..., ServeProcess]
) -> None:
    environ = {
        **env,
        "STREAMD_STREAM": "orders:{0}",
        "STREAMD_GROUP": "ingest",
        "STREAMD_EVENTS_TABLE": "Order_Events",
        "STREAMD_DLQ_TABLE": "order_dlq",
    }
    serve = start_serve(environ=environ)
    serve.wait_ready()
    ids = xadd(
        env["STREAMD_REDIS_URL"], [event("t", {}), {"type": "t", "data": "{"}], stream="orders:{0}"
    )
    dsn = env["STREAMD_POSTGRES_DSN"]
    wait_until(lambda: count_rows(dsn, "Order_Events", missing_ok=True) == 1, timeout=15)
    wait_until(lambda: count_rows(dsn, "order_dlq", missing_ok=True) == 1, timeout=15)
    assert pg_fetchval(dsn, 'SELECT entry_id FROM "Order_Events"') == ids[0]
    with redis_client(env["STREAMD_REDIS_URL"]) as r:
        assert r.xlen("orders:{0}:dead") == 1
    assert serve.terminate() == 0
