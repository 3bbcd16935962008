"""State changed underneath a running serve, while its consumers are blocked in XREADGROUP: the
group destroyed, its position set, the stream deleted, the whole Redis flushed. No crash, no
traceback, no restart; a log line names what happened, ingest resumes, and every event is in
Postgres exactly once."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from streamd.dev.servers import RedisServer
from streamd.worker.group_watch import GroupWatch, Moved, Position, position_change
from tests.support.helpers import (
    ServeProcess,
    count_rows,
    event,
    pending_count,
    pg_fetchval,
    redis_client,
    wait_until,
    xadd,
)

pytestmark = pytest.mark.timeout(90)
# Debug: the tests count batch_flushed lines (their duplicates), which are debug lines.
FAST = {
    "STREAMD_REAPER_INTERVAL_S": "0.2",
    "STREAMD_BLOCK_MS": "2000",
    "STREAMD_LOG_LEVEL": "debug",
}
# A deleted stream is noticed by whichever looks first: a blocked read (UNBLOCKED) or the
# reaper's XINFO (no such key). Both causes say the stream is gone.
STREAM_DELETED = ("the stream was deleted", "the stream does not exist (deleted)")


def produce(url: str, first: int, n: int) -> list[str]:
    return xadd(url, [event("t", {"i": i}) for i in range(first, first + n)])


def settle(serve: ServeProcess, url: str, dsn: str, rows: int) -> None:
    wait_until(lambda: count_rows(dsn) == rows, timeout=30, message=serve.tail(20))
    wait_until(lambda: pending_count(url) == 0, timeout=20, message=serve.tail(20))
    assert pg_fetchval(dsn, "SELECT count(DISTINCT entry_id) FROM events") == rows


def assert_calm(serve: ServeProcess) -> None:
    assert "Traceback" not in serve.output(), serve.tail(40)
    assert not serve.events("child_exited"), serve.tail(40)
    assert not serve.events("worker_task_failed"), serve.tail(40)


def started(
    env: dict[str, str], start: Callable[..., ServeProcess], **settings: str
) -> ServeProcess:
    serve = start("--tasks", "3", environ=env | FAST | settings)
    serve.wait_ready()
    return serve


@pytest.mark.parametrize(
    ("operation", "cause"),
    [
        (("XGROUP", "DESTROY", "events", "streamd"), "the consumer group was destroyed"),
        (("DEL", "events"), STREAM_DELETED),
    ],
    ids=["xgroup-destroy", "del"],
)
def test_group_or_stream_gone_under_blocked_consumers(
    operation: tuple[str, ...],
    cause: str | tuple[str, ...],
    env: dict[str, str],
    start_serve: Callable[..., ServeProcess],
) -> None:
    url, dsn = env["STREAMD_REDIS_URL"], env["STREAMD_POSTGRES_DSN"]
    serve = started(env, start_serve)
    produce(url, 0, 200)
    settle(serve, url, dsn, 200)
    with redis_client(url) as r:
        r.execute_command(*operation)  # the consumers are blocked in XREADGROUP now
    (recreated,) = wait_until(lambda: serve.events("group_recreated"), timeout=10)
    assert recreated["stream"] == "events" and recreated["group"] == "streamd"
    assert recreated["cause"].startswith(cause), recreated
    produce(url, 200, 200)
    # After XGROUP DESTROY the new group re-reads the stream: those rows are skipped.
    settle(serve, url, dsn, 400)
    assert count_rows(dsn, "dead_letter_queue") == 0
    assert_calm(serve)
    assert serve.terminate() == 0


def test_flushall_under_blocked_consumers(
    env: dict[str, str],
    make_redis: Callable[..., RedisServer],
    start_serve: Callable[..., ServeProcess],
) -> None:
    redis_server = make_redis()  # FLUSHALL: a Redis of this test's own
    url, dsn = redis_server.url, env["STREAMD_POSTGRES_DSN"]
    serve = started(env | {"STREAMD_REDIS_URL": url}, start_serve)
    produce(url, 0, 100)
    settle(serve, url, dsn, 100)
    with redis_client(url) as r:
        r.flushall()
    (recreated,) = wait_until(lambda: serve.events("group_recreated"), timeout=10)
    assert recreated["cause"].startswith(STREAM_DELETED), recreated
    produce(url, 100, 100)
    settle(serve, url, dsn, 200)
    assert_calm(serve)
    assert serve.terminate() == 0


# Who sees an XGROUP SETID back first: the reaper's look (the blocked consumers read again only
# after block_ms), or the consumers (entries delivered again before the reaper's next round).
# Either way the line is the same. Trimming is off: with it, the reaper trims the acknowledged
# entries within reaper_interval_s, and a position set back finds nothing left to deliver again.
SETID_BACK = {
    "reaper-first": {"STREAMD_TRIM": "false"},
    "consumers-first": {
        "STREAMD_TRIM": "false",
        "STREAMD_BLOCK_MS": "100",
        "STREAMD_REAPER_INTERVAL_S": "2",
    },
}


@pytest.mark.parametrize("timing", sorted(SETID_BACK))
def test_xgroup_setid_back_is_logged_and_the_replay_skipped(
    timing: str, env: dict[str, str], start_serve: Callable[..., ServeProcess]
) -> None:
    url, dsn = env["STREAMD_REDIS_URL"], env["STREAMD_POSTGRES_DSN"]
    serve = started(env, start_serve, **SETID_BACK[timing])
    ids = produce(url, 0, 300)
    settle(serve, url, dsn, 300)
    wait_until(lambda: len(serve.events("batch_flushed")) > 0, timeout=5)
    with redis_client(url) as r:
        r.xgroup_setid("events", "streamd", "0")
    moved = wait_until(lambda: serve.events("group_position_moved"), timeout=10)
    assert moved[0]["direction"] == "back" and moved[0]["previous"] == ids[-1]
    # The reaper saw the position set; or the consumers, the first entry delivered again.
    seen = (moved[0]["now"], moved[0]["delivered_again_from"])
    assert seen in (("0-0", None), (None, ids[0])), moved[0]
    produce(url, 300, 100)
    settle(serve, url, dsn, 400)  # the 300 delivered again were skipped
    duplicates = sum(e["duplicates"] for e in serve.events("batch_flushed"))
    assert duplicates == 300
    assert len(serve.events("group_position_moved")) == 1, serve.tail(40)
    assert_calm(serve)
    assert serve.terminate() == 0


def test_position_change_tells_setid_from_consuming() -> None:
    def at(ms: int, read: int | None) -> Position:
        return Position((ms, 0), read)

    assert position_change(at(5, 5), at(9, 9)) is None  # consumed
    assert position_change(at(5, 5), at(5, 5)) is None  # nothing new
    assert position_change(at(5, 5), at(2, None)) == "back"
    assert position_change(at(5, 5), at(9, None)) == "forward"  # SETID over undelivered entries
    assert position_change(at(5, None), at(9, None)) is None  # already unknown: no new news


def test_group_watch_counts_a_delivery_only_against_replies_handled_before_its_read() -> None:
    def look(position: str, read: int | None) -> list[dict[str, object]]:
        return [{"name": "g", "last-delivered-id": position, "entries-read": read}]

    watch = GroupWatch()
    a = b = watch.replies  # two reads in flight; Redis ran a's first
    watch.delivered("s", b"11-0", b"20-0", b)  # b's reply handled first
    watch.delivered("s", b"1-0", b"10-0", a)  # not a move back: a was sent before b's reply
    assert watch.check("s", "g", look("20-0", 20), watch.replies) is None
    sent = watch.replies
    watch.delivered("s", b"1-0", b"5-0", sent)  # after 20-0 was delivered: set back
    watch.delivered("s", b"6-0", b"8-0", sent)  # the same replay, handled out of order
    moved = watch.check("s", "g", look("8-0", None), watch.replies)
    assert moved == Moved("back", (20, 0), None, (1, 0))
    watch.delivered("s", b"9-0", b"12-0", watch.replies)  # the replay goes on: no new move
    assert watch.check("s", "g", look("12-0", None), watch.replies) is None
    watch.delivered("s", b"13-0", b"30-0", watch.replies)
    # A look that finds the position below what was delivered before it was sent.
    assert watch.check("s", "g", look("0-0", None), watch.replies) == Moved("back", (30, 0), (0, 0))


def test_group_watch_a_read_in_flight_during_the_look_is_not_a_second_move() -> None:
    def look(position: str) -> list[dict[str, object]]:
        return [{"name": "g", "last-delivered-id": position, "entries-read": None}]

    watch = GroupWatch()
    watch.delivered("s", b"1-0", b"20-0", watch.replies)
    in_flight = watch.replies  # sent now; Redis runs it after the SETID back, before the look
    moved = watch.check("s", "g", look("5-0"), watch.replies)
    assert moved == Moved("back", (20, 0), (5, 0))
    watch.delivered("s", b"1-0", b"5-0", in_flight)
    assert watch.check("s", "g", look("5-0"), watch.replies) is None
