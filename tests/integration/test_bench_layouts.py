"""bench/layouts.py's candidates on the suite's Postgres: each table takes the COPY the bench
encodes for it, every row whole (its payload the JSON that was sent, under jsonb or json),
so the CPU figures it prints are those of real, complete inserts. Speed is never asserted."""

from __future__ import annotations

import asyncpg
import orjson
import pytest

from bench import layouts
from streamd.config.settings import Settings


@pytest.mark.parametrize("candidate", layouts.CANDIDATES, ids=lambda c: c.name)
async def test_each_layout_takes_its_copy_whole(
    settings: Settings, candidate: layouts.Candidate
) -> None:
    conn = await asyncpg.connect(settings.postgres_dsn)
    table = "layout_check"
    try:
        icu = await conn.fetchval("SELECT count(*) FROM pg_collation WHERE collname = 'und-x-icu'")
        if "ICU" in candidate.name and not icu:
            pytest.skip("this Postgres was built without ICU")
        await conn.execute(f"DROP TABLE IF EXISTS {table}")
        await conn.execute(candidate.ddl.format(t=table))
        for buffer in layouts.encode(candidate, 0, 2500):  # two statements
            await conn.copy_to_table(
                table,
                source=memoryview(buffer),
                columns=layouts.columns_of(candidate),
                format="binary",
            )
        rows = await conn.fetch(
            f"SELECT payload::text AS payload FROM {table} ORDER BY payload->>'user_id'"
        )
        assert len(rows) == 2500
        first = orjson.loads(rows[0]["payload"])
        assert first["currency"] == "EUR" and first["items"] == [1, 2, 3]
        kind = await conn.fetchval(
            "SELECT format_type(atttypid, atttypmod) FROM pg_attribute"
            " WHERE attrelid = $1::regclass AND attname = 'payload'",
            table,
        )
        assert kind == candidate.payload
    finally:
        await conn.execute(f"DROP TABLE IF EXISTS {table}")
        await conn.close()
