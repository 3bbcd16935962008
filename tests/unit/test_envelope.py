"""The envelope contract on raw entries (pure logic: no services)."""

from __future__ import annotations

import orjson
from hypothesis import given
from hypothesis import strategies as st

from streamd.pipeline.dead_letters import decode_fields, encode_fields
from streamd.pipeline.envelope import META, PG_EPOCH_MS, PRODUCED_US, split_entries

MAX = 1000


def us(ms: int) -> int:
    return (ms - PG_EPOCH_MS) * 1000


def test_well_formed_entries_become_rows_in_order() -> None:
    entries = [
        [b"1700000000000-0", [b"type", b"user_created", b"data", b'{"user_id":1}']],
        [b"1700000000001-5", [b"data", b"[1,2]", b"type", b"order_placed"]],
        [b"1700000000002-0", [b"type", b"t", b"data", b"{}", b"ts", b"1600000000000"]],
    ]
    rows, rejects = split_entries(entries, MAX)
    assert rejects == []
    assert [r[:3] for r in rows] == [
        (b"1700000000000-0", b"user_created", b'{"user_id":1}'),
        (b"1700000000001-5", b"order_placed", b"[1,2]"),
        (b"1700000000002-0", b"t", b"{}"),
    ]
    assert rows[0][PRODUCED_US] == us(1700000000000)  # from the entry ID
    assert rows[2][PRODUCED_US] == us(1600000000000)  # from ts
    assert all(r[META] is None for r in rows)


def test_bad_entries_are_rejected_with_precise_reasons() -> None:
    cases = {
        b"1-1": ([b"data", b"{}"], "missing_type"),
        b"1-2": ([b"type", b"", b"data", b"{}"], "empty_type"),
        b"1-3": ([b"type", b"x" * 129, b"data", b"{}"], "type_too_long"),
        b"1-4": ([b"type", b"t"], "missing_data"),
        b"1-5": ([b"type", b"t", b"data", b"x" * (MAX + 1)], "oversize"),
        b"1-6": ([b"type", b"t", b"data", b"{}", b"ts", b"soon"], "invalid_ts"),
        b"1-7": ([b"type", b"t", b"data", b"{}", b"ts", b"-5"], "invalid_ts"),
        b"1-8": ([b"type", b"t", b"data", b"{}", b"ts", b"9" * 17], "invalid_ts"),
        b"1-9": ([b"type", b"a", b"type", b"b", b"data", b"{}"], "duplicate_field"),
    }
    entries = [[entry_id, fields] for entry_id, (fields, _) in cases.items()]
    entries.append([b"1-10", None])
    rows, rejects = split_entries(entries, MAX)
    assert rows == []
    got = {r.entry_id: r.reason for r in rejects}
    assert got == {**{k: reason for k, (_, reason) in cases.items()}, b"1-10": "deleted"}
    assert all(r.error for r in rejects)
    oversize = next(r for r in rejects if r.reason == "oversize")
    assert "1001 bytes" in oversize.error


def test_a_ts_shared_by_neighbours_is_read_once_and_a_bad_one_never_passes_for_it() -> None:
    def entry(n: int, ts: bytes) -> list[object]:
        return [f"1700000000000-{n}".encode(), [b"type", b"t", b"data", b"{}", b"ts", ts]]

    stamps = [b"", b"1600000000000", b"1600000000000", b"x", b"1600000000000", b"1600000000001"]
    stamps += [b"1600000000001", b"", b"99999999999999999"]
    rows, rejects = split_entries([entry(n, ts) for n, ts in enumerate(stamps)], MAX)
    assert [r.entry_id for r in rejects] == [f"1700000000000-{n}".encode() for n in (0, 3, 7, 8)]
    assert {r.reason for r in rejects} == {"invalid_ts"}
    assert [r[PRODUCED_US] for r in rows] == [us(1600000000000)] * 3 + [us(1600000000001)] * 2


def test_type_of_exactly_128_bytes_and_data_of_exactly_the_limit_are_accepted() -> None:
    rows, rejects = split_entries(
        [
            [b"1-1", [b"type", b"x" * 128, b"data", b"1" * MAX]],
            [b"1-2", [b"type", b"y" * 128, b"data", b"1" * MAX, b"extra", b"v"]],
        ],
        MAX,
    )
    assert len(rows) == 2
    assert rejects == []


def test_extra_fields_go_to_meta_only_when_asked() -> None:
    entry = [[b"1-1", [b"type", b"t", b"data", b"{}", b"source", b"web", b"bin", b"\xff\x00"]]]
    rows, _ = split_entries(entry, MAX)
    assert rows[0][META] is None
    rows, _ = split_entries(entry, MAX, keep_extra_fields=True)
    assert orjson.loads(rows[0][META] or b"") == {"source": "web", "bin": "\ufffd"}


field_bytes = st.binary(max_size=40)


@given(st.lists(st.tuples(field_bytes, field_bytes), max_size=8))
def test_dead_letter_fields_round_trip_any_bytes(pairs: list[tuple[bytes, bytes]]) -> None:
    flat = [b for pair in pairs for b in pair]
    encoded = encode_fields(flat)
    text = orjson.dumps(encoded)
    assert not _has_nul(orjson.loads(text)), "jsonb cannot store NUL in a string"
    decoded = decode_fields(orjson.loads(text))
    # Field order within a repeated name is kept; names group together.
    assert sorted(zip(decoded[::2], decoded[1::2], strict=True)) == sorted(pairs)


def _has_nul(value: object) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    return False


@given(
    st.lists(st.tuples(st.sampled_from([b"type", b"data", b"ts", b"x"]), field_bytes), max_size=6)
)
def test_every_entry_is_either_a_row_or_a_rejection(pairs: list[tuple[bytes, bytes]]) -> None:
    flat = [b for pair in pairs for b in pair]
    rows, rejects = split_entries([[b"1700000000000-0", flat]], MAX)
    assert len(rows) + len(rejects) == 1
