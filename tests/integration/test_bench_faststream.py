"""bench/'s FastStream contender (bench/faststream_app.py under `faststream run --workers 2`)
against the suite's real Redis and Postgres: every event of a drain lands once, its two workers
share the group under two names, and a redelivered batch keeps the rows already there. Its speed
is printed by `python -m bench`, never asserted here."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from bench import run
from tests.support.helpers import pg_execute, pg_fetch, redis_client, table_locked, wait_until

pytestmark = pytest.mark.timeout(180)

EVENTS = 2000
START_S = 90  # two spawned workers importing FastStream on a busy 2-core machine


@pytest.fixture
def lab(env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> run.Lab:
    """bench's lab on the test's own Redis database and Postgres database; its files (an empty
    config, a state dir) under tmp_path rather than bench/.work."""
    monkeypatch.setattr(run, "WORK", tmp_path)
    logs = tmp_path / "logs"
    logs.mkdir()
    return run.Lab(env["STREAMD_REDIS_URL"], env["STREAMD_POSTGRES_DSN"], logs)


def drained(lab: run.Lab, n: int) -> bool:
    group = lab.group(run.FASTSTREAM.group)
    return group is not None and int(group["entries-read"] or 0) >= n and group["pending"] == 0


def test_the_faststream_contender_drains_every_event_once(lab: run.Lab) -> None:
    run.drain_once(lab, run.FASTSTREAM, EVENTS, "test")  # it checks the counts too
    assert lab.count() == (EVENTS, EVENTS)
    group = lab.group(run.FASTSTREAM.group)
    assert group is not None and group["pending"] == 0 and group["entries-read"] == EVENTS
    rows = pg_fetch(lab.dsn, "SELECT count(DISTINCT event_type), min(payload->>'seq') FROM events")
    assert (rows[0][0], rows[0][1]) == (5, "0")  # the seed's five types, the payload as JSON


def test_its_two_workers_share_the_group_under_two_names(lab: run.Lab) -> None:
    lab.reset(run.FASTSTREAM.table_sql)
    proc = run.FASTSTREAM.start(lab, "names")
    try:
        # With the table locked, a worker's COPY waits holding its batch: the other worker must
        # read the rest, so both are in the group with a batch each. (Waiting for two consumers
        # on an empty stream does not do: the suite's Redis 7.0 listed none while they blocked.)
        with table_locked(lab.dsn):
            lab.fill(EVENTS)
            wait_until(lambda: held(lab) == [1000, 1000], START_S / 2)
        wait_until(lambda: drained(lab, EVENTS), START_S)
    finally:
        run.stop(proc)
    assert lab.count() == (EVENTS, EVENTS)


def held(lab: run.Lab) -> list[int]:
    """Entries pending per consumer of the FastStream group, smallest first."""
    with redis_client(lab.redis_url) as r:
        try:
            consumers = r.xinfo_consumers("events", run.FASTSTREAM.group)
        except redis.ResponseError:  # no group yet: the app is still starting
            return []
    return sorted(int(c["pending"]) for c in consumers)


def test_a_batch_meeting_rows_already_there_keeps_them_and_adds_the_rest(lab: run.Lab) -> None:
    lab.reset(run.FASTSTREAM.table_sql)
    lab.fill(EVENTS)
    with redis_client(lab.redis_url) as r:
        first = [entry_id.decode() for entry_id, _ in r.xrange("events", count=10)]
    # as a delivery whose XACK was lost left them: in the table, not acknowledged
    for entry_id in first:
        pg_execute(
            lab.dsn,
            "INSERT INTO events (stream, entry_id, event_type, payload, produced_at)"
            " VALUES ('events', $1, 'earlier', '{}', now())",
            entry_id,
        )
    proc = run.FASTSTREAM.start(lab, "conflict")
    try:
        wait_until(lambda: drained(lab, EVENTS), START_S)
    finally:
        run.stop(proc)
    assert lab.count() == (EVENTS, EVENTS)
    earlier = pg_fetch(lab.dsn, "SELECT entry_id FROM events WHERE event_type = 'earlier'")
    assert sorted(r[0] for r in earlier) == sorted(first)
