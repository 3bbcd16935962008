"""The real `streamd serve` as a subprocess, with real signals, against real Redis and Postgres.

Every test ends on what a user cares about: each produced event exactly once in Postgres
(count(*) == count(distinct entry_id) == produced) and nothing left pending in Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from streamd.config.settings import Settings
from streamd.dev.processes import free_port, wait_gone
from streamd.errors import EXIT_CRASH_LOOP
from streamd.observability.status_file import read_status_files
from streamd.supervisor.arbiter import CrashLoopError, Supervisor
from streamd.supervisor.child import (
    MSG_HEARTBEAT,
    MSG_READY,
    WORKER,
    encode_failure,
    metrics_available,
    parse_line,
)
from streamd.supervisor.children import Child
from streamd.supervisor.restarts import RestartPolicy
from streamd.supervisor.systemd import Notifier
from tests.support.helpers import (
    ServeProcess,
    count_rows,
    event,
    pending_count,
    pg_fetch,
    pg_fetchval,
    redis_client,
    wait_until,
    xadd,
    xlen,
)

pytestmark = pytest.mark.timeout(120)

Start = Callable[..., ServeProcess]

# Fast recovery for tests: entries of a dead consumer are reclaimed after 1 s.
FAST = {
    "STREAMD_CLAIM_MIN_IDLE_MS": "1000",
    "STREAMD_REAPER_INTERVAL_S": "0.2",
    "STREAMD_BATCH_SIZE": "200",
    "STREAMD_BATCH_TIMEOUT_S": "0.2",
    "STREAMD_GRACEFUL_TIMEOUT_S": "20",
}


def produce(url: str, n: int, start: int = 0) -> None:
    for first in range(start, start + n, 1000):
        xadd(url, (event("t", {"i": i}) for i in range(first, min(first + 1000, start + n))))


def distinct_rows(dsn: str) -> tuple[int, int]:
    row = pg_fetch(dsn, "SELECT count(*) AS n, count(DISTINCT entry_id) AS d FROM events")[0]
    return int(row["n"]), int(row["d"])


def wait_rows(env: dict[str, str], n: int, timeout: float = 60) -> None:
    dsn = env["STREAMD_POSTGRES_DSN"]
    wait_until(
        lambda: count_rows(dsn, missing_ok=True) >= n,
        timeout=timeout,
        interval=0.1,
        message=f"{n} rows",
    )


def assert_exactly_once(env: dict[str, str], produced: int) -> None:
    assert distinct_rows(env["STREAMD_POSTGRES_DSN"]) == (produced, produced)
    assert pending_count(env["STREAMD_REDIS_URL"]) == 0


def status(env: dict[str, str]) -> dict[str, Any]:
    found = read_status_files(Path(env["STREAMD_STATE_DIR"]))
    assert len(found) == 1, found
    return found[0]


def ready_children(env: dict[str, str], n: int, exclude: Collection[int] = ()) -> list[int]:
    """Wait for the status file to show n ready workers, none of them in `exclude`; their pids."""

    def ready() -> list[int] | None:
        found = read_status_files(Path(env["STREAMD_STATE_DIR"]))
        if not found or not found[0]["ready"]:
            return None
        kids = [c for c in found[0]["children"] if not c["retiring"]]
        pids = [c["pid"] for c in kids if c["ready"]]
        if len(pids) == n == len(kids) and not set(pids) & set(exclude):
            return pids
        return None

    return wait_until(ready, timeout=60, interval=0.05, message=f"{n} ready children")


class Load:
    """A producer that is not streamd: XADDs chunks from a thread until stopped."""

    def __init__(self, url: str, chunk: int = 200, pause_s: float = 0.02) -> None:
        self.url = url
        self.chunk = chunk
        self.pause_s = pause_s
        self.produced = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="load", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            produce(self.url, self.chunk, self.produced)
            self.produced += self.chunk
            self._stop.wait(self.pause_s)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(30)
        return self.produced

    def __exit__(self, *_exc: object) -> None:
        self.stop()


@pytest.fixture
def fast_env(env: dict[str, str]) -> dict[str, str]:
    env.update(FAST)
    return env


# --- the child protocol and supervisor decisions (no fork) ---------------------------------


def test_child_lines_round_trip() -> None:
    assert parse_line(MSG_HEARTBEAT.strip()) == ("hb", 0, "")
    assert parse_line(MSG_READY.strip()) == ("ready", 0, "")
    line = encode_failure(78, "Postgres at x: cannot connect:\n  bad password " + "x" * 5000)
    assert line.endswith(b"\n") and len(line) <= 401  # one atomic pipe write, one line
    what, code, message = parse_line(line.strip())
    assert (what, code) == ("fail", 78)
    assert message.startswith("Postgres at x: cannot connect: bad password xxx")
    assert parse_line(b"garbage") == ("unknown", 0, "")


def unit_supervisor(settings: Settings) -> Supervisor:
    sup = Supervisor(settings, notifier=Notifier({}))
    sup.log = _NullLog()
    return sup


class _NullLog:
    def __getattr__(self, _name: str) -> Callable[..., None]:
        return lambda *_a, **_k: None


def test_signals_dispatch_to_handlers_and_second_sigint_is_fast(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    sent: list[tuple[int, int]] = []
    monkeypatch.setattr(os, "kill", lambda pid, signum: sent.append((pid, signum)))
    sup = unit_supervisor(make_settings(procs=2))
    for pid, index in ((101, 0), (102, 1)):
        sup.children.by_pid[pid] = Child(WORKER, index, pid, -1, sup.settings, 0.0, 0.0, 0.0)
    sup.signals.extend([signal.SIGINT, signal.SIGHUP])
    sup._dispatch_signals()
    assert (sup.state, sup.exit_code, sup.fast) == ("stopping", 0, False)
    assert sent == [(101, signal.SIGTERM), (102, signal.SIGTERM)]  # HUP while stopping: ignored
    assert sup.rollouts.current is None
    sup.signals.append(signal.SIGINT)
    sup._dispatch_signals()
    assert sup.fast and sent[2:] == [(101, signal.SIGQUIT), (102, signal.SIGQUIT)]


def test_crash_loop_counts_crashes_in_the_window_only(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    sup = unit_supervisor(make_settings(crash_loop_max=3, crash_loop_window_s=10))
    assert not sup._crash_loop()
    clock[0] += 11  # the first crash leaves the window
    assert not sup._crash_loop()
    assert not sup._crash_loop()
    assert sup._crash_loop()
    assert sup.exit_code == EXIT_CRASH_LOOP and isinstance(sup.failure, CrashLoopError)


def test_restart_backoff_grows_is_capped_and_jittered(
    make_settings: Callable[..., Settings],
) -> None:
    policy = RestartPolicy(make_settings(restart_backoff_max_s=1.0))
    delays = [policy.schedule((WORKER, 0), time.monotonic()) for _ in range(8)]
    assert policy.next_at() is not None
    assert 0.1 <= delays[0] <= 0.2 + 0.01  # half fixed, half random
    assert delays[2] > delays[0]
    assert all(d <= 1.0 + 0.01 for d in delays)
    assert delays[-1] >= 0.5  # at the cap: between cap/2 and cap


# --- stopping -------------------------------------------------------------------------------


def test_sigterm_with_a_backlog_drains_and_exits_0(
    fast_env: dict[str, str], start_serve: Start
) -> None:
    env = fast_env
    url = env["STREAMD_REDIS_URL"]
    produce(url, 40_000)
    serve = start_serve("--procs", "2", "--tasks", "4", "--batch-size", "100")
    serve.wait_ready(2)
    wait_rows(env, 1)
    sent = time.monotonic()
    serve.send_signal(signal.SIGTERM)
    assert serve.wait(30) == 0
    drain_s = time.monotonic() - sent
    # Whatever was read was committed and acknowledged: nothing is left in hand.
    assert pending_count(url) == 0
    rows = count_rows(env["STREAMD_POSTGRES_DSN"])
    assert serve.events("worker_drained") and not serve.events("worker_drain_incomplete")
    assert not list(Path(env["STREAMD_STATE_DIR"]).glob("serve-*.json"))  # status file removed
    print(f"drain after SIGTERM: {drain_s * 1000:.0f} ms, {rows} of 40000 rows by then")

    # The rest is still in the stream, and the next run takes it from there.
    again = start_serve("--procs", "2")
    again.wait_ready(2)
    wait_rows(env, 40_000)
    assert again.terminate() == 0
    assert_exactly_once(env, 40_000)


def test_sigint_to_the_process_group_drains_once(
    fast_env: dict[str, str], start_serve: Start
) -> None:
    """Ctrl-C in a terminal signals every process of the group: the children ignore it and
    drain once, on the supervisor's SIGTERM."""
    env = fast_env
    serve = start_serve("--procs", "2")
    serve.wait_ready(2)
    with Load(env["STREAMD_REDIS_URL"]) as load:
        wait_rows(env, 1)
        serve.send_signal(signal.SIGINT, group=True)
        assert serve.wait(30) == 0
        produced = load.stop()
    assert len(serve.events("worker_drained")) == 2
    assert not serve.events("worker_stopping_fast")
    assert pending_count(env["STREAMD_REDIS_URL"]) == 0
    again = start_serve()
    again.wait_ready(1)
    wait_rows(env, produced)
    assert again.terminate() == 0
    assert_exactly_once(env, produced)


