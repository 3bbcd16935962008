"""streamd on a Redis Cluster (3 masters, 3 replicas, started by the fixtures): detected without
configuration, every entry ingested exactly once, dead letters in a dead stream of the same slot
(no CROSSSLOT), and the same commands (`produce`, `dlq list`) working against it."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import orjson

from streamd.backends.cluster import slot_of
from streamd.backends.connections import redis_client
from streamd.config.settings import Settings
from streamd.config.sharding import dead_stream_of
from streamd.dev.cluster import LocalRedisCluster
from streamd.errors import EXIT_BOOT
from streamd.pipeline.reader import GroupReader
from tests.support.cluster import cluster_client
from tests.support.helpers import ServeProcess, count_rows, wait_until
from tests.support.streamd_cli import explain, run_streamd

_names = itertools.count(1)


def _pending(cluster: LocalRedisCluster, stream: str, group: str) -> int:
    with cluster_client(cluster) as client:
        return int(client.xpending(stream, group)["pending"])


def test_serve_detects_the_cluster_and_ingests_exactly_once(
    cluster_env: dict[str, str],
    redis_cluster: LocalRedisCluster,
    start_serve: Callable[..., ServeProcess],
) -> None:
    stream, group = cluster_env["STREAMD_STREAM"], cluster_env["STREAMD_GROUP"]
    dsn = cluster_env["STREAMD_POSTGRES_DSN"]
    serve = start_serve("--tasks", "2", environ=cluster_env)
    serve.wait_ready()
    with cluster_client(redis_cluster) as client:
        pipe = client.pipeline(transaction=False)
        for i in range(3000):
            if i % 500 == 7:
                pipe.xadd(stream, {"type": "bad", "data": "{not json"})
            else:
                pipe.xadd(stream, {"type": "ok", "data": orjson.dumps({"i": i})})
        pipe.execute()
    wait_until(lambda: count_rows(dsn) == 2994, timeout=60, message="rows")
    wait_until(lambda: count_rows(dsn, "dead_letter_queue") == 6, timeout=30, message="dlq")
    wait_until(lambda: _pending(redis_cluster, stream, group) == 0, timeout=30)
    # The stream has no hash tag: its dead letters went to {<stream>}:dead, in its own slot.
    dead = dead_stream_of(stream, cluster=True)
    assert dead == f"{{{stream}}}:dead" and slot_of(dead) == slot_of(stream)
    with cluster_client(redis_cluster) as client:
        assert client.xlen(dead) == 6
    assert not [line for line in serve.logs() if "CROSSSLOT" in str(line)]
    assert count_rows(dsn) == 2994  # and no duplicate on top

    # The operator's view finds the same dead stream, with redis_cluster left at auto.
    listing = run_streamd(cluster_env, "dlq", "list", "--json", "--limit", "10")
    assert listing.returncode == 0, explain(listing)
    found = orjson.loads(listing.stdout)
    assert (found["count"], found["stream_length"]) == (6, 6)


def test_redis_cluster_true_on_a_single_redis_is_one_line_and_exit_78(
    env: dict[str, str], start_serve: Callable[..., ServeProcess]
) -> None:
    serve = start_serve(environ={**env, "STREAMD_REDIS_CLUSTER": "true"})
    assert serve.wait(30) == EXIT_BOOT
    last = serve.output().strip().splitlines()[-1]
    assert last.startswith("streamd: error: Redis at redis://127.0.0.1:")
    assert "Cluster mode is not enabled" in last and "Traceback" not in serve.output()


def test_a_bad_redis_cluster_value_is_a_config_error(env: dict[str, str]) -> None:
    result = run_streamd({**env, "STREAMD_REDIS_CLUSTER": "maybe"}, "config")
    assert result.returncode == 2, explain(result)
    assert "redis_cluster (env STREAMD_REDIS_CLUSTER)" in result.stderr


async def test_a_consumer_closes_its_connections_to_the_slots_of_streams_it_no_longer_reads(
    redis_cluster: LocalRedisCluster,
) -> None:
    """A consumer reads each slot over a connection of its own; when discovery leaves a slot
    with no stream to read (streams deleted, a pattern that moved on), its next read closes
    that connection: the connections stay bounded by the streams consumed now."""
    n = next(_names)
    names = [f"c{n}-s{i}" for i in range(12)]
    assert len({slot_of(name) for name in names}) == 12  # a slot each
    settings = Settings(redis_url=redis_cluster.url, redis_cluster=True, group=f"g{n}")
    client = redis_client(settings, extra_timeout_s=1)
    for name in names:
        await client.xgroup_create(name, settings.group, id="0", mkstream=True)
    reader = GroupReader(
        client,
        group=settings.group,
        consumer="test:0",
        dead_stream_for=settings.dead_stream_for,
        dead_maxlen=settings.dlq_stream_maxlen,
    )
    try:
        assert await reader.read(names, 10, 100) == []  # a blocked read per slot, all empty
        raws = [reader.raw_for(name) for name in names]
        assert all(raw.client_id is not None for raw in raws)  # each slot's read connected it
        assert await _consumer_connections(client, raws) == 12
        for name in names:
            await client.xadd(name, {"type": "t", "data": "{}"})
        got = await reader.read(names, 10, 100)
        assert sorted(s.stream for s, _ in got) == sorted(names)

        reader.keep_only(names[:2])
        await reader.read(names[:2], 10, 100)
        assert await _consumer_connections(client, raws) == 2
        assert [raw.client_id is not None for raw in raws[2:]] == [False] * 10
        # A stream back in the config gets its slot's connection again.
        reader.keep_only(names[:3])
        await client.xadd(names[2], {"type": "t", "data": "{}"})
        got = await reader.read(names[:3], 10, 100)
        assert [s.stream for s, _ in got] == [names[2]]
    finally:
        await reader.aclose()
        for name in names:
            await client.delete(name)
        await client.aclose()


async def _consumer_connections(client: Any, raws: list[Any]) -> int:
    """How many of these connections the nodes still list as connected (a client id is
    numbered by its node: compared with the node's name)."""
    ours = {(raw.node, raw.client_id) for raw in raws if raw.client_id is not None}
    listed: set[tuple[str, int]] = set()
    for node in client.get_primaries():
        for entry in await client.client_list(target_nodes=node):
            listed.add((node.name, int(entry["id"])))
    return len(ours & listed)
