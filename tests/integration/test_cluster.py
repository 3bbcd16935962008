"""streamd on a Redis Cluster (3 masters, 3 replicas, started by the fixtures): detected without
configuration, every entry ingested exactly once, dead letters in a dead stream of the same slot
(no CROSSSLOT), and the same commands (`produce`, `dlq list`) working against it."""

from __future__ import annotations

from collections.abc import Callable

import orjson

from streamd.backends.cluster import slot_of
from streamd.config.sharding import dead_stream_of
from streamd.dev.cluster import LocalRedisCluster
from streamd.errors import EXIT_BOOT
from tests.support.cluster import cluster_client
from tests.support.helpers import ServeProcess, count_rows, wait_until
from tests.support.streamd_cli import explain, run_streamd


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
