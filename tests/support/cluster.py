"""Redis Cluster fixtures (loaded by tests/conftest.py): a 3-master, 3-replica cluster on
loopback that the test run starts itself (streamd/dev/cluster.py).

`redis_cluster` is shared by the tests of one xdist worker: do not fault it. A cluster has only
database 0, so `cluster_env` isolates a test by names instead: a stream and a group of its own,
whose keys are deleted afterwards. Fault tests take a private cluster from `make_cluster`.
"""

from __future__ import annotations

import itertools
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from streamd.dev.cluster import LocalRedisCluster
from tests.support.helpers import ServeProcess

_ids = itertools.count(1)


@pytest.fixture(scope="session")
def redis_cluster(server_root: Path) -> Iterator[LocalRedisCluster]:
    """The shared cluster. Do not kill, fail over or reshard it: use make_cluster() for that."""
    cluster = LocalRedisCluster(server_root / "cluster-shared")
    try:
        yield cluster.start()
    finally:
        cluster.kill()


@pytest.fixture
def make_cluster(server_root: Path) -> Iterator[Callable[..., LocalRedisCluster]]:
    """make_cluster(start=True, **LocalRedisCluster fields) -> a private cluster (appendfsync
    always), killed and deleted after the test."""
    made: list[LocalRedisCluster] = []

    def make(start: bool = True, **kwargs: Any) -> LocalRedisCluster:
        kwargs.setdefault("appendfsync", "always")
        cluster = LocalRedisCluster(server_root / f"cluster-{next(_ids)}", **kwargs)
        made.append(cluster)
        return cluster.start() if start else cluster

    yield make
    for cluster in made:
        cluster.kill()
        shutil.rmtree(cluster.dir, ignore_errors=True)


def on_cluster(env: dict[str, str], cluster: LocalRedisCluster) -> dict[str, str]:
    """`env` pointed at `cluster`, with a stream and a group of this test's own."""
    n = next(_ids)
    return {
        **env,
        "STREAMD_REDIS_URL": cluster.url,
        "STREAMD_STREAM": f"t{n}-events",
        "STREAMD_GROUP": f"t{n}-group",
    }


@pytest.fixture
def cluster_env(env: dict[str, str], redis_cluster: LocalRedisCluster) -> Iterator[dict[str, str]]:
    """`env` on the shared cluster (see on_cluster); the test's keys are deleted afterwards."""
    environ = on_cluster(env, redis_cluster)
    yield environ
    prefix = environ["STREAMD_STREAM"].removesuffix("-events")
    delete_keys(redis_cluster, f"*{prefix}*")


def delete_keys(cluster: LocalRedisCluster, pattern: str) -> None:
    """Delete the keys matching pattern on every master."""
    for node in cluster.master_nodes():
        with node.client() as client:
            for key in client.scan_iter(match=pattern, count=1000):
                client.delete(key)


def cluster_client(cluster: LocalRedisCluster) -> redis.RedisCluster:
    """A synchronous cluster client, for tests to produce and inspect."""
    return redis.RedisCluster.from_url(cluster.url)


# ---------------------------------------------------------------------------------------------
# serves as separate hosts


def host_wrapper(hostname: str) -> tuple[str, ...]:
    """A command prefix that runs a program as on a host of its own: new PID, UTS and mount
    namespaces (its pids start at 1, /proc shows only its own processes) and `hostname`. Two
    serves started this way with one hostname look exactly alike by hostname and pid."""
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("unshare (util-linux) not installed")
    return (
        *(unshare, "--pid", "--uts", "--mount", "--mount-proc", "--fork", "--kill-child"),
        *("sh", "-c", 'hostname "$0" && exec "$@"', hostname),
    )


@pytest.fixture
def start_host(tmp_path: Path, server_root: Path) -> Iterator[Callable[..., ServeProcess]]:
    """start_host(hostname, environ, *serve_args) -> `streamd serve` on a host of its own
    (host_wrapper), with a state directory of its own; killed with its namespace afterwards."""
    started: list[ServeProcess] = []

    def start(hostname: str, environ: dict[str, str], *args: str) -> ServeProcess:
        n = next(_ids)
        state = tmp_path / f"host-{n}-state"
        proc = ServeProcess(
            {**environ, "STREAMD_STATE_DIR": str(state)},
            *args,
            log_dir=tmp_path / "logs",
            wrapper=host_wrapper(hostname),
        )
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.close()
