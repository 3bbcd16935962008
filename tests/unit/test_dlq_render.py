"""`streamd dlq list`'s table: every column lines up, whatever the width of the values (entry IDs
with long sequence numbers, large table ids)."""

from __future__ import annotations

import datetime as dt

from streamd.config.settings import Settings
from streamd.tools.dlq_admin import DeadLetter, render_list

LONGEST_ID = "18446744073709551615-18446744073709551615"  # both parts at their maximum


def letter(id_: int, entry_id: str, deliveries: int = 1) -> DeadLetter:
    return DeadLetter(
        id=id_,
        stream="events",
        entry_id=entry_id,
        event_type="order_placed",
        reason="invalid_json",
        error="data: not JSON",
        deliveries=deliveries,
        failed_at=dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC),
        fields={},
    )


def test_columns_line_up_with_long_entry_ids_and_ids() -> None:
    letters = [
        letter(9_223_372_036_854_775_807, LONGEST_ID, deliveries=123_456),
        letter(2, "1700000000000-12345678901"),
        letter(1, "1-0"),
    ]
    lines = render_list(letters, 3, 3, Settings()).splitlines()
    header, rows = lines[1], lines[2:]
    for row in rows:
        # Each column's text starts where its title starts (numbers end where theirs ends).
        for title, value in (("TYPE", "order_placed"), ("REASON", "invalid_json")):
            assert row.index(value) == header.index(title), (header, row)
        assert row.index("2026-01-02") == header.index("FAILED AT")
        assert row.index("data: not JSON") == header.index("ERROR")
    assert LONGEST_ID in rows[0] and "9223372036854775807" in rows[0]
    assert rows[2].split()[0] == "1" and rows[2].split()[3] == "1-0"
    id_end = header.index("ID") + len("ID")
    assert all(row[:id_end].strip().isdigit() for row in rows)  # right-aligned under ID
