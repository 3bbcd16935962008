"""The sink's binary COPY stream, read back field by field: the values of every row in the
columns' order, whatever the encoder packs once per batch (times, sequence numbers, lengths)."""

from __future__ import annotations

import struct

from streamd.backends.layout import COPY_COLUMNS
from streamd.pipeline.envelope import Row
from streamd.pipeline.sink import PostgresSink, encode_copy_parts

_HEADER = b"PGCOPY\n\xff\r\n\x00" + bytes(8)


def read_copy(data: bytes) -> list[list[bytes | None]]:
    """Each row's fields, raw (None for NULL), from a binary COPY stream."""
    assert data.startswith(_HEADER) and data.endswith(b"\xff\xff")
    pos, out = len(_HEADER), []
    while True:
        (count,) = struct.unpack_from(">h", data, pos)
        pos += 2
        if count == -1:
            assert pos == len(data)
            return out
        fields: list[bytes | None] = []
        for _ in range(count):
            (size,) = struct.unpack_from(">i", data, pos)
            pos += 4
            if size == -1:
                fields.append(None)
            else:
                fields.append(data[pos : pos + size])
                pos += size
        out.append(fields)


def row(
    entry_id: bytes, payload: bytes = b'{"a": 1}', *, us: int = 7, meta: bytes | None = None
) -> Row:
    return (entry_id, b"order_placed" if len(payload) % 2 else b"t", payload, us, meta, [])


def expected(stream: bytes, r: Row, ids: bool) -> list[bytes | None]:
    entry_id, event_type, payload, us, meta, _ = r
    fields: list[bytes | None] = [stream]
    if ids:
        ms, _, seq = entry_id.partition(b"-")
        fields += [struct.pack(">q", int(ms)), struct.pack(">Q", int(seq or 0))]
    fields += [entry_id, event_type, b"\x01" + payload, struct.pack(">q", us)]
    fields.append(None if meta is None else b"\x01" + meta)
    return fields


ROWS = [
    row(b"1764547200000-0"),
    row(b"1764547200000-1", b'{"bb": 22}', us=8),
    row(b"1764547200000-2", us=8, meta=b'{"k": "v"}'),
    row(b"1764547200001-0", b"[1, 2, 3]"),  # the next millisecond: its sequence repeats
    row(b"1764547200001-1"),
    row(b"1764547200000-3"),  # out of order (a reclaimed entry): back to a time seen before
    row(b"99-18446744073709551615"),  # the largest sequence Redis allows: two's complement
    row(b"5"),  # an ID with no sequence number
]


def test_the_ids_layout_sends_each_rows_values_in_its_columns_order() -> None:
    sink = PostgresSink("orders", "events", "dead_letter_queue", layout="ids")
    assert sink.columns[:4] == ["stream", "entry_ms", "entry_seq", "entry_id"]
    decoded = read_copy(bytes(sink.copy_source(ROWS)))
    assert decoded == [expected(b"orders", r, ids=True) for r in ROWS]
    assert all(len(fields) == len(COPY_COLUMNS["ids"]) for fields in decoded)


def test_the_text_layout_and_several_streams_in_one_stream() -> None:
    sink = PostgresSink("a", "events", "dead_letter_queue", layout="text")
    parts = [(sink._row_start("a"), ROWS[:3]), (sink._row_start("b"), ROWS[3:])]
    decoded = read_copy(bytes(encode_copy_parts(parts)))
    want = [expected(b"a", r, ids=False) for r in ROWS[:3]]
    want += [expected(b"b", r, ids=False) for r in ROWS[3:]]
    assert decoded == want
    assert all(len(fields) == len(COPY_COLUMNS["text"]) for fields in decoded)