def test_second_sigint_or_sigquit_stops_fast_and_loses_nothing(
    fast_env: dict[str, str], start_serve: Start
) -> None:
    env = fast_env
    serve = start_serve("--procs", "2")
    serve.wait_ready(2)
    with Load(env["STREAMD_REDIS_URL"]) as load:
        wait_rows(env, 1)
        serve.send_signal(signal.SIGINT)
        # Two signals sent at once may arrive as one (POSIX does not queue them): a person
        # pressing Ctrl-C twice is slower than this wait.
        wait_until(lambda: serve.events("stopping"), timeout=10)
        serve.send_signal(signal.SIGINT)
        assert serve.wait(30) == 0
        produced = load.stop()
    assert serve.events("stop_fast")
    # Entries in hand stayed pending; the next run reclaims them after claim_min_idle_ms.
    again = start_serve()
    again.wait_ready(1)
    wait_rows(env, produced)
    wait_until(lambda: pending_count(env["STREAMD_REDIS_URL"]) == 0, timeout=30)
    again.send_signal(signal.SIGQUIT)
    assert again.wait(30) == 0
    assert_exactly_once(env, produced)


# --- crashes --------------------------------------------------------------------------------


def test_kill_9_of_a_child_mid_load_is_replaced_and_every_event_lands_once(
    fast_env: dict[str, str], start_serve: Start
) -> None:
    env = fast_env
    url = env["STREAMD_REDIS_URL"]
    serve = start_serve("--procs", "2", "--tasks", "4")
    serve.wait_ready(2)
    first = ready_children(env, 2)
    with Load(url) as load:
        wait_rows(env, 2000)
        killed = time.monotonic()
        os.kill(first[0], signal.SIGKILL)
        new = ready_children(env, 2, exclude={first[0]})
        back_s = time.monotonic() - killed
        wait_rows(env, load.produced + 1000)  # still ingesting after the replacement
        produced = load.stop()
    wait_rows(env, produced)
    wait_until(lambda: pending_count(url) == 0, timeout=30, message="the dead child's entries")
    assert first[1] in new
    restarted = serve.events("child_restarted")
    assert len(restarted) == 1 and restarted[0]["index"] == 0
    assert status(env)["restarts"] == 1
    assert serve.terminate() == 0
    assert_exactly_once(env, produced)
    print(f"child back and consuming {back_s * 1000:.0f} ms after kill -9; "
          f"restarted {restarted[0]['down_ms']} ms after its exit was seen")  # fmt: skip


