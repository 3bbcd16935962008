"""`streamd dlq list|replay|purge` over several streams: every configured stream by default, or
those given with --stream (names or patterns); a replay re-queues each entry to its own stream.
The dead letters are made by real serves, one per stream, into one dead_letter_queue table."""

from __future__ import annotations

from collections.abc import Callable

import orjson
import pytest

from streamd.config.settings import Settings
from tests.support.helpers import ServeProcess, count_rows, pg_fetch, wait_until, xadd, xlen
from tests.support.streamd_cli import explain, run_streamd

pytestmark = pytest.mark.timeout(180)

BAD = {"orders": [{"data": '{"a": 1}'}] * 2, "clicks": [{"type": "click", "data": "{nope"}]}


def wait_dead(dsn: str, url: str, stream: str, rows: int, entries: int) -> None:
    wait_until(lambda: count_rows(dsn, "dead_letter_queue") == rows, timeout=30)
    wait_until(lambda: xlen(url, f"{stream}:dead") == entries, timeout=30)


@pytest.fixture
def dead_letters(
    env: dict[str, str], settings: Settings, start_serve: Callable[..., ServeProcess]
) -> dict[str, str]:
    """Two dead letters of `orders`, one of `clicks`; returns the env naming both streams."""
    url, dsn = settings.redis_url, settings.postgres_dsn
    expected = 0
    for stream, entries in BAD.items():
        serve = start_serve(environ={**env, "STREAMD_STREAM": stream})
        serve.wait_ready(1)
        xadd(url, entries, stream=stream)
        expected += len(entries)
        wait_dead(dsn, url, stream, expected, len(entries))
        assert serve.terminate() == 0
    return {**env, "STREAMD_STREAMS": "orders,clicks"}


def by_stream(settings: Settings) -> dict[str, int]:
    rows = pg_fetch(
        settings.postgres_dsn, "SELECT stream, count(*) AS n FROM dead_letter_queue GROUP BY 1"
    )
    return {r["stream"]: r["n"] for r in rows}


def test_list_covers_every_configured_stream_or_the_one_asked(
    dead_letters: dict[str, str],
) -> None:
    result = run_streamd(dead_letters, "dlq", "list")
    assert result.returncode == 0, explain(result)
    lines = result.stdout.splitlines()
    assert lines[0] == (
        "Dead letters of 2 streams: 3 in table dead_letter_queue, 3 in their dead streams"
    )
    assert "  orders: 2 in the table, 2 in stream orders:dead" in lines
    assert "  clicks: 1 in the table, 1 in stream clicks:dead" in lines
    header = next(line for line in lines if line.startswith("ID") or " ID " in line[:20])
    assert "STREAM" in header
    assert sum(1 for line in lines if " orders " in line) == 2

    one = run_streamd(dead_letters, "dlq", "list", "--stream", "cl*", "--json")
    assert one.returncode == 0, explain(one)
    listing = orjson.loads(one.stdout)
    assert (listing["stream"], listing["count"], listing["stream_length"]) == ("clicks", 1, 1)
    assert [e["stream"] for e in listing["entries"]] == ["clicks"]
    assert listing["streams"] == {
        "clicks": {"count": 1, "stream_length": 1, "dead_stream": "clicks:dead"}
    }

    single = run_streamd(dead_letters, "dlq", "list", "--stream", "orders")
    assert single.stdout.splitlines()[0] == (
        "Dead letters of stream orders: 2 in table dead_letter_queue, 2 in stream orders:dead"
    )


def test_replay_goes_back_into_each_entrys_own_stream(
    dead_letters: dict[str, str], settings: Settings
) -> None:
    url = settings.redis_url
    before = {s: xlen(url, s) for s in BAD}
    result = run_streamd(dead_letters, "dlq", "replay", "--all", "--stream", "orders", "--yes")
    assert result.returncode == 0, explain(result)
    assert "Replayed 2 dead letter(s) to stream orders." in result.stdout
    assert xlen(url, "orders") == before["orders"] + 2
    assert xlen(url, "clicks") == before["clicks"]  # untouched
    assert by_stream(settings) == {"clicks": 1}
    assert (xlen(url, "orders:dead"), xlen(url, "clicks:dead")) == (0, 1)

    everything = run_streamd(dead_letters, "dlq", "replay", "--all", "--yes")
    assert everything.returncode == 0, explain(everything)
    assert "Replayed 1 dead letter(s) to stream clicks." in everything.stdout
    assert xlen(url, "clicks") == before["clicks"] + 1
    assert by_stream(settings) == {}


def test_purge_every_configured_stream(dead_letters: dict[str, str], settings: Settings) -> None:
    url = settings.redis_url
    refused = run_streamd(dead_letters, "dlq", "purge")
    assert refused.returncode == 2, explain(refused)
    assert "Delete 3 dead letter(s) of streams orders, clicks" in refused.stderr
    result = run_streamd(dead_letters, "dlq", "purge", "--yes")
    assert result.returncode == 0, explain(result)
    assert "Purged 3 dead letter(s) from table dead_letter_queue and 3 from streams" in (
        result.stdout
    )
    assert by_stream(settings) == {}
    assert (xlen(url, "orders:dead"), xlen(url, "clicks:dead")) == (0, 0)


def test_a_bad_stream_name_is_a_usage_error(env: dict[str, str]) -> None:
    result = run_streamd(env, "dlq", "list", "--stream", "no spaces")
    assert result.returncode == 2, explain(result)
    assert "--stream 'no spaces'" in result.stderr and "Traceback" not in result.stderr
