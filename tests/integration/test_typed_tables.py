"""Typed tables end to end: `streamd serve` upserting one stream into its [tables.<name>] table,
typed append with a bad value, and `streamd db init` creating, extending and refusing tables."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

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
from tests.support.streamd_cli import explain, run_streamd
from tests.support.typed import (
    ORDERS_TOML,
    decoded,
    deletion,
    drained,
    fold,
    orders_config,
    orders_table,
    update,
)

pytestmark = pytest.mark.timeout(90)


def test_serve_upserts_a_stream_into_its_typed_table(
    env: dict[str, str], tmp_path: Path, start_serve: Callable[..., ServeProcess]
) -> None:
    environ = env | {"STREAMD_CONFIG": str(orders_config(tmp_path / "streamd.toml"))}
    url, dsn = env["STREAMD_REDIS_URL"], env["STREAMD_POSTGRES_DSN"]
    rng = random.Random(14)
    fields = [
        deletion(f"o{rng.randrange(20)}")
        if rng.random() < 0.15
        else update(f"o{rng.randrange(20)}", f"s{i}")
        for i in range(600)
    ]
    # Small batches over three consumers: batches of one key commit out of stream order.
    serve = start_serve("--tasks", "3", environ=environ | {"STREAMD_BATCH_SIZE": "7"})
    serve.wait_ready()
    ids = xadd(url, fields, stream="orders")
    wait_until(lambda: drained(url, "orders"), timeout=30, message=serve.tail(20))
    assert orders_table(dsn) == fold(decoded(zip(ids, fields, strict=True)))
    assert count_rows(dsn, "dead_letter_queue") == 0
    assert count_rows(dsn, "events") == 0  # the orders stream goes to its own table only
    assert serve.terminate() == 0


def test_typed_append_dead_letters_a_bad_value_and_keeps_its_neighbours(
    env: dict[str, str], tmp_path: Path, start_serve: Callable[..., ServeProcess]
) -> None:
    config = tmp_path / "streamd.toml"
    config.write_text(
        'stream = "clicks"\n[tables.clicks]\nstreams = ["clicks"]\n'
        'columns = { page = "text", ms = { type = "integer", from = "$.timing.ms" } }\n'
    )
    url, dsn = env["STREAMD_REDIS_URL"], env["STREAMD_POSTGRES_DSN"]
    serve = start_serve(environ=env | {"STREAMD_CONFIG": str(config)})
    serve.wait_ready()
    xadd(
        url,
        [
            event("click", {"page": "/a", "timing": {"ms": 12}}),
            event("click", {"page": "/b", "timing": {"ms": "slow"}}),
            event("click", {"page": "/c"}),
        ],
        stream="clicks",
    )
    wait_until(lambda: drained(url, "clicks"), timeout=20, message=serve.tail(20))
    rows = pg_fetch(dsn, "SELECT page, ms FROM clicks ORDER BY entry_id")
    assert [(r["page"], r["ms"]) for r in rows] == [("/a", 12), ("/c", None)]
    with redis_client(url) as r:
        (letter,) = r.xrange("clicks:dead")
    assert letter[1][b"reason"] == b"invalid_column"
    assert b"column ms (integer, from $.timing.ms)" in letter[1][b"error"]
    assert serve.terminate() == 0


def db_init(env: dict[str, str], config: Path, toml: str) -> tuple[int, str]:
    config.write_text(toml)
    result = run_streamd(env | {"STREAMD_CONFIG": str(config)}, "db", "init")
    assert "Traceback" not in result.stderr, explain(result)
    return result.returncode, result.stderr.strip()


def test_db_init_refuses_an_existing_table_with_other_columns(
    env: dict[str, str], tmp_path: Path
) -> None:
    pg_execute(env["STREAMD_POSTGRES_DSN"], "CREATE TABLE orders (id int, note text)")
    code, err = db_init(env, tmp_path / "c.toml", ORDERS_TOML)
    assert code == 78
    assert len(err.splitlines()) == 1
    assert "table orders ([tables.orders]): the table exists with other columns" in err


def test_db_init_adds_columns_declared_later_and_never_drops_or_retypes(
    env: dict[str, str], tmp_path: Path
) -> None:
    dsn, config = env["STREAMD_POSTGRES_DSN"], tmp_path / "c.toml"
    assert db_init(env, config, ORDERS_TOML)[0] == 0
    pg_execute(
        dsn,
        "INSERT INTO orders (order_id, status, stream, entry_id, event_type, payload,"
        " produced_at, entry_ms, entry_seq) VALUES ('o1', 'new', 'orders', '1-0', 't', '{}',"
        " now(), 1, 0)",
    )
    later = ORDERS_TOML.replace('amount = "numeric"', 'amount = "numeric", note = "varchar(20)"')
    assert db_init(env, config, later)[0] == 0
    columns = pg_fetch(
        dsn,
        "SELECT column_name, data_type FROM information_schema.columns"
        " WHERE table_name = 'orders' AND column_name = 'note'",
    )
    assert [tuple(c) for c in columns] == [("note", "character varying")]
    assert [tuple(r) for r in pg_fetch(dsn, "SELECT order_id, note FROM orders")] == [("o1", None)]
    code, err = db_init(env, config, later.replace('amount = "numeric"', 'amount = "integer"'))
    assert code == 78 and "column amount is numeric in the table, integer in the section" in err
    code, err = db_init(env, config, later.replace('status = "text", ', ""))
    assert code == 78 and "column status (text) is in the table but not in the section" in err
    code, err = db_init(env, config, later.replace('key = ["order_id"]', 'key = ["status"]'))
    assert code == 78 and "its primary key is (order_id)" in err
    code, err = db_init(env, config, later.replace('"numeric"', '"numerc"'))
    assert code == 78 and 'type "numerc" does not exist' in err
    assert db_init(env, config, later)[0] == 0  # as it was: fine again


def test_a_generated_column_added_later_is_computed_for_the_rows_already_there(
    env: dict[str, str], tmp_path: Path
) -> None:
    dsn, config = env["STREAMD_POSTGRES_DSN"], tmp_path / "c.toml"
    section = '[tables.clicks]\nstreams = ["clicks"]\ncolumns = { page = "text" }\n'
    assert db_init(env, config, section)[0] == 0
    pg_execute(
        dsn,
        "INSERT INTO clicks (stream, entry_id, event_type, payload, produced_at) VALUES"
        """ ('clicks', '1-0', 'c', '{"page": "/a", "ms": 5}', now()),"""
        """ ('clicks', '1-1', 'c', '{"page": "/b", "ms": "slow"}', now())""",
    )
    later = section.replace('page = "text"', 'page = "text", ms = "integer"')
    code, err = db_init(env, config, later)
    assert code == 78
    assert "cannot add column ms: a row already in the table has a value it cannot take" in err
    pg_execute(dsn, "DELETE FROM clicks WHERE entry_id = '1-1'")
    assert db_init(env, config, later)[0] == 0
    assert [tuple(r) for r in pg_fetch(dsn, "SELECT page, ms FROM clicks")] == [("/a", 5)]


def test_serve_as_a_role_that_cannot_update_the_upsert_table_is_exit_78(
    env: dict[str, str], tmp_path: Path
) -> None:
    """The least-privilege grants (INSERT and SELECT) are not enough for an upsert table with
    deletes: serve says what is missing at start instead of retrying its first batch forever."""
    dsn, config = env["STREAMD_POSTGRES_DSN"], tmp_path / "c.toml"
    assert db_init(env, config, f'stream = "orders"\n{ORDERS_TOML}')[0] == 0
    database = dsn.rsplit("/", 1)[1]
    role = f"ingest_{database}"
    for sql in (
        f'CREATE ROLE "{role}" LOGIN',
        f'GRANT USAGE ON SCHEMA public TO "{role}"',
        f'GRANT INSERT, SELECT ON ALL TABLES IN SCHEMA public TO "{role}"',
        f'GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO "{role}"',
    ):
        pg_execute(dsn, sql)
    environ = env | {
        "STREAMD_CONFIG": str(config),
        "STREAMD_POSTGRES_DSN": dsn.replace("postgres@", f"{role}@"),
    }
    result = run_streamd(environ, "serve")
    assert result.returncode == 78, explain(result)
    line = result.stderr.strip().splitlines()[-1]
    assert f"role {role} lacks what streamd needs" in line
    assert "UPDATE, DELETE on table orders" in line
    assert "UPDATE on table orders_tombstones" in line