@contextlib.contextmanager
def events_table_locked(dsn: str) -> Iterator[None]:
    """Hold an exclusive lock on the events table: every consumer's COPY waits, holding its batch
    (pending, unacknowledged) until the lock goes."""
    locked, release = threading.Event(), threading.Event()

    async def hold() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            async with conn.transaction():
                await conn.execute('LOCK TABLE "events" IN ACCESS EXCLUSIVE MODE')
                locked.set()
                await asyncio.to_thread(release.wait)
        finally:
            await conn.close()

    thread = threading.Thread(target=asyncio.run, args=(hold(),), daemon=True)
    thread.start()
    assert locked.wait(10)
    try:
        yield
    finally:
        release.set()
        thread.join(10)


def test_a_killed_childs_entries_are_adopted_without_waiting_for_claim_min_idle(
    fast_env: dict[str, str], start_serve: Start
) -> None:
    """XAUTOCLAIM alone would leave them pending for claim_min_idle_ms (here 10 minutes): the
    reapers see that the consumer's process is gone from this host and take them at once."""
    env = fast_env | {"STREAMD_CLAIM_MIN_IDLE_MS": "600000"}
    url, dsn = env["STREAMD_REDIS_URL"], env["STREAMD_POSTGRES_DSN"]
    serve = start_serve("--procs", "2", "--tasks", "4", environ=env)
    serve.wait_ready(2)
    first = ready_children(env, 2)

    def held_by(pid: int) -> int:
        with redis_client(url) as r:
            consumers = r.xinfo_consumers("events", "streamd")
        return sum(int(c["pending"]) for c in consumers if f":{pid}:" in str(c["name"]))

    with events_table_locked(dsn):
        produce(url, 3000)
        wait_until(lambda: held_by(first[0]), timeout=20, message="child 0 holding a batch")
        os.kill(first[0], signal.SIGKILL)
    ready_children(env, 2, exclude={first[0]})  # its start-up applies the schema: after the lock
    wait_rows(env, 3000)
    wait_until(lambda: pending_count(url) == 0, timeout=30, message="the dead child's entries")
    adopted = serve.events("dead_consumer_adopted")
    assert all(f":{first[0]}:" in e["dead_consumer"] for e in adopted)
    assert sum(e["entries"] for e in adopted) > 0
    assert serve.terminate() == 0
    assert_exactly_once(env, 3000)


