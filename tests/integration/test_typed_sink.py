"""Typed tables against a real Postgres: append with bad values, upserts out of order, the same
key twice in a batch, deletes and their tombstones, the `types` filter, replays."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from typing import Any

import asyncpg
import orjson
import pytest

from streamd.backends.connections import postgres_connect
from streamd.backends.schema import apply_schema
from streamd.config.settings import Settings
from streamd.config.tables import parse_tables
from streamd.pipeline.envelope import Rejection, Row, split_entries
from streamd.pipeline.sinks import sink_for
from streamd.pipeline.typed_sink import TypedSink

ORDERS = {
    "streams": ["orders"],
    "mode": "upsert",
    "key": ["order_id"],
    "delete_types": ["order_deleted"],
    "columns": {
        "order_id": "text",
        "status": "text",
        "amount": {"type": "numeric", "from": "$.totals.amount"},
    },
}
LOG = {
    "streams": ["orders"],
    "columns": {"order_id": "text", "qty": "integer", "code": "varchar(3)", "tags": "text[]"},
}


def typed_settings(settings: Settings, **sections: dict[str, Any]) -> Settings:
    return dataclasses.replace(settings, tables=parse_tables(sections, "test"))


@pytest.fixture
async def make_sink(
    settings: Settings,
) -> AsyncIterator[Callable[..., Any]]:
    conns: list[asyncpg.Connection] = []

    async def make(**section: Any) -> tuple[TypedSink, asyncpg.Connection, Settings]:
        s = typed_settings(settings, t=section)
        conn = await postgres_connect(s)
        conns.append(conn)
        await apply_schema(conn, s)
        sink = sink_for(s, "orders")
        assert isinstance(sink, TypedSink)
        return sink, conn, s

    yield make
    for conn in conns:
        await conn.close()


def rows_of(*events: tuple[int, str, Any]) -> list[Row]:
    """(sequence number, type, data) -> rows with entry IDs 1700000000000-<seq>."""
    entries = [
        [f"1700000000000-{seq}".encode(), [b"type", t.encode(), b"data", orjson.dumps(data)]]
        for seq, t, data in events
    ]
    rows, rejects = split_entries(entries, 1 << 20)
    assert rejects == []
    return rows


def order(seq: int, order_id: str, status: str, amount: Any = 1) -> tuple[int, str, Any]:
    return (
        seq,
        "order_updated",
        {"order_id": order_id, "status": status, "totals": {"amount": amount}},
    )


def delete(seq: int, order_id: str) -> tuple[int, str, Any]:
    return (seq, "order_deleted", {"order_id": order_id})


async def state(conn: asyncpg.Connection) -> dict[str, tuple[Any, ...]]:
    records = await conn.fetch("SELECT order_id, status, amount, entry_id FROM t")
    return {r["order_id"]: (r["status"], r["amount"], r["entry_id"]) for r in records}


async def test_append_bad_values_become_dead_letters_naming_the_column(
    make_sink: Callable[..., Any],
) -> None:
    sink, conn, s = await make_sink(**LOG)
    good = {"order_id": "a", "qty": 2, "code": "abc", "tags": ["x", "y"]}
    rows = rows_of(
        (1, "e", good),
        (2, "e", {**good, "qty": "many"}),  # not an integer
        (3, "e", {**good, "code": "toolong"}),  # over varchar(3): refused, not cut
        (4, "e", {"order_id": "b"}),  # missing values are NULL
        (5, "e", {**good, "qty": 1.5}),
        (6, "e", {**good, "tags": "{p,q}"}),  # an array literal works too
    )
    result = await sink.write(conn, rows, [])
    refused = {r.entry_id.decode(): r for r in result.refused}
    assert set(refused) == {"1700000000000-2", "1700000000000-3", "1700000000000-5"}
    assert {r.reason for r in refused.values()} == {"invalid_column"}
    assert "column qty (integer, from $.qty)" in refused["1700000000000-2"].error
    assert "many" in refused["1700000000000-2"].error
    assert "column code (varchar(3), from $.code)" in refused["1700000000000-3"].error
    assert result.inserted == 3
    got = await conn.fetch("SELECT entry_id, qty, code, tags, payload FROM t ORDER BY entry_id")
    assert [r["entry_id"] for r in got] == ["1700000000000-1", "1700000000000-4", "1700000000000-6"]
    assert got[0]["tags"] == ["x", "y"] and got[2]["tags"] == ["p", "q"]
    assert (got[1]["qty"], got[1]["code"]) == (None, None)
    assert orjson.loads(got[0]["payload"]) == good
    letters = await conn.fetch(f"SELECT entry_id, reason, error FROM {s.dlq_table}")
    assert {r["entry_id"] for r in letters} == set(refused)
    # A replay of the whole batch changes nothing and writes no dead letter twice.
    again = await sink.write(conn, rows, [])
    assert (again.inserted, again.duplicates) == (0, 3)
    assert await conn.fetchval("SELECT count(*) FROM t") == 3
    assert await conn.fetchval(f"SELECT count(*) FROM {s.dlq_table}") == 3


async def test_append_of_generatable_types_is_one_copy_with_generated_columns(
    make_sink: Callable[..., Any],
) -> None:
    columns = {"order_id": "text", "qty": "integer", "code": "varchar(3)"}
    sink, conn, s = await make_sink(streams=["orders"], columns=columns)
    generated = await conn.fetchval(
        "SELECT array_agg(attname::text ORDER BY attnum) FROM pg_attribute"
        " WHERE attrelid = 't'::regclass AND attgenerated <> ''"
    )
    assert generated == ["order_id", "qty", "code"]
    good = {"order_id": "a", "qty": 2, "code": "abc"}
    rows = rows_of(
        (1, "e", good), (2, "e", {**good, "qty": "x"}), (3, "e", {**good, "code": "long"})
    )
    result = await sink.write(conn, rows, [])
    assert [(r.entry_id, r.reason) for r in result.refused] == [
        (b"1700000000000-2", "invalid_column"),
        (b"1700000000000-3", "invalid_column"),
    ]
    assert "column qty (integer, from $.qty)" in result.refused[0].error
    fast = await sink.write(conn, rows_of((4, "e", good)), [])
    assert (fast.inserted, fast.duplicates) == (1, 0)
    replay = await sink.write(conn, rows_of((1, "e", good), (4, "e", good), (5, "e", good)), [])
    assert (replay.inserted, replay.duplicates) == (1, 2)
    got = await conn.fetch("SELECT entry_id, order_id, qty, code FROM t ORDER BY entry_id")
    assert [tuple(r)[1:] for r in got] == [("a", 2, "abc")] * 3
    assert await conn.fetchval(f"SELECT count(*) FROM {s.dlq_table}") == 2


@pytest.mark.parametrize("section", [LOG, ORDERS], ids=["append", "upsert"])
async def test_envelope_rejections_commit_with_the_batch_once(
    make_sink: Callable[..., Any], section: dict[str, Any]
) -> None:
    sink, conn, s = await make_sink(**section)
    rejection = Rejection(b"1-1", [b"data", b"{}"], "missing_type", "no type")
    rows = rows_of(order(2, "o1", "new"))
    for _ in range(2):  # the second time, a replay: the row and the dead letter stay one each
        await sink.write(conn, rows, [rejection])
    assert await conn.fetchval("SELECT count(*) FROM t") == 1
    letters = await conn.fetch(f"SELECT entry_id, reason FROM {s.dlq_table}")
    assert [tuple(r) for r in letters] == [("1-1", "missing_type")]


async def test_append_payloads_postgres_refuses_are_isolated_too(
    make_sink: Callable[..., Any],
) -> None:
    sink, conn, _ = await make_sink(**LOG)
    rows = rows_of(*((i, "e", {"order_id": str(i)}) for i in range(1, 5)))
    for index, payload in ((1, b"{nope"), (2, b"[" * 20000 + b"]" * 20000), (3, b"\xff")):
        entry_id, event_type, _payload, produced, meta, fields = rows[index]
        rows[index] = (entry_id, event_type, payload, produced, meta, fields)
    result = await sink.write(conn, rows, [])
    reasons = {r.entry_id: r.reason for r in result.refused}
    assert reasons == {
        b"1700000000000-2": "invalid_json",
        b"1700000000000-3": "too_deeply_nested",
        b"1700000000000-4": "invalid_encoding",
    }
    assert await conn.fetchval("SELECT array_agg(order_id) FROM t") == ["1"]


async def test_upsert_latest_by_position_wins_whatever_the_arrival_order(
    make_sink: Callable[..., Any],
) -> None:
    sink, conn, _ = await make_sink(**ORDERS)
    await sink.write(conn, rows_of(order(5, "o1", "shipped", "10.50")), [])
    # Older entries replayed later (a reclaimed batch) never overwrite a newer one.
    result = await sink.write(conn, rows_of(order(3, "o1", "paid"), order(4, "o2", "new")), [])
    assert (result.inserted, result.duplicates) == (1, 1)
    assert await state(conn) == {
        "o1": ("shipped", Decimal("10.50"), "1700000000000-5"),
        "o2": ("new", Decimal(1), "1700000000000-4"),
    }
    # The same batch again: nothing changes, not even ingested_at.
    before = await conn.fetch("SELECT * FROM t ORDER BY order_id")
    replay = await sink.write(conn, rows_of(order(5, "o1", "shipped", "10.50")), [])
    assert (replay.inserted, replay.duplicates) == (0, 1)
    assert await conn.fetch("SELECT * FROM t ORDER BY order_id") == before
    # A newer one does.
    await sink.write(conn, rows_of(order(6, "o1", "delivered", "10.5000001")), [])
    assert (await state(conn))["o1"] == ("delivered", Decimal("10.5000001"), "1700000000000-6")


async def test_the_same_key_twice_in_one_batch_keeps_the_last(
    make_sink: Callable[..., Any],
) -> None:
    sink, conn, _ = await make_sink(**ORDERS)
    batch = rows_of(
        order(1, "o1", "a"), order(2, "o1", "b"), order(4, "o1", "d"), order(3, "o1", "c")
    )
    result = await sink.write(conn, batch, [])
    assert (result.inserted, result.duplicates) == (1, 3)
    assert (await state(conn))["o1"][0] == "d"


async def test_deletes_remove_the_row_and_keep_a_tombstone(make_sink: Callable[..., Any]) -> None:
    sink, conn, _ = await make_sink(**ORDERS)
    await sink.write(conn, rows_of(order(1, "o1", "new"), order(2, "o2", "new")), [])
    await sink.write(conn, rows_of(delete(5, "o1")), [])
    assert set(await state(conn)) == {"o2"}
    # An older update replayed after the delete does not bring the row back.
    late = await sink.write(conn, rows_of(order(3, "o1", "paid")), [])
    assert (late.inserted, late.duplicates) == (0, 1)
    assert set(await state(conn)) == {"o2"}
    # A delete replayed changes nothing; a delete older than the row does not remove it.
    await sink.write(conn, rows_of(delete(5, "o1"), delete(1, "o2")), [])
    assert set(await state(conn)) == {"o2"}
    # A newer update after the delete creates the row again.
    await sink.write(conn, rows_of(order(7, "o1", "again")), [])
    assert (await state(conn))["o1"][0] == "again"
    # Delete then update of one key in one batch: the later entry decides.
    await sink.write(
        conn, rows_of(delete(8, "o2"), order(9, "o2", "back"), order(10, "o1", "x")), []
    )
    await sink.write(conn, rows_of(order(11, "o1", "y"), delete(12, "o1")), [])
    assert {k: v[0] for k, v in (await state(conn)).items()} == {"o2": "back"}
    tombstones = await conn.fetch("SELECT order_id, entry_id FROM t_tombstones ORDER BY 1")
    assert [tuple(r) for r in tombstones] == [("o1", "1700000000000-12"), ("o2", "1700000000000-1")]


async def test_upsert_missing_key_and_bad_value_are_dead_letters(
    make_sink: Callable[..., Any],
) -> None:
    sink, conn, _ = await make_sink(**ORDERS)
    rows = rows_of(
        order(1, "o1", "ok"),
        (2, "order_updated", {"status": "no key"}),
        order(3, "o2", "bad amount", "abc"),
        (4, "order_deleted", {"status": "a delete without its key"}),
        (5, "order_deleted", {"order_id": "o9", "totals": {"amount": "not checked"}}),
    )
    result = await sink.write(conn, rows, [])
    refused = {r.entry_id.decode(): r.error for r in result.refused}
    assert set(refused) == {"1700000000000-2", "1700000000000-3", "1700000000000-4"}
    assert "column order_id" in refused["1700000000000-2"]
    assert "missing" in refused["1700000000000-2"]
    assert "column amount (numeric, from $.totals.amount)" in refused["1700000000000-3"]
    assert set(await state(conn)) == {"o1"}


async def test_types_filter_skips_other_event_types(make_sink: Callable[..., Any]) -> None:
    sink, conn, _ = await make_sink(**{**ORDERS, "types": ["order_updated"]})
    rows = rows_of(order(1, "o1", "a"), (2, "order_viewed", {"order_id": "o2"}), delete(3, "o1"))
    result = await sink.write(conn, rows, [])
    # o1's update is folded into its later delete; the view is not this table's.
    assert (result.inserted, result.duplicates, result.refused) == (1, 1, [])
    assert await state(conn) == {}
    assert await conn.fetchval("SELECT count(*) FROM t_tombstones") == 1


async def test_keep_payload_false_has_no_payload_column(make_sink: Callable[..., Any]) -> None:
    sink, conn, _ = await make_sink(**{**ORDERS, "keep_payload": False})
    await sink.write(conn, rows_of(order(1, "o1", "a")), [])
    columns = await conn.fetch(
        "SELECT attname FROM pg_attribute WHERE attrelid = 't'::regclass AND attnum > 0"
    )
    assert "payload" not in {r["attname"] for r in columns}
    assert (await state(conn))["o1"][0] == "a"


@dataclasses.dataclass(frozen=True)
class Part:
    stream: str
    rows: list[Row]
    rejects: list[Rejection]


@pytest.mark.parametrize("section", [LOG, ORDERS], ids=["append", "upsert"])
async def test_parts_of_several_streams_commit_together_with_a_result_each(
    make_sink: Callable[..., Any], section: dict[str, Any]
) -> None:
    sink, conn, s = await make_sink(**section)
    # The same entry IDs in both streams: rows of different streams, never one another's replay.
    a = rows_of(order(1, "o1", "a1"), order(2, "o2", "a2", "abc"))
    b = rows_of(order(1, "o1", "b1"), order(2, "o3", "b2"))
    letter = Rejection(b"9-9", [b"data", b"{}"], "missing_type", "no type")
    parts = [Part("sa", a, []), Part("sb", b, [letter])]
    results = await sink.write_parts(conn, parts)
    upsert = section is ORDERS
    assert [r.inserted for r in results] == ([1, 2] if upsert else [2, 2])
    assert [len(r.refused) for r in results] == ([1, 0] if upsert else [0, 0])
    streams = await conn.fetch("SELECT stream, count(*) AS n FROM t GROUP BY 1 ORDER BY 1")
    if upsert:  # o1 from both streams at the same entry ID: the stream named last wins
        assert [tuple(r) for r in streams] == [("sb", 2)]
        assert (await state(conn))["o1"][0] == "b1"
    else:
        assert [tuple(r) for r in streams] == [("sa", 2), ("sb", 2)]
    letters = await conn.fetch(f"SELECT stream, entry_id, reason FROM {s.dlq_table} ORDER BY 1")
    expected = [("sb", "9-9", "missing_type")]
    if upsert:
        expected.insert(0, ("sa", "1700000000000-2", "invalid_column"))
    assert [tuple(r) for r in letters] == expected
    again = await sink.write_parts(conn, parts)  # a replay of both
    assert [r.inserted for r in again] == [0, 0]


@pytest.mark.parametrize(
    "section",
    [ORDERS, {"streams": ["orders"], "columns": {"order_id": "text", "status": "text"}}],
    ids=["upsert", "append-generated"],
)
async def test_parts_of_several_streams_take_the_fast_way_together(
    make_sink: Callable[..., Any], section: dict[str, Any]
) -> None:
    sink, conn, _ = await make_sink(**section)
    a = rows_of(order(1, "o1", "a1"), order(2, "o2", "a2"), order(3, "o1", "a3"))
    b = rows_of(order(1, "o3", "b1"))
    results = await sink.write_parts(conn, [Part("sa", a, []), Part("sb", b, [])])
    if section is ORDERS:  # o1 twice in sa: the last one; per stream, what changed the table
        assert [(r.inserted, r.duplicates) for r in results] == [(2, 1), (1, 0)]
        assert {k: v[0] for k, v in (await state(conn)).items()} == {
            "o1": "a3",
            "o2": "a2",
            "o3": "b1",
        }
    else:
        assert [(r.inserted, r.duplicates) for r in results] == [(3, 0), (1, 0)]
        by_stream = await conn.fetch("SELECT stream, count(*) FROM t GROUP BY 1 ORDER BY 1")
        assert [tuple(r) for r in by_stream] == [("sa", 3), ("sb", 1)]
