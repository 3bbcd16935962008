"""`streamd db migrate` against a real Postgres: today's text-key layout converted, every row
kept, resumable after an interruption, online while serve writes."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from streamd.backends.connections import postgres_connect
from streamd.backends.migrate import migrate
from streamd.config.settings import Settings
from tests.support.helpers import (
    ServeProcess,
    count_rows,
    pending_count,
    pg_execute,
    pg_fetch,
    pg_fetchval,
    wait_until,
)
from tests.support.layouts import TEXT_KEY
from tests.support.load import producing
from tests.support.streamd_cli import run_streamd

ROWS = 25_000  # three chunks of 10,000


def populate(dsn: str) -> None:
    """ROWS rows of today's layout over five days of 2026 and two streams, and a seq past 2**63."""
    pg_execute(dsn, TEXT_KEY)
    pg_execute(
        dsn,
        "INSERT INTO events (stream, entry_id, event_type, payload, produced_at, meta)"
        " SELECT CASE WHEN n % 3 = 0 THEN 'clicks' ELSE 'events' END,"
        " (1767225600000 + n * 17280)::text || '-' || (n % 7)::text, 't',"
        " jsonb_build_object('n', n), now(), CASE WHEN n % 5 = 0 THEN '{\"x\": 1}'::jsonb END"
        f" FROM generate_series(1, {ROWS - 1}) AS n",
    )
    pg_execute(
        dsn,
        "INSERT INTO events (stream, entry_id, event_type, payload, produced_at)"
        " VALUES ('events', '1767225600000-18446744073709551615', 't', '{}', now())",
    )


def same_rows(dsn: str) -> None:
    """Every row of the old table is in the new one, column for column, and nothing else."""
    columns = "stream, entry_id, event_type, payload, produced_at, ingested_at, meta"
    for a, b in (("events_premigrate", "events"), ("events", "events_premigrate")):
        missing = pg_fetchval(
            dsn,
            f"SELECT count(*) FROM (SELECT {columns} FROM {a} EXCEPT SELECT {columns} FROM {b}) x",
        )
        assert missing == 0, f"{missing} rows of {a} are not in {b}"


def test_migrate_converts_todays_layout_and_keeps_every_row(env: dict[str, str]) -> None:
    dsn = env["STREAMD_POSTGRES_DSN"]
    populate(dsn)
    result = run_streamd(env, "db", "migrate", timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert lines[0] == f"events: copied 10,000/{ROWS:,} rows (40%)"
    assert any("swapped in (the lock held" in line for line in lines), result.stderr
    assert lines[-1] == f"events: migrated, {ROWS:,} rows copied"
    assert count_rows(dsn) == count_rows(dsn, "events_premigrate") == ROWS
    same_rows(dsn)
    # The new layout: the two-bigint key, by day, each row in the partition of its ID's day.
    assert (
        pg_fetchval(
            dsn,
            "SELECT count(*) FROM events WHERE entry_ms <> split_part(entry_id, '-', 1)::bigint",
        )
        == 0
    )
    parts = pg_fetch(
        dsn, "SELECT tableoid::regclass::text AS p, count(*) FROM events GROUP BY 1 ORDER BY 1"
    )
    assert [r["p"] for r in parts] == [f"events_p2026010{d}" for d in range(1, 6)]
    assert run_streamd(env, "db", "init").returncode == 0  # the result is streamd's own layout
    again = run_streamd(env, "db", "migrate")
    assert again.returncode == 0 and "already the current layout" in again.stderr


class Interrupted(Exception):
    pass


async def test_an_interrupted_migration_resumes_where_it_was(
    env: dict[str, str], settings: Settings
) -> None:
    dsn = env["STREAMD_POSTGRES_DSN"]
    populate(dsn)
    conn = await postgres_connect(settings)
    try:

        def stop_after_first_chunk(line: str) -> None:
            if "copied" in line:
                raise Interrupted(line)

        with pytest.raises(Interrupted):
            await migrate(conn, "events", settings, stop_after_first_chunk)
    finally:
        await conn.close()
    assert count_rows(dsn, "events_migrating") == 10_000
    result = run_streamd(env, "db", "migrate", timeout=300)
    assert result.returncode == 0, result.stderr
    first = result.stderr.splitlines()[0]
    assert first.startswith("events: copied 20,000/"), first  # went on from the saved position
    assert count_rows(dsn) == ROWS
    same_rows(dsn)


def test_migrate_runs_online_while_serve_writes(
    env: dict[str, str], start_serve: Callable[..., ServeProcess]
) -> None:
    url, dsn = env["STREAMD_REDIS_URL"], env["STREAMD_POSTGRES_DSN"]
    populate(dsn)
    serve = start_serve()
    serve.wait_ready()
    with producing(url, rate=400, batch=20) as producer:
        wait_until(lambda: producer.produced >= 200, timeout=30)
        result = run_streamd(env, "db", "migrate", timeout=300)
        assert result.returncode == 0, result.stderr
        wait_until(lambda: producer.produced >= 400 + len(producer.ids) // 2, timeout=30)
    produced = set(producer.ids)
    wait_until(lambda: count_rows(dsn) >= ROWS + len(produced), timeout=60)
    wait_until(lambda: pending_count(url) == 0, timeout=30)
    got = [
        r["entry_id"] for r in pg_fetch(dsn, "SELECT entry_id FROM events WHERE event_type <> 't'")
    ]
    assert len(got) == len(set(got)) and set(got) == produced
    assert count_rows(dsn, "dead_letter_queue") == 0
    assert serve.terminate() == 0


def test_a_table_name_too_long_for_the_migration_names_is_refused_up_front(
    env: dict[str, str],
) -> None:
    long_name = "e" * 45
    environ = {**env, "STREAMD_EVENTS_TABLE": long_name}
    pg_execute(env["STREAMD_POSTGRES_DSN"], TEXT_KEY.replace("TABLE events", f"TABLE {long_name}"))
    result = run_streamd(environ, "db", "migrate")
    assert result.returncode == 1, result.stderr
    assert "is too long for the names db migrate gives" in result.stderr
    assert "Traceback" not in result.stderr
    assert (
        pg_fetchval(env["STREAMD_POSTGRES_DSN"], f"SELECT to_regclass('{long_name}_migrating')")
        is None
    )
