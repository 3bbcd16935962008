"""The Producer API against real Redis (and, end to end, a real `streamd serve`): the exact
envelope, validation before anything is sent, batches in one round trip, backpressure, the sync
wrapper, and `streamd produce`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from streamd import BacklogFull, InvalidEvent, Producer, SyncProducer
from streamd.backends.redis_groups import ensure_group
from streamd.config.settings import Settings
from streamd.dev.servers import RedisServer
from streamd.tools.samples import EVENT_TYPES, SampleEvents
from tests.support.helpers import (
    ServeProcess,
    async_wait_until,
    count_rows,
    pg_fetch,
    redis_client,
    xlen,
)
from tests.support.streamd_cli import explain, run_streamd

pytestmark = pytest.mark.timeout(90)


def fields_of(entry: Any) -> dict[bytes, bytes]:
    return dict(entry[1])


async def entries(settings: Settings) -> list[Any]:
    client = aioredis.Redis.from_url(settings.redis_url)
    try:
        return list(await client.xrange(settings.stream))
    finally:
        await client.aclose()


def producer(settings: Settings, **kwargs: Any) -> Producer:
    return Producer(settings.redis_url, stream=settings.stream, **kwargs)


# --- the envelope --------------------------------------------------------------------------


async def test_produce_writes_exactly_type_data_and_ts(settings: Settings) -> None:
    before_ms = time.time_ns() // 1_000_000
    async with producer(settings) as p:
        first = await p.produce("user_created", {"user_id": 1, "email": "a@example.com"})
        ids = await p.produce_batch([("order_placed", {"order_id": 7}), ("order_shipped", [1, 2])])
    after_ms = time.time_ns() // 1_000_000
    got = await entries(settings)
    assert [e[0].decode() for e in got] == [first, *ids]
    for entry in got:
        assert list(entry[1]) == [b"type", b"data", b"ts"]  # exactly the envelope, in order
        assert before_ms <= int(fields_of(entry)[b"ts"]) <= after_ms
    assert fields_of(got[0])[b"type"] == b"user_created"
    assert orjson.loads(fields_of(got[0])[b"data"]) == {"user_id": 1, "email": "a@example.com"}
    assert orjson.loads(fields_of(got[2])[b"data"]) == [1, 2]


async def test_data_may_be_a_dict_a_list_json_text_or_json_bytes(settings: Settings) -> None:
    async with producer(settings) as p:
        await p.produce_batch(
            [("t", {"a": 1}), ("t", [1, "x"]), ("t", '{"b": 2}'), ("t", b'"s"'), ("t", 3.5)]
        )
    data = [fields_of(e)[b"data"] for e in await entries(settings)]
    assert data == [b'{"a":1}', b'[1,"x"]', b'{"b": 2}', b'"s"', b"3.5"]  # text kept as given


async def test_a_big_batch_is_split_into_chunks_and_keeps_its_order(settings: Settings) -> None:
    async with producer(settings, chunk_size=300) as p:
        ids = await p.produce_batch([("t", {"i": i}) for i in range(1000)])
    got = await entries(settings)
    assert [e[0].decode() for e in got] == ids
    assert [orjson.loads(fields_of(e)[b"data"])["i"] for e in got] == list(range(1000))


async def test_the_script_is_loaded_again_after_script_flush(settings: Settings) -> None:
    async with producer(settings) as p:
        await p.produce_batch([("t", {"i": 0})])
        await p.client.script_flush()  # as after a Redis restart without persistence of scripts
        ids = await p.produce_batch([("t", {"i": 1}), ("t", {"i": 2})])
    assert len(ids) == 2
    assert len(await entries(settings)) == 3


# --- validation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("event", "message"),
    [
        (("", {}), "type must not be empty"),
        (("x" * 129, {}), "129 bytes"),
        (("é" * 65, {}), "130 bytes"),  # the limit counts UTF-8 bytes, not characters
        ((None, {}), "type must be a str"),
        (("t\x00", {}), "NUL"),
        (("t", {"x": object()}), "not JSON-serializable"),
        (("t", "not json"), "not valid JSON"),
        (("t", b"\xff\xfe"), "not valid JSON"),
        (("t", {"s": "a\x00b"}), "\\u0000"),
        (("t", '{"s": "\\u0000"}'), "\\u0000"),
        (("t", {"blob": "x" * 2000}), "the limit is 1000"),
        (("just-a-type",), "expected a (type, data) pair"),
    ],
)
async def test_an_invalid_event_fails_the_whole_call_and_nothing_is_sent(
    settings: Settings, event: Any, message: str
) -> None:
    async with producer(settings, max_data_bytes=1000) as p:
        with pytest.raises(InvalidEvent, match="event 1: .*" + _escape(message)):
            await p.produce_batch([("ok", {"fine": True}), event, ("ok", {})])
        if len(event) == 2:
            with pytest.raises(InvalidEvent, match=_escape(message)):
                await p.produce(*event)
    assert await entries(settings) == []


def _escape(text: str) -> str:
    import re

    return re.escape(text)


async def test_the_limits_themselves_are_accepted(settings: Settings) -> None:
    async with producer(settings, max_data_bytes=1000) as p:
        await p.produce("x" * 128, {"blob": "y" * 980})
        await p.produce("t", '{"s": "\\\\u0000 is fine when its backslash is escaped"}')
    assert len(await entries(settings)) == 2


# --- backpressure --------------------------------------------------------------------------


async def _consume(settings: Settings, count: int) -> None:
    """Act as the consumer group: read and acknowledge `count` entries."""
    client = aioredis.Redis.from_url(settings.redis_url)
    try:
        reply = await client.xreadgroup(settings.group, "test", {settings.stream: ">"}, count=count)
        ids = [entry[0] for entry in reply[0][1]] if reply else []
        if ids:
            await client.xack(settings.stream, settings.group, *ids)
    finally:
        await client.aclose()


async def _make_group(settings: Settings) -> None:
    client = aioredis.Redis.from_url(settings.redis_url)
    try:
        await ensure_group(client, settings.stream, settings.group)
    finally:
        await client.aclose()


async def test_backpressure_times_out_with_a_clear_error_and_writes_nothing(
    settings: Settings,
) -> None:
    await _make_group(settings)
    async with producer(settings, max_backlog=50, backlog_timeout_s=0.5) as p:
        await p.produce_batch([("t", {"i": i}) for i in range(50)])
        assert await p.backlog() == 50
        started = time.monotonic()
        with pytest.raises(BacklogFull, match="max_backlog 50") as caught:
            await p.produce("t", {"i": 50})
        assert time.monotonic() - started >= 0.4  # it waited before giving up
        assert caught.value.backlog == 50
        with pytest.raises(BacklogFull):
            await p.produce_batch([("t", {"i": 51})])
    assert len(await entries(settings)) == 50  # nothing dropped silently, nothing extra written


async def test_backpressure_waits_until_the_consumers_catch_up(settings: Settings) -> None:
    await _make_group(settings)
    async with producer(settings, max_backlog=50, backlog_timeout_s=30) as p:
        await p.produce_batch([("t", {"i": i}) for i in range(50)])
        blocked = asyncio.create_task(p.produce_batch([("t", {"i": 50})]))
        await asyncio.sleep(0.3)  # a negative: give it time to (wrongly) go through
        assert not blocked.done()
        assert len(await entries(settings)) == 50
        await _consume(settings, 10)  # the backlog falls to 40
        ids = await asyncio.wait_for(blocked, timeout=10)
    assert len(ids) == 1
    assert len(await entries(settings)) == 51


async def test_backlog_is_the_group_lag_not_the_stream_length(settings: Settings) -> None:
    await _make_group(settings)
    async with producer(settings, max_backlog=50, backlog_timeout_s=0.5) as p:
        await p.produce_batch([("t", {"i": i}) for i in range(50)])
        await _consume(settings, 50)  # consumed and acknowledged, but still in the stream
        assert await p.backlog() == 0
        await p.produce_batch([("t", {"i": i}) for i in range(50, 100)])
    assert len(await entries(settings)) == 100


async def test_without_a_group_the_backlog_is_the_stream_length(settings: Settings) -> None:
    async with producer(settings, group=None, max_backlog=20, backlog_timeout_s=0.3) as p:
        await p.produce_batch([("t", {})] * 20)
        with pytest.raises(BacklogFull):
            await p.produce("t", {})
        await p.client.xtrim(settings.stream, maxlen=0)
        await p.produce("t", {})


async def test_many_calls_between_checks_cannot_overshoot_by_more_than_one_call(
    settings: Settings,
) -> None:
    """Between measurements the producer counts what it sent itself, so a fast loop of small
    calls cannot run far past max_backlog on a stale measurement."""
    await _make_group(settings)
    async with producer(
        settings, max_backlog=100, backlog_timeout_s=0.3, backlog_check_interval_s=60
    ) as p:
        with pytest.raises(BacklogFull):
            for _ in range(200):
                await p.produce_batch([("t", {})] * 7)
    assert 100 <= len(await entries(settings)) < 100 + 7


# --- the sync wrapper ----------------------------------------------------------------------


def test_sync_producer(settings: Settings) -> None:
    with SyncProducer.from_settings(settings, max_backlog=None) as p:
        first = p.produce("user_created", {"user_id": 1})
        more = p.produce_batch([("order_placed", {"order_id": i}) for i in range(10)])
        with pytest.raises(InvalidEvent):
            p.produce("", {})
        assert p.backlog() == 11
    assert len(more) == 10
    assert first < more[0]
    assert xlen(settings.redis_url, settings.stream) == 11


# --- end to end, with serve ----------------------------------------------------------------


async def test_the_readme_example_is_ingested_by_serve(
    settings: Settings, start_serve: Callable[..., ServeProcess]
) -> None:
    serve = start_serve()
    await asyncio.to_thread(serve.wait_ready, 1)
    async with Producer(settings.redis_url, stream="events", max_backlog=1000) as p:
        await p.produce("user_created", {"user_id": 123, "email": "user@example.com"})
        await p.produce_batch(
            [
                ("order_placed", {"order_id": "ORD-123", "amount": 99.99}),
                ("payment_processed", {"txn_id": "TXN-456"}),
            ]
        )
    dsn = settings.postgres_dsn
    await async_wait_until(lambda: count_rows(dsn, missing_ok=True) == 3, timeout=30)
    rows = pg_fetch(
        dsn,
        "SELECT event_type, payload, (extract(epoch FROM produced_at) * 1000)::bigint AS ms "
        "FROM events ORDER BY entry_id",
    )
    assert [r["event_type"] for r in rows] == ["user_created", "order_placed", "payment_processed"]
    assert orjson.loads(rows[1]["payload"]) == {"order_id": "ORD-123", "amount": 99.99}
    stream = {e[0].decode(): fields_of(e) for e in await entries(settings)}
    produced_ms = sorted(int(f[b"ts"]) for f in stream.values())
    assert [r["ms"] for r in rows] == produced_ms  # produced_at is the producer's ts


async def test_backpressure_against_a_running_serve_loses_nothing(
    make_settings: Callable[..., Settings], start_serve: Callable[..., ServeProcess]
) -> None:
    settings = make_settings(batch_size=50)
    serve = start_serve("--batch-size", "50")
    await asyncio.to_thread(serve.wait_ready, 1)
    samples = SampleEvents(seed=3)
    async with Producer.from_settings(settings, max_backlog=200, backlog_timeout_s=30) as p:
        for _ in range(20):
            await p.produce_batch(samples.batch(100))
    dsn = settings.postgres_dsn
    await async_wait_until(lambda: count_rows(dsn) == 2000, timeout=60)
    assert count_rows(dsn) == 2000


# --- streamd produce -----------------------------------------------------------------------


def test_produce_command_writes_sample_events_with_progress(env: dict[str, str]) -> None:
    result = run_streamd(env, "produce", "2500", "--batch", "200")
    assert result.returncode == 0, explain(result)
    lines = result.stdout.splitlines()
    assert "Produced 1000 events..." in lines
    assert "Produced 2000 events..." in lines
    assert lines[-1].startswith("Completed: 2500 total events produced")
    url = env["STREAMD_REDIS_URL"]
    assert xlen(url) == 2500


def test_produce_command_sample_payloads(settings: Settings, env: dict[str, str]) -> None:
    result = run_streamd(env, "produce", "500")
    assert result.returncode == 0, explain(result)
    got = asyncio.run(entries(settings))
    types = {fields_of(e)[b"type"].decode() for e in got}
    assert types == set(EVENT_TYPES)
    sizes = [len(fields_of(e)[b"data"]) for e in got]
    assert 90 <= sum(sizes) / len(sizes) <= 160  # realistic, ~125 bytes
    one = run_streamd(env, "produce", "10", "--type", "order_shipped")
    assert one.returncode == 0, explain(one)
    last = asyncio.run(entries(settings))[-10:]
    assert {fields_of(e)[b"type"] for e in last} == {b"order_shipped"}


def test_produce_command_keeps_the_rate(env: dict[str, str]) -> None:
    started = time.monotonic()
    result = run_streamd(env, "produce", "300", "--rate", "100")
    elapsed = time.monotonic() - started
    assert result.returncode == 0, explain(result)
    assert xlen(env["STREAMD_REDIS_URL"]) == 300
    # Event i is due at (i + 1) / rate: 300 events at 100/s cannot finish before 3 s.
    assert elapsed >= 2.9
    assert "at 100 events/sec" in result.stdout


def test_produce_command_fails_clearly(env: dict[str, str]) -> None:
    bad_type = run_streamd(env, "produce", "5", "--type", "nope")
    assert bad_type.returncode == 2, explain(bad_type)
    assert "not a sample type" in bad_type.stderr
    down = run_streamd({**env, "STREAMD_REDIS_URL": "redis://127.0.0.1:1/0"}, "produce", "5")
    assert down.returncode == 69, explain(down)
    assert "cannot produce" in down.stderr
    assert "Traceback" not in down.stderr


def test_produce_command_stops_at_max_backlog(env: dict[str, str]) -> None:
    """Nobody consumes (no group even: the stream's length is the backlog), so produce fills
    the stream up to max_backlog, waits backlog_timeout_s, and fails without dropping events."""
    limited = {**env, "STREAMD_MAX_BACKLOG": "100", "STREAMD_BACKLOG_TIMEOUT_S": "0.5"}
    result = run_streamd(limited, "produce", "1000", "--batch", "50")
    assert result.returncode == 1, explain(result)
    assert "max_backlog 100" in result.stderr
    assert "Traceback" not in result.stderr
    written = xlen(env["STREAMD_REDIS_URL"])
    assert 100 <= written < 150  # at most one call past the limit
    assert f"streamd: error: {written} of 1000 events written, then:" in result.stderr


def test_produce_command_says_how_many_were_written_when_redis_refuses_a_batch(
    env: dict[str, str], make_redis: Callable[..., RedisServer]
) -> None:
    """maxmemory with noeviction: Redis refuses the batch that finds memory full, after many
    were written. The one line says how many (they are in the stream), not "nothing"."""
    redis_server = make_redis()
    with redis_client(redis_server.url) as r:
        used = int(r.info("memory")["used_memory"])
        r.config_set("maxmemory", used + (4 << 20))
        r.config_set("maxmemory-policy", "noeviction")
    result = run_streamd(
        {**env, "STREAMD_REDIS_URL": redis_server.url, "STREAMD_MAX_BACKLOG": "0"},
        "produce",
        "100000",
    )
    assert result.returncode == 1, explain(result)
    error = result.stderr.strip()
    assert len(error.splitlines()) == 1 and "Traceback" not in error, explain(result)
    written = xlen(redis_server.url)
    assert 0 < written < 100_000
    assert error.startswith(f"streamd: error: {written} of 100000 events written, then:")
    assert "maxmemory" in error and "nothing of this call was written" in error
