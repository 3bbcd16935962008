"""Redis Cluster: whether Redis is one, and how a command about a key reaches the node serving it.

streamd does not route commands itself where redis-py can: the cluster client (redis-py's asyncio
RedisCluster, built by connections.redis_client) sends each command to the master of its key's
slot and follows MOVED and ASK. What streamd drives by hand (a consumer's reads and acks over a
connection of its own, the producer's pipelined scripts) asks `KeyConnections` for a connection
to the node serving a key, and after MOVED, a failover or a lost node asks it to `refresh` the
slot map; the command itself is retried by the caller's policy (faults.TRANSIENT_ERRORS).

`redis_cluster = "auto"` is detected once per process and Redis URL (INFO cluster), with a
short synchronous probe: it runs before any command, where blocking one round trip is harmless.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

import redis
import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.crc import key_slot

from streamd.config.settings import Settings

_detected: dict[str, bool] = {}  # redis_url -> cluster mode, for redis_cluster = "auto"
_PROBE_TIMEOUT_S = 5.0


def detect_cluster(settings: Settings, client_kwargs: dict[str, Any]) -> bool:
    """Whether the Redis at redis_url runs in cluster mode (INFO cluster: cluster_enabled:1).

    A Redis that refuses INFO to this user (its ACL) is asked CLUSTER INFO, which a server
    without cluster support refuses; refused both, it is taken for a single Redis. Raises
    redis-py's ConnectionError and TimeoutError when Redis cannot be reached."""
    known = _detected.get(settings.redis_url)
    if known is not None:
        return known
    timeout = min(settings.redis_timeout_s, _PROBE_TIMEOUT_S)
    kwargs = {k: v for k, v in client_kwargs.items() if k.startswith(("ssl_", "password"))}
    # Without the URL's database: a cluster has none but 0, and the user may not SELECT.
    url = urlsplit(settings.redis_url)._replace(path="").geturl()
    with redis.Redis.from_url(
        url, socket_timeout=timeout, socket_connect_timeout=timeout, **kwargs
    ) as probe:
        try:
            enabled = bool(int(probe.info("cluster").get("cluster_enabled", 0)))
        except redis.exceptions.NoPermissionError:
            try:
                probe.execute_command("CLUSTER", "INFO")
                enabled = True
            except redis.exceptions.ResponseError:
                enabled = False
    _detected[settings.redis_url] = enabled
    return enabled


def cluster_mode(settings: Settings, client_kwargs: dict[str, Any] | None = None) -> bool:
    """redis_cluster as configured, or as detected for 'auto'. When Redis cannot be reached:
    False for now (not remembered), so the caller's own first command reports the outage."""
    if settings.redis_cluster != "auto":
        return bool(settings.redis_cluster)
    try:
        return detect_cluster(settings, client_kwargs or {})
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError):
        return False


def slot_of(key: str | bytes) -> int:
    return key_slot(key.encode() if isinstance(key, str) else key)


def by_slot(keys: Iterable[str]) -> dict[int, list[str]]:
    """keys grouped by cluster slot, in their order: a command naming several keys (XREADGROUP
    over many streams) may only name keys of one slot."""
    groups: dict[int, list[str]] = {}
    for key in keys:
        groups.setdefault(slot_of(key), []).append(key)
    return groups


def same_slot(*keys: str) -> bool:
    return len({slot_of(key) for key in keys}) <= 1


def is_cluster_client(client: Any) -> bool:
    return isinstance(client, RedisCluster)


class KeyConnections:
    """Connections for commands streamd packs itself: from the client's pool on one Redis, from
    the pool of the node serving the key's slot in a cluster. Each acquired connection is
    released to where it came from."""

    def __init__(self, client: aioredis.Redis | RedisCluster) -> None:
        self.client = client
        self._owners: dict[int, ClusterNode] = {}  # id(connection) -> its node

    @property
    def clustered(self) -> bool:
        return isinstance(self.client, RedisCluster)

    async def acquire(self, key: str | bytes) -> AbstractConnection:
        client = self.client
        if not isinstance(client, RedisCluster):
            conn: AbstractConnection = await client.connection_pool.get_connection()  # type: ignore[no-untyped-call]
            return conn
        await client.initialize()  # no-op once the slot map is known
        name = key.decode() if isinstance(key, bytes) else key
        node = client.get_node_from_key(name)
        if node is None:
            raise redis.exceptions.ClusterDownError(f"no node serves the slot of {name!r}")
        conn = node.acquire_connection()
        self._owners[id(conn)] = node
        return conn

    async def acquire_node(self, name: str) -> AbstractConnection:
        """A connection to the cluster node `name` (host:port), whatever slots it serves now."""
        client = self.client
        assert isinstance(client, RedisCluster), "a node is a cluster's"
        await client.initialize()
        node = client.get_node(node_name=name)
        if node is None:
            raise redis.exceptions.ClusterDownError(f"no cluster node {name!r} any more")
        conn = node.acquire_connection()
        self._owners[id(conn)] = node
        return conn

    def node_of(self, conn: AbstractConnection) -> str | None:
        """The name of the cluster node an acquired connection talks to (None on one Redis)."""
        node = self._owners.get(id(conn))
        return node.name if node is not None else None

    async def release(self, conn: AbstractConnection) -> None:
        client = self.client
        if not isinstance(client, RedisCluster):
            await client.connection_pool.release(conn)
            return
        node = self._owners.pop(id(conn), None)
        if node is not None:
            node.release(conn)  # type: ignore[arg-type]

    async def refresh(self) -> None:
        """Re-learn who serves which slot (after MOVED, a failover, a node lost)."""
        client = self.client
        if isinstance(client, RedisCluster):
            await client.nodes_manager.initialize()


# Replies that say the slot map is stale: the caller refreshes it and retries.
TOPOLOGY_ERRORS = (
    redis.exceptions.AskError,  # MovedError too
    redis.exceptions.ClusterDownError,
    redis.exceptions.TryAgainError,
    redis.exceptions.ReadOnlyError,  # a write to a master demoted meanwhile
)


class TopologyChanged(redis.exceptions.TryAgainError):
    """A server's role changed under a command (a failover): nothing to fix but to find the
    slot's node again and retry, which TRANSIENT_ERRORS (a TryAgainError) lets callers do."""


def topology_changed(exc: redis.exceptions.ResponseError) -> redis.exceptions.ResponseError | None:
    """exc as an error the caller retries after a refresh of the slot map, or None when it is
    about something else. A read blocked on a master that a failover demotes ends with
    `UNBLOCKED force unblock from blocking operation, instance state changed (master ->
    replica?)`, which redis-py knows no class for."""
    if isinstance(exc, TOPOLOGY_ERRORS):
        return exc
    text = str(exc)
    if text.startswith("UNBLOCKED") and "state changed" in text:
        return TopologyChanged(text)
    return None
