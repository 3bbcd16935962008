"""The test suite's Redis Cluster (streamd/dev/cluster.py): it comes up with every slot served,
and its fault helpers (failover, a killed master, a moved slot) keep the data reachable."""

from __future__ import annotations

from collections.abc import Callable

import redis

from streamd.dev.cluster import LocalRedisCluster
from tests.support.cluster import cluster_client

MakeCluster = Callable[..., LocalRedisCluster]


def test_three_masters_with_a_replica_each_serve_every_slot(
    redis_cluster: LocalRedisCluster,
) -> None:
    assert len(redis_cluster.master_nodes()) == 3
    assert len(redis_cluster.replica_nodes()) == 3
    info = redis_cluster.nodes[0].cluster_info()
    assert info["cluster_state"] == "ok"
    assert info["cluster_slots_assigned"] == "16384"
    with cluster_client(redis_cluster) as client:
        # Keys whose slots live on different masters all answer through one client.
        owners = {redis_cluster.owner_of(f"k{i}").port for i in range(20)}
        assert len(owners) == 3
        for i in range(20):
            client.set(f"dev-cluster-k{i}", i)
        assert [int(client.get(f"dev-cluster-k{i}")) for i in range(20)] == list(range(20))


def test_failover_kill_and_move_slot_keep_the_data(make_cluster: MakeCluster) -> None:
    cluster = make_cluster()
    with cluster_client(cluster) as client:
        client.xadd("{faults}", {"n": "1"})
        master = cluster.owner_of("{faults}")

        cluster.failover(cluster.replica_of(master))
        promoted = cluster.owner_of("{faults}")
        assert promoted is not master and promoted.role() == "master"
        assert client.xlen("{faults}") == 1

        target = next(m for m in cluster.master_nodes() if m is not promoted)
        cluster.move_slot(cluster.slot_of("{faults}"), target)
        assert cluster.owner_of("{faults}") is target
        assert client.xlen("{faults}") == 1

        survivor = cluster.kill_master(target)
        assert not target.is_running()
        assert cluster.owner_of("{faults}") is survivor
        length = None
        for attempt in range(5):  # the client's slot map catches up after a lost node
            try:
                length = client.xlen("{faults}")
                break
            except (redis.ConnectionError, redis.ClusterError):
                if attempt == 4:
                    raise
        assert length == 1
