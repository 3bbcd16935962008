"""Shard and dead-stream names (config/sharding.py): what a Redis Cluster hashes, and that a
stream and its dead stream always share a slot."""

from __future__ import annotations

import pytest
from redis.crc import key_slot

from streamd.config.settings import Settings
from streamd.config.sharding import (
    dead_stream_of,
    expand_shards,
    hash_tag,
    logical_stream,
    shard_keys,
)
from streamd.config.tables import TableSpec


def test_hash_tags_follow_redis_rule() -> None:
    assert hash_tag("events") is None
    assert hash_tag("events:{3}") == "3"
    assert hash_tag("{user1000}.following") == "user1000"
    assert hash_tag("foo{}{bar}") is None  # an empty first tag: the whole key is hashed
    assert hash_tag("foo{{bar}}") == "{bar"


def test_shard_keys_and_expansion_keep_patterns() -> None:
    assert shard_keys("events", 1) == ("events",)
    assert shard_keys("events", 3) == ("events:{0}", "events:{1}", "events:{2}")
    assert expand_shards(["orders", "tenant:*"], 2) == ("orders:{0}", "orders:{1}", "tenant:*")
    assert Settings(shards=2).stream_names == ("events:{0}", "events:{1}")
    assert logical_stream("events:{12}") == "events" and logical_stream("events") == "events"


@pytest.mark.parametrize(
    "stream", ["events", "events:{3}", "{orders}", "orders:{eu}", "a.b-c", "x{y"]
)
def test_a_dead_stream_shares_its_streams_slot_in_a_cluster(stream: str) -> None:
    dead = dead_stream_of(stream, cluster=True)
    assert dead.endswith(":dead")
    assert key_slot(dead.encode()) == key_slot(stream.encode())


def test_on_one_redis_the_dead_stream_is_unchanged() -> None:
    assert dead_stream_of("events", cluster=False) == "events:dead"
    assert Settings().dead_stream == "events:dead"
    assert Settings(redis_cluster=True).dead_stream == "{events}:dead"
    assert (
        Settings(redis_cluster=True, streams=("events:{1}",)).dead_stream_for("events:{1}")
        == "events:{1}:dead"
    )


def test_a_sharded_streams_keys_route_to_the_logical_streams_table() -> None:
    s = Settings(shards=4, tables=(TableSpec("orders_events", ("orders",)),))
    assert s.table_for("orders:{2}") == "orders_events"
    assert s.table_for("other") == "events"
