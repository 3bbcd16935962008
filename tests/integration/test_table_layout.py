"""Tables that exist before streamd: checked, never written into unless they can refuse a replay."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.support.helpers import (
    ServeProcess,
    count_rows,
    event,
    pg_execute,
    pg_fetch,
    redis_client,
    wait_until,
    xadd,
)
from tests.support.layouts import NO_UNIQUE_KEY, TEXT_KEY
from tests.support.streamd_cli import run_streamd

# The original pipeline's table: a serial id and its own names for everything.
ORIGINAL_PIPELINE = """
CREATE TABLE events (
    id serial PRIMARY KEY, event_id text NOT NULL, event_type text NOT NULL,
    payload jsonb NOT NULL, created_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO events (event_id, event_type, payload) VALUES ('1-1', 'old', '{}');
"""


def shape(dsn: str, table: str = "events") -> list[tuple[str, ...]]:
    """The table's columns and indexes, to show nothing was altered."""
    columns = pg_fetch(
        dsn,
        "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute"
        " WHERE attrelid = $1::regclass AND attnum > 0 ORDER BY attnum",
        table,
    )
    indexes = pg_fetch(dsn, "SELECT indexdef FROM pg_indexes WHERE tablename = $1", table)
    return [tuple(r) for r in columns] + [(r["indexdef"],) for r in indexes]


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "streamd: error:" in line]


@pytest.mark.parametrize(
    ("ddl", "differs"),
    [
        (ORIGINAL_PIPELINE, "no columns stream, entry_id, produced_at, meta"),
        (NO_UNIQUE_KEY, "no unique key on (stream, entry_id), which refuses a replayed entry"),
    ],
    ids=["original_pipeline", "no_unique_key"],
)
def test_a_table_of_another_layout_stops_db_init_and_serve_with_exit_78(
    env: dict[str, str], start_serve: Callable[..., ServeProcess], ddl: str, differs: str
) -> None:
    dsn = env["STREAMD_POSTGRES_DSN"]
    pg_execute(dsn, ddl)
    before, rows_before = shape(dsn), count_rows(dsn)
    xadd(env["STREAMD_REDIS_URL"], [event("t", {"n": 1})])

    init = run_streamd(env, "db", "init")
    assert init.returncode == 78, init.stderr
    (line,) = error_lines(init.stderr)
    assert "table 'events' exists with another layout" in line and differs in line, line
    assert "Traceback" not in init.stderr

    serve = start_serve()
    assert serve.wait(timeout=60) == 78
    assert any(
        "table 'events' exists with another layout" in x and differs in x
        for x in serve.output().splitlines()
    ), serve.output()

    # Never written into, never altered; and nothing else was created beside it.
    assert shape(dsn) == before and count_rows(dsn) == rows_before
    assert count_rows(dsn, "dead_letter_queue", missing_ok=True) == 0


def test_a_dead_letter_table_of_another_layout_is_refused(env: dict[str, str]) -> None:
    dsn = env["STREAMD_POSTGRES_DSN"]
    pg_execute(dsn, "CREATE TABLE dead_letter_queue (id serial, stream text, entry_id text)")
    init = run_streamd(env, "db", "init")
    assert init.returncode == 78, init.stderr
    (line,) = error_lines(init.stderr)
    assert "table 'dead_letter_queue' exists with another layout" in line
    assert "no columns event_type, fields, reason, error, deliveries" in line
    assert "set dlq_table" in line
    assert count_rows(dsn, "events", missing_ok=True) == 0  # nothing created either


def test_todays_text_key_layout_is_written_into_exactly_once(
    env: dict[str, str], start_serve: Callable[..., ServeProcess]
) -> None:
    dsn = env["STREAMD_POSTGRES_DSN"]
    pg_execute(dsn, TEXT_KEY)
    pg_execute(
        dsn,
        "INSERT INTO events (stream, entry_id, event_type, payload, produced_at)"
        " VALUES ('events', '1-1', 't', '{}', now())",
    )
    before = shape(dsn)
    # 1-1 is already in the table (as after a crash between COPY and XACK): the key refuses it.
    with redis_client(env["STREAMD_REDIS_URL"]) as r:
        r.xadd("events", {"type": "t", "data": "{}"}, id="1-1")
    ids = xadd(env["STREAMD_REDIS_URL"], [event("t", {"n": i}) for i in range(5)])
    serve = start_serve()
    serve.wait_ready()
    wait_until(lambda: count_rows(dsn) == 6, timeout=30)
    got = {r["entry_id"] for r in pg_fetch(dsn, "SELECT entry_id FROM events")}
    assert got == {"1-1", *ids}
    assert shape(dsn) == before
    assert serve.terminate() == 0


def test_a_table_renamed_out_of_the_way_does_not_block_db_init(env: dict[str, str]) -> None:
    dsn = env["STREAMD_POSTGRES_DSN"]
    assert run_streamd(env, "db", "init").returncode == 0
    pg_execute(dsn, "ALTER TABLE events RENAME TO events_old")
    result = run_streamd(env, "db", "init")
    assert result.returncode == 0, result.stderr
    assert pg_fetch(dsn, "SELECT 1 FROM pg_indexes WHERE tablename = 'events'")
