"""Sharded streams (`shards = N`): the Producer and `streamd produce` spread events over
`<stream>:{0}` ... `<stream>:{N-1}` (a partition key always picks the same shard, so its events
keep their order), serve consumes every shard of a Redis Cluster's three masters, and the rows
carry the shard key in `stream`."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import pytest

from streamd import Producer
from streamd.config.settings import Settings
from streamd.config.sharding import shard_keys
from streamd.dev.cluster import LocalRedisCluster
from streamd.errors import EXIT_BOOT
from tests.support.cluster import cluster_client
from tests.support.helpers import (
    ServeProcess,
    count_rows,
    event,
    pg_fetch,
    redis_client,
    wait_until,
)
from tests.support.streamd_cli import explain, run_streamd

pytestmark = pytest.mark.timeout(120)


async def test_partition_key_picks_one_shard_and_keeps_order(settings: Settings) -> None:
    async with Producer(settings.redis_url, stream="orders", shards=4, group=None) as producer:
        for n in range(40):
            await producer.produce("o", {"n": n}, partition_key="customer-7")
        for n in range(40):
            await producer.produce_batch([("o", {"n": n})])  # no key: round-robin
        client = producer.client
        lengths = {key: int(await client.xlen(key)) for key in producer.shard_keys}
        keyed = producer.shard_keys[producer.shard_of("customer-7")]
        assert lengths[keyed] == 40 + 10
        assert all(n == 10 for key, n in lengths.items() if key != keyed)
        entries = await client.xrange(keyed)
        ordered = [int(e[1][b"data"].split(b":")[1].rstrip(b"}")) for e in entries]
        assert ordered[:40] == list(range(40))  # the keyed ones came first, in order


def test_serve_consumes_every_shard_on_the_cluster(
    cluster_env: dict[str, str],
    redis_cluster: LocalRedisCluster,
    start_serve: Callable[..., ServeProcess],
) -> None:
    environ = {**cluster_env, "STREAMD_SHARDS": "6"}
    stream, group = environ["STREAMD_STREAM"], environ["STREAMD_GROUP"]
    dsn = environ["STREAMD_POSTGRES_DSN"]
    keys = shard_keys(stream, 6)
    assert len({redis_cluster.owner_of(key).port for key in keys}) > 1  # spread over masters
    serve = start_serve("--tasks", "3", environ=environ)
    serve.wait_ready()
    done = run_streamd(environ, "produce", "6000", timeout=90)
    assert done.returncode == 0, explain(done)
    wait_until(lambda: count_rows(dsn) == 6000, timeout=90, message="rows")
    by_stream = Counter(
        {
            r["stream"]: r["n"]
            for r in pg_fetch(dsn, "SELECT stream, count(*) AS n FROM events GROUP BY 1")
        }
    )
    assert set(by_stream) == set(keys)  # the shard key in `stream`, every shard used
    assert sum(by_stream.values()) == 6000
    # The logical stream, as docs/scale-out.md queries it.
    logical = pg_fetch(
        dsn, "SELECT count(*) AS n FROM events WHERE stream LIKE $1", f"{stream}:{{%}}"
    )
    assert logical[0]["n"] == 6000
    with cluster_client(redis_cluster) as client:
        wait_until(
            lambda: sum(int(client.xpending(k, group)["pending"]) for k in keys) == 0, timeout=30
        )
    assert serve.poll() is None


def test_shrinking_while_a_shard_holds_entries_is_refused(
    env: dict[str, str], start_serve: Callable[..., ServeProcess]
) -> None:
    url = env["STREAMD_REDIS_URL"]
    with redis_client(url) as r:
        for key in shard_keys("events", 3):
            r.xgroup_create(key, "streamd", id="0", mkstream=True)
        r.xadd("events:{2}", event("left", {"n": 1}))  # undelivered, in the shard to drop
    serve = start_serve(environ={**env, "STREAMD_SHARDS": "2"})
    assert serve.wait(30) == EXIT_BOOT
    last = serve.output().strip().splitlines()[-1]
    assert last.startswith("streamd: error: stream 'events': shard 'events:{2}' still holds")
    assert "set shards back to at least 3" in last and "Traceback" not in serve.output()

    # Drained (its group has it, acknowledged), the same shrink starts.
    with redis_client(url) as r:
        (entry,) = r.xreadgroup("streamd", "drainer", {"events:{2}": ">"})[0][1]
        r.xack("events:{2}", "streamd", entry[0])
    serve = start_serve(environ={**env, "STREAMD_SHARDS": "2"})
    serve.wait_ready()
    assert serve.terminate() == 0
