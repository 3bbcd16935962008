"""Typed tables in tests: a config file with an upsert section, and the fold of a stream that the
table must equal (the latest entry per key by position; a delete leaves no row)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import orjson

from tests.support.helpers import pg_fetch, redis_client

ORDERS_TOML = """
[tables.orders]
streams = ["orders"]
mode = "upsert"
key = ["order_id"]
delete_types = ["order_deleted"]
columns = { order_id = "text", status = "text", amount = "numeric" }
"""


def orders_config(path: Path, extra: str = "") -> Path:
    path.write_text(f'stream = "orders"\n{extra}\n{ORDERS_TOML}')
    return path


def entry_position(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq)


def fold(entries: Iterable[tuple[str, str, dict[str, Any]]]) -> dict[str, tuple[str, str]]:
    """(entry_id, type, data) in any order -> {order_id: (status, entry_id)} of the orders table."""
    latest: dict[str, tuple[tuple[int, int], str, dict[str, Any], str]] = {}
    for entry_id, event_type, data in entries:
        key = data["order_id"]
        position = entry_position(entry_id)
        if key not in latest or latest[key][0] < position:
            latest[key] = (position, event_type, data, entry_id)
    return {
        key: (data["status"], entry_id)
        for key, (_, event_type, data, entry_id) in latest.items()
        if event_type != "order_deleted"
    }


def orders_table(dsn: str) -> dict[str, tuple[str, str]]:
    return {
        r["order_id"]: (r["status"], r["entry_id"]) for r in pg_fetch(dsn, "SELECT * FROM orders")
    }


def update(order_id: str, status: str) -> dict[str, Any]:
    return {"type": "order_updated", "data": orjson.dumps({"order_id": order_id, "status": status})}


def deletion(order_id: str) -> dict[str, Any]:
    return {"type": "order_deleted", "data": orjson.dumps({"order_id": order_id})}


def decoded(entries: Iterable[tuple[str, dict[str, Any]]]) -> list[tuple[str, str, dict[str, Any]]]:
    """(entry_id, fields as given to XADD) -> (entry_id, type, data) for fold()."""
    return [(i, f["type"], orjson.loads(f["data"])) for i, f in entries]


def drained(url: str, stream: str, group: str = "streamd") -> bool:
    """Every entry of the stream delivered to the group and acknowledged (lag 0, pending 0)."""
    with redis_client(url) as r:
        groups = {g["name"].decode(): g for g in r.xinfo_groups(stream)}
    found = groups.get(group)
    return found is not None and found["lag"] == 0 and found["pending"] == 0


def fold_streams(
    entries: Iterable[tuple[str, str, str, dict[str, Any]]],
) -> dict[str, tuple[str, str, str]]:
    """(stream, entry_id, type, data) of several streams -> {order_id: (status, stream,
    entry_id)}: the latest by position, the entry ID's two numbers and then the stream's name."""
    latest: dict[str, tuple[tuple[int, int, str], str, dict[str, Any], str, str]] = {}
    for stream, entry_id, event_type, data in entries:
        key = data["order_id"]
        position = (*entry_position(entry_id), stream)
        if key not in latest or latest[key][0] < position:
            latest[key] = (position, event_type, data, stream, entry_id)
    return {
        key: (data["status"], stream, entry_id)
        for key, (_, event_type, data, stream, entry_id) in latest.items()
        if event_type != "order_deleted"
    }
