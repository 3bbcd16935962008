"""`streamd dlq list|replay|purge` against real Redis, Postgres and a real `streamd serve` that
produces the dead letters: exact re-queue of the original fields, re-drive after a fix, no double
re-queue after an interrupted replay, confirmation rules, purge by age."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import pty
import select
import subprocess
import sys
import time
from collections.abc import Callable

import orjson
import pytest

from streamd.backends.connections import postgres_connect, redis_client
from streamd.config.settings import Settings
from streamd.tools.dlq_admin import DeadLetters, parse_before
from tests.support.helpers import (
    ServeProcess,
    count_rows,
    event,
    pg_execute,
    pg_fetch,
    wait_until,
    xadd,
    xlen,
)
from tests.support.helpers import (
    redis_client as sync_redis,
)
from tests.support.streamd_cli import explain, run_streamd

pytestmark = pytest.mark.timeout(120)

BINARY = b"\xff\xfe raw \x00 bytes"


def make_dead_letters(settings: Settings, serve: ServeProcess) -> list[str]:
    """Three dead letters made by a real serve, which is then stopped: an entry without type,
    one with invalid JSON, one with a binary extra field. Returns their entry IDs."""
    serve.wait_ready(1)
    url = settings.redis_url
    ids = xadd(url, [{"data": '{"a": 1}'}])
    ids += xadd(url, [{"type": "order_placed", "data": "{not json"}])
    ids += xadd(url, [{"type": "t", "data": "[", "blob": BINARY}])
    xadd(url, [event("fine", {"ok": True})])
    dsn = settings.postgres_dsn
    wait_until(lambda: count_rows(dsn, settings.dlq_table, missing_ok=True) == 3, timeout=30)
    wait_until(lambda: xlen(url, settings.dead_stream) == 3, timeout=30)
    assert serve.terminate() == 0
    return ids


def dlq_rows(settings: Settings) -> list[dict[str, object]]:
    rows = pg_fetch(settings.postgres_dsn, "SELECT * FROM dead_letter_queue ORDER BY id")
    return [dict(r) for r in rows]


def stream_entries(settings: Settings, stream: str) -> list[tuple[str, list[bytes]]]:
    """Entry IDs and flat field lists, in the order Redis keeps them."""
    with sync_redis(settings.redis_url) as r:
        reply = r.xrange(stream)
    return [(i.decode(), [x for pair in fields.items() for x in pair]) for i, fields in reply]


def test_list_shows_the_table_and_the_stream(
    env: dict[str, str], settings: Settings, start_serve: Callable[..., ServeProcess]
) -> None:
    ids = make_dead_letters(settings, start_serve())
    result = run_streamd(env, "dlq", "list")
    assert result.returncode == 0, explain(result)
    lines = result.stdout.splitlines()
    assert lines[0] == (
        "Dead letters of stream events: 3 in table dead_letter_queue, 3 in stream events:dead"
    )
    assert "REASON" in lines[1]
    assert ids[2] in lines[2] and ids[0] in lines[4]  # newest first
    assert "missing_type" in lines[4] and "invalid_json" in lines[3]

    as_json = run_streamd(env, "dlq", "list", "--json", "--limit", "2")
    assert as_json.returncode == 0, explain(as_json)
    listing = orjson.loads(as_json.stdout)
    assert (listing["count"], listing["stream_length"]) == (3, 3)
    assert [e["entry_id"] for e in listing["entries"]] == [ids[2], ids[1]]
    assert listing["entries"][1]["fields"] == {"type": "order_placed", "data": "{not json"}
    assert listing["entries"][1]["reason"] == "invalid_json"


def test_replay_requeues_the_exact_original_entry_then_removes_it(
    env: dict[str, str], settings: Settings, start_serve: Callable[..., ServeProcess]
) -> None:
    ids = make_dead_letters(settings, start_serve())
    before = set(dict(stream_entries(settings, settings.stream)))
    binary_row = next(r for r in dlq_rows(settings) if r["entry_id"] == ids[2])
    result = run_streamd(env, "dlq", "replay", "--id", str(binary_row["id"]), "--yes")
    assert result.returncode == 0, explain(result)
    assert "Replayed 1 dead letter(s) to stream events." in result.stdout
    added = {i: f for i, f in stream_entries(settings, settings.stream) if i not in before}
    (fields,) = added.values()
    # Byte for byte; type and data first (the consumer's fast layout), the rest after.
    assert fields == [b"type", b"t", b"data", b"[", b"blob", BINARY]
    assert ids[2] not in {r["entry_id"] for r in dlq_rows(settings)}
    dead = stream_entries(settings, settings.dead_stream)
    assert len(dead) == 2 and all(ids[2].encode() not in f for _, f in dead)
    with sync_redis(settings.redis_url) as r:
        assert r.hlen(f"{settings.dead_stream}:replayed") == 0

    by_entry = run_streamd(env, "dlq", "replay", "--id", ids[0], "--yes")  # an entry ID works too
    assert by_entry.returncode == 0, explain(by_entry)
    assert len(dlq_rows(settings)) == 1


def test_replay_all_redrives_after_the_cause_is_fixed(
    env: dict[str, str], settings: Settings, start_serve: Callable[..., ServeProcess]
) -> None:
    """Events too big for max_event_bytes are dead letters; raise the limit, replay, ingested."""
    small = {**env, "STREAMD_MAX_EVENT_BYTES": "50"}
    serve = start_serve(environ=small)
    serve.wait_ready(1)
    xadd(settings.redis_url, [event("big", {"blob": "x" * 100, "i": i}) for i in range(5)])
    dsn = settings.postgres_dsn
    wait_until(lambda: count_rows(dsn, "dead_letter_queue", missing_ok=True) == 5, timeout=30)
    assert serve.terminate() == 0

    fixed = start_serve()  # default max_event_bytes: 1 MiB
    fixed.wait_ready(1)
    result = run_streamd(env, "dlq", "replay", "--all", "--yes")
    assert result.returncode == 0, explain(result)
    assert "Replayed 5 dead letter(s)" in result.stdout
    wait_until(lambda: count_rows(dsn) == 5, timeout=30)
    rows = pg_fetch(dsn, "SELECT payload FROM events WHERE event_type = 'big' ORDER BY entry_id")
    assert sorted(orjson.loads(r["payload"])["i"] for r in rows) == [0, 1, 2, 3, 4]
    assert count_rows(dsn, "dead_letter_queue") == 0
    assert xlen(settings.redis_url, settings.dead_stream) == 0


async def test_an_interrupted_replay_never_requeues_twice(
    env: dict[str, str], settings: Settings, start_serve: Callable[..., ServeProcess]
) -> None:
    ids = await asyncio.to_thread(make_dead_letters, settings, start_serve())
    conn = await postgres_connect(settings)
    client = redis_client(settings)
    try:
        dlq = DeadLetters(settings, conn, client)
        (letter,) = await dlq.select([ids[1]])
        first_id, now = await dlq.requeue(letter, [])  # ...and the replay crashes right here
        assert now
    finally:
        await client.aclose()
        await conn.close()
    result = await asyncio.to_thread(run_streamd, env, "dlq", "replay", "--all", "--yes")
    assert result.returncode == 0, explain(result)
    assert f"{ids[1]} was already re-queued as {first_id}" in result.stdout
    requeued = [
        i for i, f in stream_entries(settings, settings.stream) if b"{not json" in f and i != ids[1]
    ]
    assert requeued == [first_id]  # once, not twice
    assert dlq_rows(settings) == []


def test_destructive_commands_refuse_without_yes_when_not_interactive(
    env: dict[str, str], settings: Settings, start_serve: Callable[..., ServeProcess]
) -> None:
    make_dead_letters(settings, start_serve())
    for args in (["replay", "--all"], ["purge"], ["purge", "--before", "1h"]):
        result = run_streamd(env, "dlq", *args)
        assert result.returncode == 2, explain(result)
        assert "Refusing without --yes" in result.stderr
    assert len(dlq_rows(settings)) == 3
    assert xlen(settings.redis_url, settings.dead_stream) == 3


def test_usage_errors(env: dict[str, str], settings: Settings) -> None:
    no_table = run_streamd(env, "dlq", "list")
    assert no_table.returncode == 2 and "streamd db init" in no_table.stderr, explain(no_table)
    assert run_streamd(env, "db", "init").returncode == 0
    neither = run_streamd(env, "dlq", "replay", "--yes")
    assert neither.returncode == 2 and "--id ID" in neither.stderr
    unknown = run_streamd(env, "dlq", "replay", "--id", "12345", "--yes")
    assert unknown.returncode == 2 and "no dead letter" in unknown.stderr
    bad_time = run_streamd(env, "dlq", "purge", "--before", "last tuesday", "--yes")
    assert bad_time.returncode == 2 and "--before" in bad_time.stderr
    empty = run_streamd(env, "dlq", "replay", "--all")
    assert empty.returncode == 0 and "No dead letters to replay." in empty.stdout


def test_purge_before_keeps_the_newer_ones(
    env: dict[str, str], settings: Settings, start_serve: Callable[..., ServeProcess]
) -> None:
    ids = make_dead_letters(settings, start_serve())
    pg_execute(
        settings.postgres_dsn,
        "UPDATE dead_letter_queue SET failed_at = now() - interval '10 days' WHERE entry_id = $1",
        ids[0],
    )
    result = run_streamd(env, "dlq", "purge", "--before", "7d", "--yes")
    assert result.returncode == 0, explain(result)
    assert "Purged 1 dead letter(s) from table dead_letter_queue" in result.stdout
    assert {r["entry_id"] for r in dlq_rows(settings)} == {ids[1], ids[2]}
    assert xlen(settings.redis_url, settings.dead_stream) == 3  # its copies are all recent

    everything = run_streamd(env, "dlq", "purge", "--yes")
    assert everything.returncode == 0, explain(everything)
    assert dlq_rows(settings) == []
    assert xlen(settings.redis_url, settings.dead_stream) == 0


def _answer_at_a_terminal(env: dict[str, str], args: list[str], answer: bytes) -> tuple[int, str]:
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamd", *args],
        env=env,
        stdin=follower,
        stdout=follower,
        stderr=follower,
    )
    os.close(follower)
    output = b""
    try:
        deadline = time.monotonic() + 30
        while b"[y/N]" not in output and time.monotonic() < deadline:
            if select.select([leader], [], [], 0.5)[0]:
                output += os.read(leader, 4096)
        os.write(leader, answer + b"\n")
        code = proc.wait(30)
        while select.select([leader], [], [], 0.2)[0]:
            try:
                output += os.read(leader, 4096)
            except OSError:
                break
    finally:
        proc.kill()
        os.close(leader)
    return code, output.decode(errors="replace")


def test_purge_asks_at_a_terminal(
    env: dict[str, str], settings: Settings, start_serve: Callable[..., ServeProcess]
) -> None:
    make_dead_letters(settings, start_serve())
    code, output = _answer_at_a_terminal(env, ["dlq", "purge"], b"n")
    assert code == 1, output
    assert "Delete 3 dead letter(s) of stream events" in output
    assert "aborted; nothing was changed" in output
    assert len(dlq_rows(settings)) == 3
    code, output = _answer_at_a_terminal(env, ["dlq", "purge"], b"y")
    assert code == 0, output
    assert dlq_rows(settings) == []


def test_parse_before() -> None:
    now = dt.datetime(2026, 1, 31, 12, 0, tzinfo=dt.UTC)
    assert parse_before("7d", now) == dt.datetime(2026, 1, 24, 12, 0, tzinfo=dt.UTC)
    assert parse_before("90m", now) == dt.datetime(2026, 1, 31, 10, 30, tzinfo=dt.UTC)
    assert parse_before("2026-01-01T00:00:00Z", now) == dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    local = parse_before("2026-01-01")
    assert local.tzinfo is not None  # a naive time is the machine's local time, made explicit
