"""Serves on several hosts in one group: liveness in Redis, never hostnames or pids.

Each serve runs as a host of its own (new PID, UTS and mount namespaces: tests/support/cluster.py
host_wrapper), and two of them share a hostname, so by hostname and pid their workers look alike.
claim_min_idle_ms is ten minutes: entries of a killed serve that arrive within the test's time
can only have been taken over because its liveness key expired."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

import pytest

from tests.support.helpers import (
    ServeProcess,
    count_rows,
    event,
    redis_client,
    table_locked,
    wait_until,
    xadd,
)

pytestmark = [pytest.mark.timeout(180), pytest.mark.chaos]


def _hosts_env(env: dict[str, str]) -> dict[str, str]:
    return {
        **env,
        "STREAMD_CLAIM_MIN_IDLE_MS": "600000",
        "STREAMD_LIVENESS_TTL_S": "2",
        "STREAMD_REAPER_INTERVAL_S": "0.5",
        "STREAMD_TASKS": "2",
        "STREAMD_BATCH_SIZE": "50",
        "STREAMD_READ_COUNT": "50",
    }


def _pending_by_owner(url: str) -> dict[str, int]:
    """Pending entries per serve (the consumer names' instance id)."""
    with redis_client(url) as r:
        consumers = r.xinfo_consumers("events", "streamd")
    out: dict[str, int] = {}
    for c in consumers:
        instance = c["name"].decode().rsplit(":", 2)[0]
        out[instance] = out.get(instance, 0) + int(c["pending"])
    return out


def _instance_of(serve: ServeProcess) -> str:
    prefix = serve.events("worker_started")[0]["consumer_prefix"]
    return str(prefix).rsplit(":", 1)[0]


def test_same_hostname_serves_keep_their_entries_and_a_killed_ones_are_taken_over(
    env: dict[str, str], start_host: Callable[..., ServeProcess]
) -> None:
    environ = _hosts_env(env)
    url, dsn = environ["STREAMD_REDIS_URL"], environ["STREAMD_POSTGRES_DSN"]
    survivor = start_host("samehost", environ)
    victim = start_host("samehost", environ)
    survivor.wait_ready()
    victim.wait_ready()
    alive, dead = _instance_of(survivor), _instance_of(victim)
    assert alive != dead and alive.startswith("samehost-") and dead.startswith("samehost-")

    with table_locked(dsn):  # every batch waits in COPY: held, pending, not acknowledged
        xadd(url, (event("host_test", {"n": n}) for n in range(400)))
        wait_until(
            lambda: all(_pending_by_owner(url).get(i, 0) > 0 for i in (alive, dead)),
            timeout=30,
            message="both serves holding entries",
        )
        # Both alive, for many reaper rounds and liveness TTLs by now: neither took the other's.
        assert not survivor.events("dead_consumer_adopted")
        assert not victim.events("dead_consumer_adopted")
        os.killpg(victim.pid, signal.SIGKILL)  # the whole host: its namespace, every process
        victim.wait(10)

    wait_until(lambda: count_rows(dsn) == 400, timeout=60, message="every entry, once")
    wait_until(lambda: sum(_pending_by_owner(url).values()) == 0, timeout=30)
    adopted = survivor.events("dead_consumer_adopted")
    assert adopted and all(e["dead_consumer"].startswith(f"{dead}:") for e in adopted)
    assert sum(int(e["entries"]) for e in adopted) > 0
    assert count_rows(dsn) == 400  # and nothing twice
