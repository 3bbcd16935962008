"""kill -9 of a worker while several streams are in flight: the supervisor replaces it, the
reaper adopts what the dead worker held on every stream, and each stream's entries land exactly
once, with nothing left pending anywhere."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from streamd.observability.status_file import read_status_files
from tests.support.helpers import (
    ServeProcess,
    event,
    pending_count,
    pg_fetch,
    pg_fetchval,
    wait_until,
    xadd,
)

pytestmark = pytest.mark.timeout(180)

STREAMS = ("orders", "clicks", "tenant:a", "tenant:b")


def ready_workers(env: dict[str, str], n: int, exclude: set[int] | None = None) -> list[int]:
    def ready() -> list[int] | None:
        found = read_status_files(Path(env["STREAMD_STATE_DIR"]))
        if not found or not found[0]["ready"]:
            return None
        pids = [c["pid"] for c in found[0]["children"] if c["ready"] and not c["retiring"]]
        return pids if len(pids) == n and not set(pids) & (exclude or set()) else None

    return wait_until(ready, timeout=60, interval=0.05, message=f"{n} ready workers")


class MultiLoad:
    """XADDs chunks round-robin over the streams from a thread until stopped."""

    def __init__(self, url: str, chunk: int = 100) -> None:
        self.url, self.chunk = url, chunk
        self.produced = dict.fromkeys(STREAMS, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="multi-load", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for stream in STREAMS:
                n = self.produced[stream]
                xadd(self.url, (event("t", {"i": n + i}) for i in range(self.chunk)), stream)
                self.produced[stream] = n + self.chunk
            self._stop.wait(0.01)

    def __enter__(self) -> MultiLoad:
        self._thread.start()
        return self

    def __exit__(self, *_exc_info: object) -> None:
        self.stop()

    def stop(self) -> dict[str, int]:
        self._stop.set()
        self._thread.join()
        return self.produced


def test_kill_9_with_several_streams_in_flight_every_stream_exactly_once(
    env: dict[str, str], start_serve: Callable[..., ServeProcess]
) -> None:
    url, dsn = env["STREAMD_REDIS_URL"], env["STREAMD_POSTGRES_DSN"]
    env |= {
        "STREAMD_STREAMS": "orders,clicks,tenant:*",
        "STREAMD_TABLES": "tenant:*=tenant_events",
        "STREAMD_CLAIM_MIN_IDLE_MS": "1000",
        "STREAMD_REAPER_INTERVAL_S": "0.2",
        "STREAMD_DISCOVER_INTERVAL_S": "0.5",
        "STREAMD_BATCH_SIZE": "300",
    }
    xadd(url, [event("t", {"i": -1})], "tenant:a")  # so the pattern matches from the start
    xadd(url, [event("t", {"i": -1})], "tenant:b")
    serve = start_serve("--procs", "2", "--tasks", "3")
    serve.wait_ready(2)
    first = ready_workers(env, 2)

    def rows() -> int:
        return int(
            pg_fetchval(
                dsn, "SELECT (SELECT count(*) FROM events) + (SELECT count(*) FROM tenant_events)"
            )
        )

    with MultiLoad(url) as load:
        wait_until(lambda: rows() >= 4000, timeout=60, interval=0.05)
        os.kill(first[0], signal.SIGKILL)
        ready_workers(env, 2, exclude={first[0]})
        before = rows()
        wait_until(lambda: rows() >= before + 2000, timeout=60, interval=0.05)
        produced = load.stop()
    produced["tenant:a"] += 1
    produced["tenant:b"] += 1
    total = sum(produced.values())
    wait_until(lambda: rows() >= total, timeout=90, interval=0.2, message=f"{total} rows")
    for stream in STREAMS:
        wait_until(lambda s=stream: pending_count(url, s) == 0, timeout=30, message=stream)
    assert serve.terminate() == 0
    got = pg_fetch(
        dsn,
        "SELECT stream, count(*) AS n, count(DISTINCT entry_id) AS d FROM "
        "(SELECT stream, entry_id FROM events UNION ALL SELECT stream, entry_id FROM tenant_events)"
        " AS t GROUP BY stream",
    )
    assert {r["stream"]: (r["n"], r["d"]) for r in got} == {s: (n, n) for s, n in produced.items()}
    assert pg_fetchval(dsn, "SELECT count(*) FROM dead_letter_queue") == 0
    assert len(serve.events("child_restarted")) == 1
