"""The SQL of typed tables, as text: how a column's value is taken from the payload, and what
each statement keys and compares on (the behaviour itself is tested against Postgres)."""

from __future__ import annotations

import dataclasses

from streamd.backends.typed_schema import base_type, value_expr
from streamd.config.tables import ColumnSpec, TableSpec
from streamd.pipeline.typed_sql import append_sql, check_function, upsert_sql

ORDERS = TableSpec(
    "orders",
    ("orders",),
    mode="upsert",
    columns=(
        ColumnSpec("order_id", "text", ("order_id",)),
        ColumnSpec("amount", "numeric(12,2)", ("totals", "amount")),
    ),
    key=("order_id",),
    delete_types=("order_deleted",),
)


def test_a_value_is_cast_to_the_type_without_its_modifier() -> None:
    assert base_type("numeric(12,2)") == "numeric"
    assert base_type("varchar(20)[]") == "varchar[]"
    assert value_expr(ORDERS.columns[0]) == "(s.payload ->> 'order_id')::text"
    assert value_expr(ORDERS.columns[1]) == "(s.payload #>> '{totals,amount}')::numeric"


def test_json_columns_take_the_json_value_and_arrays_take_json_arrays() -> None:
    assert value_expr(ColumnSpec("doc", "jsonb", ("doc",))) == "(s.payload -> 'doc')"
    assert value_expr(ColumnSpec("doc", "json", ("a", "b"))) == "(s.payload #> '{a,b}')::json"
    tags = value_expr(ColumnSpec("tags", "text[]", ("tags",)))
    assert "jsonb_array_elements_text" in tags and "ELSE (s.payload ->> 'tags')::text[]" in tags


def test_append_is_keyed_by_stream_and_entry_id() -> None:
    spec = TableSpec("log", ("log",), columns=ORDERS.columns)
    assert append_sql(spec).endswith("ON CONFLICT (stream, entry_id) DO NOTHING")
    fast = append_sql(spec, replay_safe=False)
    assert "ON CONFLICT" not in fast and "$1" not in fast
    no_payload = TableSpec("log", ("log",), columns=ORDERS.columns, keep_payload=False)
    assert '"payload"' not in append_sql(no_payload).split("SELECT")[0]


def test_upsert_folds_by_key_and_compares_positions() -> None:
    sql = upsert_sql(ORDERS)
    assert 'SELECT DISTINCT ON ("order_id")' in sql
    assert 'ORDER BY "order_id", entry_ms DESC, entry_seq DESC, stream DESC' in sql
    assert "(r.entry_ms, r.entry_seq, r.stream) < (EXCLUDED.entry_ms" in sql
    assert '"orders_tombstones"' in sql
    without_deletes = upsert_sql(dataclasses.replace(ORDERS, delete_types=()))
    assert "tombstones" not in without_deletes


def test_the_check_function_lives_in_pg_temp_and_skips_non_keys_of_deletes() -> None:
    create, call = check_function(ORDERS)
    assert create.startswith('CREATE OR REPLACE FUNCTION pg_temp."streamd_check_orders"')
    assert "v1 numeric(12,2);" in create  # the exact type: its modifier is checked too
    assert "IF NOT d THEN BEGIN v1 :=" in create
    assert "missing: a key column needs a value" in create
    assert "FROM streamd_typed_stage_v1" in call


def test_plain_inserts_take_the_keys_the_table_lacks_and_on_conflict_the_rest() -> None:
    sql = upsert_sql(ORDERS, plain_inserts=True)
    new = sql.split("new AS (")[1].split("), put AS (")[0]
    assert 'NOT EXISTS (SELECT 1 FROM "orders" r WHERE r."order_id" = b."order_id")' in new
    assert "ON CONFLICT" not in new
    put = sql.split("put AS (")[1]
    assert 'AND EXISTS (SELECT 1 FROM "orders" r' in put and "ON CONFLICT" in put
    assert "SELECT stream, true FROM new" in sql
    assert "count(*) FILTER (WHERE fresh) AS fresh" in sql
    assert "new AS" not in upsert_sql(ORDERS)