def test_crash_loop_stops_the_service_with_exit_70(env: dict[str, str], start_serve: Start) -> None:
    env |= {"STREAMD_CRASH_LOOP_MAX": "3", "STREAMD_CRASH_LOOP_WINDOW_S": "60"}
    serve = start_serve("--procs", "1")
    seen: set[int] = set()
    for _ in range(3):
        pid = ready_children(env, 1, exclude=seen)[0]
        seen.add(pid)
        os.kill(pid, signal.SIGKILL)
    assert serve.wait(30) == 70
    assert [e["crashes"] for e in serve.events("crash_loop")] == [3]
    assert "crashed 3 times within 60 s" in serve.output()
    assert len(serve.events("child_restarted")) == 2


def test_boot_error_exits_78_at_once_without_restarts(
    env: dict[str, str], start_serve: Start
) -> None:
    bad_db = env["STREAMD_POSTGRES_DSN"].rsplit("/", 1)[0] + "/no_such_db"
    serve = start_serve("--procs", "2", environ=env | {"STREAMD_POSTGRES_DSN": bad_db})
    assert serve.wait(30) == 78
    assert not serve.events("child_restarted")
    assert len(serve.events("child_started")) == 2
    errors = [line for line in serve.output().splitlines() if line.startswith("streamd: error:")]
    assert len(errors) == 1 and "no_such_db" in errors[0], serve.tail()


def test_unreachable_service_at_first_start_exits_69(
    env: dict[str, str], start_serve: Start
) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    serve = start_serve(environ=env | {"STREAMD_REDIS_URL": f"redis://127.0.0.1:{port}/0"})
    assert serve.wait(30) == 69
    assert not serve.events("child_restarted")
    assert "streamd: error: Redis at" in serve.output()


def test_hung_child_is_killed_and_replaced(fast_env: dict[str, str], start_serve: Start) -> None:
    env = fast_env | {"STREAMD_HEARTBEAT_TIMEOUT_S": "2"}
    serve = start_serve("--procs", "2", environ=env)
    serve.wait_ready(2)
    first = ready_children(env, 2)
    produce(env["STREAMD_REDIS_URL"], 2000)
    wait_rows(env, 1)
    os.kill(first[0], signal.SIGSTOP)  # its event loop makes no progress from now on
    new = ready_children(env, 2, exclude={first[0]})
    assert first[1] in new
    hung = serve.events("child_hung")
    assert [h["child_pid"] for h in hung] == [first[0]]
    assert serve.events("child_exited")[0]["signal"] == "SIGKILL"
    produce(env["STREAMD_REDIS_URL"], 2000, start=2000)
    wait_rows(env, 4000)
    wait_until(lambda: pending_count(env["STREAMD_REDIS_URL"]) == 0, timeout=30)
    assert serve.terminate() == 0
    assert_exactly_once(env, 4000)


