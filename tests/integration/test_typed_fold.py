"""Hypothesis over random sequences of updates and deletes of a few keys, written in random
batches, in any order, concurrently, and with replays (a batch written again after later ones, as
a reclaimed or re-delivered batch is): the upsert table always equals the fold of the stream."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import random
from collections.abc import Iterator
from typing import Any

import asyncpg
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamd.backends.connections import postgres_connect
from streamd.backends.schema import apply_schema
from streamd.config.settings import Settings
from streamd.config.tables import parse_tables
from streamd.pipeline.envelope import Row, split_entries
from streamd.pipeline.typed_sink import TypedSink
from tests.support.helpers import run_async
from tests.support.typed import fold

pytestmark = pytest.mark.timeout(300)

SECTION = {
    "streams": ["a", "b"],
    "mode": "upsert",
    "key": ["order_id"],
    "delete_types": ["order_deleted"],
    "columns": {"order_id": "text", "status": "text"},
}

# One event: (key, delete?, stream).
events = st.lists(st.tuples(st.integers(0, 3), st.booleans(), st.sampled_from("ab")), min_size=1)


@dataclasses.dataclass
class Plan:
    """How a sequence reaches Postgres: batches (lists of event indexes), written in `order`
    (indexes into batches, repeats being replays), over one connection (in exactly that order)
    or two at once (the order blurred by concurrency, as with several consumers)."""

    batches: list[list[int]]
    order: list[int]
    connections: int = 1


@st.composite
def plans(draw: st.DrawFn, size: int) -> Plan:
    cuts = sorted(draw(st.sets(st.integers(1, max(1, size - 1)), max_size=size)))
    bounds = [0, *(c for c in cuts if c < size), size]
    indexes = list(range(size))
    draw(st.randoms()).shuffle(indexes)  # consumers each take some, not in stream order
    batches = [indexes[a:b] for a, b in itertools.pairwise(bounds) if a < b]
    order = draw(st.permutations(range(len(batches))))
    replays = draw(st.lists(st.integers(0, len(batches) - 1), max_size=4))
    return Plan(batches, [*order, *replays], draw(st.integers(1, 2)))


@pytest.fixture
def typed(settings: Settings) -> Iterator[Settings]:
    # orders: with deletes (their table lock); plain: no deletes, so concurrent batches race for
    # new keys (the fast statement's plain INSERT fails on the key, the careful one takes over).
    plain = {k: v for k, v in SECTION.items() if k != "delete_types"}
    sections = {"orders": SECTION, "plain": {**plain, "streams": ["c"]}}
    s = dataclasses.replace(settings, tables=parse_tables(sections, "test"))

    async def init() -> None:
        conn = await postgres_connect(s)
        await apply_schema(conn, s)
        await conn.close()

    run_async(init)
    yield s


def entries(sequence: list[tuple[int, bool, str]]) -> list[tuple[str, str, str, dict[str, Any]]]:
    """(stream, entry_id, type, data) of each event of the sequence. Each stream counts its own
    entry IDs, so the two streams' IDs tie often: the stream's name decides then."""
    out = []
    counts = {"a": 0, "b": 0}
    for i, (key, deleted, stream) in enumerate(sequence):
        data = {"order_id": f"k{key}", "status": f"s{i}"}
        entry_id = f"1700000000000-{counts[stream]}"
        counts[stream] += 1
        out.append((stream, entry_id, "order_deleted" if deleted else "u", data))
    return out


def rows_for(stream_entries: list[tuple[str, str, str, dict[str, Any]]]) -> list[Row]:
    raw = [
        [e.encode(), [b"type", t.encode(), b"data", orjson.dumps(d)]]
        for _, e, t, d in stream_entries
    ]
    return split_entries(raw, 1 << 20)[0]


async def apply(
    s: Settings, sequence: list[tuple[int, bool, str]], plan: Plan
) -> set[tuple[str, str]]:
    deletes = any(deleted for _, deleted, _ in sequence)
    spec = s.tables[0] if deletes else s.tables[1]
    sinks = {stream: TypedSink(stream, spec, s.dlq_table) for stream in "ab"}
    all_entries = entries(sequence)
    conns = [await postgres_connect(s) for _ in range(plan.connections)]
    try:
        await conns[0].execute("TRUNCATE orders, orders_tombstones, plain")
        queue = list(plan.order)

        async def writer(conn: asyncpg.Connection) -> None:
            while queue:
                batch = [all_entries[i] for i in plan.batches[queue.pop(0)]]
                for stream in "ab":  # a batch is of one stream
                    mine = [e for e in batch if e[0] == stream]
                    if mine:
                        result = await sinks[stream].write(conn, rows_for(mine), [])
                        assert result.refused == []

        await asyncio.gather(*(writer(c) for c in conns))
        records = await conns[0].fetch(f"SELECT order_id, status FROM {spec.name}")
        return {(r["order_id"], r["status"]) for r in records}
    finally:
        for conn in conns:
            await conn.close()


def expected(sequence: list[tuple[int, bool, str]]) -> set[tuple[str, str]]:
    """The fold, positions as typed_sql defines them: entry ID, then the stream's name."""
    latest: dict[str, tuple[tuple[int, str], bool, str]] = {}
    for stream, entry_id, event_type, data in entries(sequence):
        position = (int(entry_id.split("-")[1]), stream)
        key = data["order_id"]
        if key not in latest or latest[key][0] < position:
            latest[key] = (position, event_type == "order_deleted", data["status"])
    return {(key, status) for key, (_, deleted, status) in latest.items() if not deleted}


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data(), sequence=events, deletes=st.booleans())
def test_upsert_table_equals_the_fold_whatever_the_batches_order_and_replays(
    typed: Settings, data: st.DataObject, sequence: list[tuple[int, bool, str]], deletes: bool
) -> None:
    if not deletes:  # the table without delete_types
        sequence = [(key, False, stream) for key, _, stream in sequence]
    plan = data.draw(plans(len(sequence)))
    got = run_async(lambda: apply(typed, sequence, plan))
    assert got == expected(sequence)


def test_the_fold_helper_agrees_on_one_stream() -> None:
    """tests/support/typed.fold (the end-to-end tests' oracle) is the same fold on one stream."""
    rng = random.Random(3)
    sequence = [(rng.randrange(3), rng.random() < 0.3, "a") for _ in range(50)]
    one = fold((e, t, d) for _, e, t, d in entries(sequence))
    assert {(k, v[0]) for k, v in one.items()} == expected(sequence)
