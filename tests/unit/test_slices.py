"""A big batch is parsed and COPY-encoded in slices, yielding to the event loop in between (the
quiet lane's share of it): the slices add up to exactly what one pass makes."""

from __future__ import annotations

import asyncio

from streamd.config.settings import Settings
from streamd.pipeline.batch import SPLIT_SLICE, BatchWriter
from streamd.pipeline.envelope import split_entries
from streamd.pipeline.sink import COPY_SLICE, encode_copy_chunks, encode_copy_parts


def entries(n: int, start: int = 0) -> list[list[object]]:
    out: list[list[object]] = []
    for i in range(start, start + n):
        fields = [b"type", b"t", b"data", b'{"i": %d}' % i]
        if i % 97 == 0:
            fields = [b"data", b"{}"]  # no type: a rejection, in its place in stream order
        out.append([f"1700000000000-{i}".encode(), fields])
    return out


def test_sliced_parse_equals_one_pass() -> None:
    raw = entries(3 * SPLIT_SLICE + 7)
    writer = BatchWriter(Settings(), pool=None, sink=None)  # type: ignore[arg-type]
    rows, rejects = asyncio.run(writer._split(raw))  # type: ignore[arg-type]
    assert (rows, rejects) == split_entries(raw, Settings().max_event_bytes)  # type: ignore[arg-type]
    assert rejects and len(rows) + len(rejects) == len(raw)


def test_sliced_copy_stream_equals_one_pass() -> None:
    parts = []
    for k, n in enumerate((1, COPY_SLICE - 1, 2 * COPY_SLICE + 5, 0, 3)):
        rows, _ = split_entries(entries(n, start=k * 10_000), 1 << 20)  # type: ignore[arg-type]
        parts.append((b"\x00\x07" + bytes([k]), rows))

    async def chunks(with_ids: bool) -> list[bytes]:
        return [c async for c in encode_copy_chunks(parts, with_ids)]

    for with_ids in (False, True):
        got = asyncio.run(chunks(with_ids))
        assert b"".join(got) == bytes(encode_copy_parts(parts, with_ids))
        assert len(got) > 2  # it did come in slices