def test_children_exit_when_the_supervisor_is_killed(
    fast_env: dict[str, str], start_serve: Start
) -> None:
    env = fast_env
    serve = start_serve("--procs", "2")
    serve.wait_ready(2)
    children = ready_children(env, 2)
    with Load(env["STREAMD_REDIS_URL"]) as load:
        wait_rows(env, 1)
        os.kill(serve.pid, signal.SIGKILL)
        assert serve.wait(10) == -signal.SIGKILL
        assert wait_gone(children, 30), "children outlived the supervisor"
        produced = load.stop()
    # They drained on the way out (PR_SET_PDEATHSIG = SIGTERM): nothing was left in hand.
    assert pending_count(env["STREAMD_REDIS_URL"]) == 0
    again = start_serve()
    again.wait_ready(1)
    wait_rows(env, produced)
    assert again.terminate() == 0
    assert_exactly_once(env, produced)


# --- recovery -------------------------------------------------------------------------------


def test_entries_of_a_dead_foreign_consumer_are_reclaimed_and_it_is_deleted(
    fast_env: dict[str, str], start_serve: Start
) -> None:
    env = fast_env | {"STREAMD_CONSUMER_IDLE_DELETE_MS": "1500"}
    url = env["STREAMD_REDIS_URL"]
    produce(url, 300)
    with redis_client(url) as r:
        r.xgroup_create("events", "streamd", id="0")
        held = r.xreadgroup("streamd", "gone-host:4242:0", {"events": ">"}, count=300)
    assert len(held[0][1]) == 300
    produce(url, 200, start=300)
    serve = start_serve("--procs", "2", environ=env)
    serve.wait_ready(2)
    wait_rows(env, 500)
    wait_until(lambda: pending_count(url) == 0, timeout=30)

    def ghost_deleted() -> bool:
        with redis_client(url) as r:
            names = {c["name"] for c in r.xinfo_consumers("events", "streamd")}
        return b"gone-host:4242:0" not in names

    wait_until(ghost_deleted, timeout=30, message="idle consumer deleted")
    assert sum(e["count"] for e in serve.events("entries_reclaimed")) == 300
    assert serve.terminate() == 0
    assert_exactly_once(env, 500)


def test_poison_entry_goes_to_the_dlq_after_max_deliveries(
    fast_env: dict[str, str], start_serve: Start
) -> None:
    env = fast_env | {"STREAMD_MAX_DELIVERIES": "3"}
    url, dsn = env["STREAMD_REDIS_URL"], env["STREAMD_POSTGRES_DSN"]
    produce(url, 10)
    with redis_client(url) as r:
        r.xgroup_create("events", "streamd", id="0")
        entries = r.xreadgroup("streamd", "crashing:1:0", {"events": ">"}, count=10)[0][1]
        ids = [e[0] for e in entries]
        r.xack("events", "streamd", *ids[1:])  # all but the first were fine
        for n in range(2):  # two more consumers took it over, and died on it too
            r.xclaim("events", "streamd", f"crashing:{n + 2}:0", 0, [ids[0]])
    serve = start_serve(environ=env)
    serve.wait_ready(1)
    wait_until(lambda: pending_count(url) == 0, timeout=30)
    dead = pg_fetch(dsn, "SELECT entry_id, reason, deliveries FROM dead_letter_queue")
    assert [(d["entry_id"], d["reason"], d["deliveries"]) for d in dead] == [
        (ids[0].decode(), "poison", 4)
    ]
    with redis_client(url) as r:
        letters = r.xrange("events:dead")
    assert [fields[b"entry_id"] for _id, fields in letters] == [ids[0]]
    assert pg_fetchval(dsn, "SELECT count(*) FROM events") == 0  # the others were acked before
    assert serve.terminate() == 0


def test_trimming_keeps_the_stream_bounded(fast_env: dict[str, str], start_serve: Start) -> None:
    env = fast_env
    url = env["STREAMD_REDIS_URL"]
    serve = start_serve("--procs", "2")
    serve.wait_ready(2)
    for wave in range(5):
        produce(url, 2000, start=wave * 2000)
        wait_rows(env, (wave + 1) * 2000)
        # Everything acknowledged: MINID trimming leaves at most one radix node (100 entries).
        wait_until(lambda: xlen(url) <= 100, timeout=30, message="stream trimmed")
    assert serve.terminate() == 0
    assert_exactly_once(env, 10_000)


# --- reload ---------------------------------------------------------------------------------


@pytest.fixture
def config_file(fast_env: dict[str, str], tmp_path: Path) -> Iterator[Path]:
    """A config file that HUP re-reads; the DSN lives there (not in env, which would win)."""
    path = tmp_path / "streamd.toml"
    fast_env["STREAMD_CONFIG"] = str(path)
    yield path


