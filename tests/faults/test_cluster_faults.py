"""Redis Cluster faults under load, each on a private 3-master cluster (tests/support/cluster.py),
with the real `streamd serve` and a producer that knows exactly what Redis confirmed
(tests/support/load.py).

| fault                                   | expected                                              |
|-----------------------------------------|-------------------------------------------------------|
| CLUSTER FAILOVER on a replica           | 0 lost, 0 duplicated, nothing pending                 |
| resharding the stream's slot            | 0 lost, 0 duplicated, nothing pending                 |
| kill -9 of the stream's master          | only what Redis itself lost may be missing; never a   |
|                                         | duplicate, nothing stuck pending                      |
| kill -9 of a whole serve (another host) | its entries taken over through its liveness key       |
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

import pytest

from streamd.config.sharding import dead_stream_of
from streamd.dev.cluster import LocalRedisCluster
from tests.support.cluster import on_cluster
from tests.support.helpers import ServeProcess, count_rows, wait_until
from tests.support.load import Outcome, Producer, producing, wait_for_outcome

pytestmark = [pytest.mark.timeout(240), pytest.mark.chaos]

MakeCluster = Callable[..., LocalRedisCluster]


def _environ(env: dict[str, str], cluster: LocalRedisCluster) -> dict[str, str]:
    return {
        **on_cluster(env, cluster),
        "STREAMD_TASKS": "2",
        "STREAMD_BATCH_SIZE": "200",
        "STREAMD_READ_COUNT": "200",
        "STREAMD_CLAIM_MIN_IDLE_MS": "600000",  # only liveness or our own retries may reclaim
        "STREAMD_LIVENESS_TTL_S": "2",
        "STREAMD_REAPER_INTERVAL_S": "0.5",
        "STREAMD_RETRY_MAX_S": "1",
    }


def _settle(environ: dict[str, str], producer: Producer, timeout: float = 90) -> Outcome:
    stream = environ["STREAMD_STREAM"]
    return wait_for_outcome(
        environ["STREAMD_POSTGRES_DSN"],
        environ["STREAMD_REDIS_URL"],
        producer,
        timeout=timeout,
        stream=stream,
        group=environ["STREAMD_GROUP"],
        dead_stream=dead_stream_of(stream, cluster=True),
    )


def _read_beside(environ: dict[str, str], cluster: LocalRedisCluster) -> dict[str, str]:
    """environ with serve also reading two empty streams: one in another slot of the stream's
    master, one on another master. Each read then spans three slots on two nodes: the slots of
    one node pipelined over one connection, a blocked read on each slot woken by the others
    (pipeline/reader.py); the fault hits one slot of a pipeline, or a whole node of it."""
    stream = environ["STREAMD_STREAM"]
    master = cluster.owner_of(stream)
    same = other = None
    for i in range(1000):
        name = f"{stream}:{{beside-{i}}}"
        owner = cluster.owner_of(name)
        if same is None and owner is master and cluster.slot_of(name) != cluster.slot_of(stream):
            same = name
        elif other is None and owner is not master:
            other = name
        if same and other:
            return {**environ, "STREAMD_STREAMS": ",".join([stream, same, other])}
    raise AssertionError("no names found in the slots wanted")


def _rows_grow(environ: dict[str, str], beyond: int) -> None:
    dsn = environ["STREAMD_POSTGRES_DSN"]
    wait_until(lambda: count_rows(dsn) > beyond, timeout=60, message=f"more than {beyond} rows")


@pytest.mark.parametrize("beside", [False, True], ids=["one-slot", "three-slots"])
def test_manual_failover_under_load_loses_and_duplicates_nothing(
    env: dict[str, str],
    make_cluster: MakeCluster,
    start_serve: Callable[..., ServeProcess],
    beside: bool,
) -> None:
    cluster = make_cluster()
    environ = _environ(env, cluster)
    if beside:
        environ = _read_beside(environ, cluster)
    serve = start_serve(environ=environ)
    serve.wait_ready()
    stream = environ["STREAMD_STREAM"]
    with producing(cluster.url, rate=800, stream=stream, cluster=True) as producer:
        _rows_grow(environ, 500)
        master = cluster.owner_of(stream)
        cluster.failover(cluster.replica_of(master))
        assert cluster.owner_of(stream) is not master
        rows = count_rows(environ["STREAMD_POSTGRES_DSN"])
        _rows_grow(environ, rows + 500)  # still ingesting, from the new master
        producer.stop()
    result = _settle(environ, producer)
    assert result.exact, result.summary()
    assert serve.poll() is None and not serve.events("child_restarted")


@pytest.mark.parametrize("beside", [False, True], ids=["one-slot", "three-slots"])
def test_resharding_the_streams_slot_under_load_loses_and_duplicates_nothing(
    env: dict[str, str],
    make_cluster: MakeCluster,
    start_serve: Callable[..., ServeProcess],
    beside: bool,
) -> None:
    cluster = make_cluster()
    environ = _environ(env, cluster)
    if beside:
        environ = _read_beside(environ, cluster)
    serve = start_serve(environ=environ)
    serve.wait_ready()
    stream = environ["STREAMD_STREAM"]
    with producing(cluster.url, rate=800, stream=stream, cluster=True) as producer:
        _rows_grow(environ, 500)
        source = cluster.owner_of(stream)
        target = next(m for m in cluster.master_nodes() if m is not source)
        cluster.move_slot(cluster.slot_of(stream), target)  # the stream and its dead stream
        assert cluster.owner_of(stream) is target
        rows = count_rows(environ["STREAMD_POSTGRES_DSN"])
        _rows_grow(environ, rows + 500)
        producer.stop()
    result = _settle(environ, producer)
    assert result.exact, result.summary()
    assert serve.poll() is None and not serve.events("child_restarted")


def test_kill_9_of_the_streams_master_never_duplicates_nor_leaves_entries_pending(
    env: dict[str, str], make_cluster: MakeCluster, start_serve: Callable[..., ServeProcess]
) -> None:
    cluster = make_cluster()
    environ = _environ(env, cluster)
    serve = start_serve(environ=environ)
    serve.wait_ready()
    stream = environ["STREAMD_STREAM"]
    with producing(cluster.url, rate=800, stream=stream, cluster=True) as producer:
        _rows_grow(environ, 500)
        promoted = cluster.kill_master(cluster.owner_of(stream))  # its replica is promoted
        rows = count_rows(environ["STREAMD_POSTGRES_DSN"])
        _rows_grow(environ, rows + 500)
        producer.stop()
    # Checked through a node that is alive: the seed node of the URL may be the one killed.
    result = _settle({**environ, "STREAMD_REDIS_URL": promoted.url}, producer)
    # Replication is asynchronous: writes the dead master had confirmed may be gone with it.
    # What survived is ingested once, nothing stays pending, nothing appears twice.
    assert result.duplicated == 0 and not result.unexpected, result.summary()
    assert result.pending == 0 and result.dead_rows == 0, result.summary()
    assert len(result.lost) < result.produced // 10, result.summary()
    assert serve.poll() is None


def test_kill_9_of_a_whole_serve_its_entries_are_taken_over(
    env: dict[str, str], make_cluster: MakeCluster, start_host: Callable[..., ServeProcess]
) -> None:
    cluster = make_cluster()
    environ = _environ(env, cluster)
    survivors = [start_host("host-a", environ), start_host("host-c", environ)]
    victim = start_host("host-b", environ)  # three serves in one group
    for serve in [*survivors, victim]:
        serve.wait_ready()
    stream = environ["STREAMD_STREAM"]
    with producing(cluster.url, rate=800, stream=stream, cluster=True) as producer:
        _rows_grow(environ, 1000)
        os.killpg(victim.pid, signal.SIGKILL)  # the host, with every process on it
        victim.wait(10)
        rows = count_rows(environ["STREAMD_POSTGRES_DSN"])
        _rows_grow(environ, rows + 500)
        producer.stop()
    # claim_min_idle_ms is 10 minutes: settling within the wait is the liveness key's doing.
    result = _settle(environ, producer, timeout=60)
    assert result.exact, result.summary()
    assert all(serve.poll() is None for serve in survivors)
