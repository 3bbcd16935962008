"""Several streams into typed tables through serve's per-table batches: two streams (a pattern)
upserting one table, where entry IDs of the two streams tie and the stream's name decides; a
third stream appending to a typed table; a fourth, unrouted, in the events table."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from tests.support.helpers import (
    ServeProcess,
    count_rows,
    event,
    pg_fetch,
    redis_client,
    wait_until,
)
from tests.support.typed import deletion, drained, fold_streams, update

pytestmark = pytest.mark.timeout(90)

CONFIG = """
streams = ["shop:*", "clicks", "misc"]
discover_interval_s = 0.2

[tables.orders]
streams = ["shop:*"]
mode = "upsert"
key = ["order_id"]
delete_types = ["order_deleted"]
columns = { order_id = "text", status = "text" }

[tables.clicks]
streams = ["clicks"]
columns = { page = "text", ms = { type = "integer", from = "$.timing.ms" } }
"""


def test_streams_routed_into_typed_tables_upsert_and_append_through_per_table_batches(
    env: dict[str, str], tmp_path: Path, start_serve: Callable[..., ServeProcess]
) -> None:
    url, dsn = env["STREAMD_REDIS_URL"], env["STREAMD_POSTGRES_DSN"]
    config = tmp_path / "streamd.toml"
    config.write_text(CONFIG)
    rng = random.Random(7)
    produced = []
    with redis_client(url) as r:
        # Explicit IDs: the two shop streams use the same ones, so positions tie across streams.
        for n in range(1, 301):
            for stream in ("shop:eu", "shop:us"):
                key = f"o{rng.randrange(15)}"
                fields = deletion(key) if rng.random() < 0.15 else update(key, f"{stream}-{n}")
                entry_id = f"1700000000000-{n}"
                r.xadd(stream, fields, id=entry_id)
                data = orjson.loads(fields["data"])
                produced.append((stream, entry_id, str(fields["type"]), data))
        for i in range(50):
            r.xadd("clicks", event("click", {"page": f"/{i}", "timing": {"ms": i}}))
        r.xadd("misc", event("t", {}))
    serve = start_serve(
        "--tasks", "3", environ=env | {"STREAMD_CONFIG": str(config), "STREAMD_BATCH_SIZE": "40"}
    )
    serve.wait_ready()
    for stream in ("shop:eu", "shop:us", "clicks", "misc"):
        wait_until(lambda s=stream: drained(url, s), timeout=30, message=serve.tail(20))
    records = pg_fetch(dsn, "SELECT order_id, status, stream, entry_id FROM orders")
    got = {r["order_id"]: (r["status"], r["stream"], r["entry_id"]) for r in records}
    assert got == fold_streams(produced)
    assert {s for _, s, _ in got.values()} <= {"shop:eu", "shop:us"}
    clicks = pg_fetch(dsn, "SELECT page, ms FROM clicks ORDER BY ms")
    assert [(c["page"], c["ms"]) for c in clicks] == [(f"/{i}", i) for i in range(50)]
    assert count_rows(dsn, "events") == 1  # misc: no section, the events table
    assert count_rows(dsn, "dead_letter_queue") == 0
    assert serve.terminate() == 0