def write_config(path: Path, **values: Any) -> None:
    lines = [f"{k} = {v!r}" if isinstance(v, str) else f"{k} = {v}" for k, v in values.items()]
    path.write_text("\n".join(lines).replace("'", '"') + "\n")


def consumer_names(url: str) -> set[str]:
    with redis_client(url) as r:
        return {c["name"].decode() for c in r.xinfo_consumers("events", "streamd")}


def test_sighup_reloads_the_config_and_replaces_children_one_by_one(
    fast_env: dict[str, str], config_file: Path, start_serve: Start
) -> None:
    env = fast_env
    url = env["STREAMD_REDIS_URL"]
    write_config(config_file, tasks=2)
    serve = start_serve("--procs", "2")
    serve.wait_ready(2)
    old = ready_children(env, 2)
    with Load(url) as load:
        wait_rows(env, 1000)
        write_config(config_file, tasks=3)
        serve.send_signal(signal.SIGHUP)
        wait_until(lambda: serve.events("reload_finished"), timeout=60)
        new = ready_children(env, 2, exclude=set(old))
        wait_rows(env, load.produced + 1000)
        produced = load.stop()
    wait_rows(env, produced)
    wait_until(lambda: pending_count(url) == 0, timeout=30)
    started = serve.events("worker_started")
    assert sorted(e["tasks"] for e in started) == [2, 2, 3, 3]
    # One instance id for the serve, before and after the reload; consumers named by it.
    (instance,) = {e["consumer_prefix"].rsplit(":", 1)[0] for e in started}
    assert {f"{instance}:{pid}:2" for pid in new} <= consumer_names(url)
    wait_until(lambda: len(serve.events("child_exited")) == 2, timeout=30)
    exits = {e["child_pid"]: e["code"] for e in serve.events("child_exited")}
    assert exits == dict.fromkeys(old, 0)  # the old children drained and exited cleanly
    # One at a time: each old child was told to stop only after its successor was ready.
    replaced = serve.events("child_replaced")
    assert [r["old_pid"] for r in replaced] == old
    assert serve.terminate() == 0
    assert_exactly_once(env, produced)


def test_reload_that_cannot_start_keeps_the_running_children(
    fast_env: dict[str, str], config_file: Path, start_serve: Start
) -> None:
    env = fast_env
    dsn = env.pop("STREAMD_POSTGRES_DSN")
    write_config(config_file, postgres_dsn=dsn)
    serve = start_serve("--procs", "2", environ=env)
    serve.wait_ready(2)
    old = ready_children(env, 2)

    write_config(config_file, postgres_dsn=dsn.rsplit("/", 1)[0] + "/no_such_db")
    serve.send_signal(signal.SIGHUP)
    failed = wait_until(lambda: serve.events("reload_failed"), timeout=30)
    assert failed[0]["code"] == 78

    config_file.write_text("tasks = 'many'\n")  # invalid: refused before any child starts
    serve.send_signal(signal.SIGHUP)
    wait_until(lambda: len(serve.events("reload_failed")) == 2, timeout=30)

    assert serve.poll() is None
    assert ready_children(env, 2) == old
    produce(env["STREAMD_REDIS_URL"], 1000)
    env["STREAMD_POSTGRES_DSN"] = dsn
    wait_rows(env, 1000)
    assert serve.terminate() == 0
    assert_exactly_once(env, 1000)


# --- shape ----------------------------------------------------------------------------------


def test_status_file_describes_the_running_service(env: dict[str, str], start_serve: Start) -> None:
    serve = start_serve("--procs", "auto", "--tasks", "2")
    procs = len(os.sched_getaffinity(0))
    serve.wait_ready(procs)
    pids = ready_children(env, procs)
    found = status(env)
    assert found["pid"] == serve.pid
    assert (found["procs"], found["tasks"], found["restarts"]) == (procs, 2, 0)
    assert (found["stream"], found["group"], found["state"]) == ("events", "streamd", "running")
    assert [c["index"] for c in found["children"]] == list(range(procs))
    assert all(c["last_heartbeat"] for c in found["children"])
    assert sorted(pids) == sorted(c["pid"] for c in found["children"])
    assert serve.terminate() == 0


# --- metrics child --------------------------------------------------------------------------

needs_metrics = pytest.mark.skipif(
    not metrics_available(), reason="streamd.metrics.serve_metrics is not available"
)


