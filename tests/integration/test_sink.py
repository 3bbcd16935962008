"""The Postgres side of a batch, against a real Postgres: COPY, replays, refused rows."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import orjson
import pytest

from streamd.backends.connections import postgres_connect
from streamd.backends.schema import apply_schema
from streamd.config.settings import Settings
from streamd.pipeline import refused_rows
from streamd.pipeline.envelope import PG_EPOCH_MS, Rejection, Row, split_entries
from streamd.pipeline.sink import Part, PostgresSink


@pytest.fixture
async def conn(settings: Settings) -> AsyncIterator[asyncpg.Connection]:
    connection = await postgres_connect(settings)
    await apply_schema(connection, settings)
    yield connection
    await connection.close()


@pytest.fixture
def sink(settings: Settings) -> PostgresSink:
    return PostgresSink(settings.stream, settings.events_table, settings.dlq_table)


def rows_for(*payloads: bytes, start: int = 1, event_type: bytes = b"t") -> list[Row]:
    entries = [
        [f"1700000000000-{start + i}".encode(), [b"type", event_type, b"data", payload]]
        for i, payload in enumerate(payloads)
    ]
    rows, rejects = split_entries(entries, 1 << 20)
    assert rejects == []
    return rows


async def table(conn: asyncpg.Connection, settings: Settings) -> list[asyncpg.Record]:
    return await conn.fetch(f"SELECT * FROM {settings.events_table} ORDER BY entry_id")


async def dead(conn: asyncpg.Connection, settings: Settings) -> dict[str, asyncpg.Record]:
    records = await conn.fetch(f"SELECT * FROM {settings.dlq_table}")
    return {r["entry_id"]: r for r in records}


async def test_rows_land_with_the_right_columns(
    conn: asyncpg.Connection, sink: PostgresSink, settings: Settings
) -> None:
    rows = rows_for(b'{"user_id": 1, "name": "\xc3\xa9"}', b"[1, 2.5, null]", b'"text"')
    result = await sink.write(conn, rows, [])
    assert (result.inserted, result.duplicates, result.refused) == (3, 0, [])
    got = await table(conn, settings)
    assert [r["entry_id"] for r in got] == [f"1700000000000-{i}" for i in (1, 2, 3)]
    assert orjson.loads(got[0]["payload"]) == {"user_id": 1, "name": "é"}
    assert orjson.loads(got[1]["payload"]) == [1, 2.5, None]
    assert {r["stream"] for r in got} == {settings.stream}
    assert {r["event_type"] for r in got} == {"t"}
    assert got[0]["produced_at"].timestamp() * 1000 == 1700000000000
    assert all(r["ingested_at"] is not None and r["meta"] is None for r in got)


async def test_a_replayed_batch_inserts_nothing_new(
    conn: asyncpg.Connection, sink: PostgresSink, settings: Settings
) -> None:
    first = rows_for(*[b"{}"] * 10)
    await sink.write(conn, first, [])
    # The same batch again (a crash between COMMIT and XACK), then one that overlaps by half.
    again = await sink.write(conn, first, [])
    assert (again.inserted, again.duplicates) == (0, 10)
    overlap = rows_for(*[b"{}"] * 10, start=6)
    result = await sink.write(conn, overlap, [])
    assert (result.inserted, result.duplicates) == (5, 5)
    got = await table(conn, settings)
    assert len(got) == len({r["entry_id"] for r in got}) == 15


@pytest.mark.parametrize("isolate_by", ["copy_line_number", "bisection"])
async def test_refused_rows_become_dead_letters_and_neighbours_commit(
    conn: asyncpg.Connection,
    sink: PostgresSink,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    isolate_by: str,
) -> None:
    if isolate_by == "bisection":
        monkeypatch.setattr(refused_rows, "failing_row", lambda exc, count: None)
    payloads = [b'{"ok": %d}' % i for i in range(40)]
    bad = {
        0: (b"{not json", "invalid_json"),
        7: (b'"\\u0000"', "invalid_json"),  # valid JSON that jsonb refuses
        8: (b"[" * 20000 + b"]" * 20000, "too_deeply_nested"),
        20: (b'{"a": NaN}', "invalid_json"),
        39: (b"\xff\xfe", "invalid_encoding"),
    }
    for index, (payload, _) in bad.items():
        payloads[index] = payload
    rows = rows_for(*payloads)
    # A type with a NUL byte is refused by Postgres too (text cannot hold NUL).
    entry_id, _type, payload, produced_us, meta, fields = rows[30]
    rows[30] = (entry_id, b"bad\x00type", payload, produced_us, meta, fields)
    result = await sink.write(conn, rows, [])
    refused = {r.entry_id.decode(): r for r in result.refused}
    expected_bad = {f"1700000000000-{i + 1}" for i in [*bad, 30]}
    assert set(refused) == expected_bad
    assert result.inserted == 40 - len(expected_bad)
    for index, (_, reason) in bad.items():
        assert refused[f"1700000000000-{index + 1}"].reason == reason
    assert refused["1700000000000-31"].reason == "invalid_encoding"
    assert "type:" in refused["1700000000000-31"].error
    got = await table(conn, settings)
    assert {r["entry_id"] for r in got}.isdisjoint(expected_bad)
    assert len(got) == 40 - len(expected_bad)
    letters = await dead(conn, settings)
    assert set(letters) == expected_bad
    letter = letters["1700000000000-1"]
    assert letter["reason"] == "invalid_json"
    assert "Postgres refused the row" in letter["error"]
    assert orjson.loads(letter["fields"]) == {"type": "t", "data": "{not json"}


async def test_envelope_rejections_are_written_with_the_batch(
    conn: asyncpg.Connection, sink: PostgresSink, settings: Settings
) -> None:
    rejection = Rejection(b"1-1", [b"data", b"{}", b"blob", b"\xff"], "missing_type", "no type")
    await sink.write(conn, rows_for(b"{}"), [rejection])
    await sink.write(conn, [], [rejection])  # a replay writes it once
    letters = await dead(conn, settings)
    assert list(letters) == ["1-1"]
    assert letters["1-1"]["event_type"] is None
    assert orjson.loads(letters["1-1"]["fields"]) == {"data": "{}", "blob": {"$base64": "/w=="}}
    assert len(await table(conn, settings)) == 1


async def test_produced_at_from_ts(
    conn: asyncpg.Connection, sink: PostgresSink, settings: Settings
) -> None:
    rows, _ = split_entries(
        [[b"1700000000000-0", [b"type", b"t", b"data", b"{}", b"ts", b"1234567890123"]]], 1000
    )
    await sink.write(conn, rows, [])
    (record,) = await table(conn, settings)
    assert round(record["produced_at"].timestamp() * 1000) == 1234567890123
    assert PG_EPOCH_MS < 1234567890123


async def test_one_write_of_several_streams_keeps_each_rows_stream(
    conn: asyncpg.Connection, sink: PostgresSink, settings: Settings
) -> None:
    """Parts of several streams in one write: the same entry ID in two streams is two rows; a
    refused row and a replay are attributed to the part they belong to."""
    a, b = rows_for(b"{}", b"{}", b"{}"), rows_for(b"{}", b"{not json", b"{}")
    results = await sink.write_parts(conn, [Part("a", a, []), Part("b", b, [])])
    assert [(r.inserted, len(r.refused)) for r in results] == [(3, 0), (2, 1)]
    assert results[1].refused[0].entry_id == b"1700000000000-2"
    got = await table(conn, settings)
    assert sorted((r["stream"], r["entry_id"]) for r in got) == sorted(
        [("a", f"1700000000000-{i}") for i in (1, 2, 3)]
        + [("b", f"1700000000000-{i}") for i in (1, 3)]
    )
    letters = await conn.fetch(f"SELECT stream, entry_id FROM {settings.dlq_table}")
    assert [(r["stream"], r["entry_id"]) for r in letters] == [("b", "1700000000000-2")]
    more = rows_for(b"{}", start=4)
    again = await sink.write_parts(conn, [Part("a", a + more, []), Part("c", more, [])])
    assert [(r.inserted, r.duplicates) for r in again] == [(1, 3), (1, 0)]