def http_ok(port: int, path: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as reply:
            return bool(reply.status == 200)
    except (urllib.error.URLError, OSError):
        return False


@needs_metrics
def test_metrics_child_is_restarted_and_stopped_last(
    env: dict[str, str], start_serve: Start
) -> None:
    port = free_port()
    serve = start_serve("--procs", "2", environ=env | {"STREAMD_METRICS_PORT": str(port)})
    workers = ready_children(env, 2)
    first = wait_until(lambda: status(env)["metrics_pid"], timeout=30)
    wait_until(lambda: http_ok(port, "/readyz"), timeout=30, message="/readyz")
    shared = Path(env["STREAMD_STATE_DIR"]) / f"metrics-{serve.pid}"
    assert shared.is_dir()  # PROMETHEUS_MULTIPROC_DIR, made before the children were forked

    os.kill(first, signal.SIGKILL)
    wait_until(lambda: status(env)["metrics_pid"] not in (None, first), timeout=30)
    wait_until(lambda: http_ok(port, "/metrics"), timeout=30, message="/metrics again")
    assert ready_children(env, 2) == workers  # ingest never noticed

    assert serve.terminate() == 0
    assert [e["kind"] for e in serve.events("child_exited")] == [
        "metrics",
        "worker",
        "worker",
        "metrics",
    ]
    assert not shared.exists()


@needs_metrics
def test_metrics_port_taken_at_start_stops_with_78(env: dict[str, str], start_serve: Start) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        serve = start_serve(environ=env | {"STREAMD_METRICS_PORT": str(port)})
        assert serve.wait(30) == 78
    assert f"cannot listen on 127.0.0.1:{port}" in serve.output()
    assert not serve.events("child_restarted")


# --- the whole story, driven by stock Redis tools -------------------------------------------

needs_redis_tools = pytest.mark.skipif(
    not (shutil.which("redis-benchmark") and shutil.which("redis-cli")),
    reason="redis-benchmark / redis-cli are not installed",
)


def redis_cli(url: str, *args: str) -> str:
    parts = urllib.parse.urlsplit(url)
    argv = ["redis-cli", "-h", str(parts.hostname), "-p", str(parts.port)]
    argv += ["-n", parts.path.lstrip("/") or "0", *args]
    return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=30).stdout


@needs_redis_tools
def test_load_kill_dead_consumer_then_sigterm(fast_env: dict[str, str], start_serve: Start) -> None:
    """The issue's acceptance check: --procs 2 --tasks 4 under redis-benchmark load, kill -9 of
    a child, a dead foreign consumer holding entries, then SIGTERM."""
    env = fast_env
    url = env["STREAMD_REDIS_URL"]
    parts = urllib.parse.urlsplit(url)
    bench = ["redis-benchmark", "-h", str(parts.hostname), "-p", str(parts.port)]
    bench += ["--dbnum", parts.path.lstrip("/"), "-c", "4", "-P", "16", "-r", "1000000", "-q"]
    xadd_cmd = ["XADD", "events", "*", "type", "bench", "data", '"__rand_int__"']
    # -n a multiple of clients x pipeline (4 x 16): redis-benchmark sends whole pipelines.
    subprocess.run([*bench, "-n", "512", *xadd_cmd], check=True, capture_output=True, timeout=60)
    assert xlen(url) == 512
    redis_cli(url, "XGROUP", "CREATE", "events", "streamd", "0")
    redis_cli(url, "XREADGROUP", "GROUP", "streamd", "dead-host:1:0", "COUNT", "500",
              "STREAMS", "events", ">")  # fmt: skip
    assert pending_count(url) == 500

    serve = start_serve("--procs", "2", "--tasks", "4")
    first = ready_children(env, 2)
    load = subprocess.Popen([*bench, "-n", "40000", *xadd_cmd], stdout=subprocess.DEVNULL)
    try:
        wait_rows(env, 2000)
        os.kill(first[0], signal.SIGKILL)
        ready_children(env, 2, exclude={first[0]})
        assert load.wait(60) == 0
    finally:
        load.kill()
    wait_rows(env, 40_512)
    wait_until(lambda: pending_count(url) == 0, timeout=30, message="nothing pending")
    sent = time.monotonic()
    assert serve.terminate(30) == 0
    stop_s = time.monotonic() - sent
    assert_exactly_once(env, 40_512)
    assert len(serve.events("child_restarted")) == 1
    assert stop_s < 5, f"SIGTERM took {stop_s:.1f} s"
