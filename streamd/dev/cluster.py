"""A private Redis Cluster on loopback: three masters with one replica each, for the test suite
(and for trying streamd against a cluster by hand).

Each node is a RedisServer (servers.py) in a directory of its own, with cluster mode on and its
cluster bus on a port chosen like the client port (`cluster-port`; the default, port + 10000,
may be taken or out of range). `redis-cli --cluster create` assigns the slots and the replicas;
start() returns once every node reports cluster_state:ok and agrees on who owns every slot.

Fault helpers act like an operator would: kill -9 of a node, CLUSTER FAILOVER on a replica,
moving a slot to another master (the MIGRATING/IMPORTING dance `redis-cli --cluster reshard` does).
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import redis

from streamd.dev.common import START_TIMEOUT_S, DevServerError
from streamd.dev.processes import free_port
from streamd.dev.servers import RedisServer

NODE_TIMEOUT_MS = 2000  # how long a master may be unreachable before its replica takes over


@dataclass(eq=False)
class ClusterNode(RedisServer):
    """One cluster node: a RedisServer with cluster mode on and its bus port of its own."""

    bus_port: int = 0
    node_timeout_ms: int = NODE_TIMEOUT_MS

    name = "redis-server (cluster node)"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.bus_port == 0:
            self.bus_port = free_port()
        self.config = {
            "cluster-enabled": "yes",
            "cluster-config-file": "nodes.conf",
            "cluster-port": str(self.bus_port),
            "cluster-node-timeout": str(self.node_timeout_ms),
            "databases": "1",  # a cluster has only database 0
            **self.config,
        }

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=10)

    def info(self, section: str) -> dict[str, str]:
        with self.client() as client:
            return {key: str(value) for key, value in client.info(section).items()}

    def cluster_info(self) -> dict[str, str]:
        with self.client() as client:
            reply = client.execute_command("CLUSTER", "INFO")
        if isinstance(reply, dict):  # parsed by redis-py
            return {key: str(value) for key, value in reply.items()}
        text = reply.decode() if isinstance(reply, bytes) else str(reply)
        return dict(line.strip().split(":", 1) for line in text.splitlines() if ":" in line)

    def node_id(self) -> str:
        with self.client() as client:
            return str(client.execute_command("CLUSTER", "MYID").decode())

    def role(self) -> str:
        """'master' or 'slave', as this node sees itself."""
        return self.info("replication").get("role", "?")


@dataclass(eq=False)
class LocalRedisCluster:
    """`masters` masters with `replicas` replicas each, every node under `dir`."""

    dir: Path
    masters: int = 3
    replicas: int = 1
    appendfsync: str = "everysec"
    node_timeout_ms: int = NODE_TIMEOUT_MS
    start_timeout_s: float = START_TIMEOUT_S
    config: dict[str, str] = field(default_factory=dict)  # extra redis.conf lines, every node
    nodes: list[ClusterNode] = field(default_factory=list, init=False)
    _started: bool = field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        self.dir = Path(self.dir).absolute()
        count = self.masters * (1 + self.replicas)
        self.nodes = [
            ClusterNode(
                self.dir / f"node-{i}",
                appendfsync=self.appendfsync,
                node_timeout_ms=self.node_timeout_ms,
                config=dict(self.config),
            )
            for i in range(count)
        ]

    @property
    def url(self) -> str:
        """A seed node's URL: a cluster client learns the others from it."""
        return self.nodes[0].url

    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    # --- life cycle ---
    def start(self) -> Self:
        if not self._started:
            # Left by an earlier cluster on other ports: its nodes.conf would name those.
            for node in self.nodes:
                if not node.is_running():
                    shutil.rmtree(node.dir, ignore_errors=True)
            self._started = True
        for node in self.nodes:
            node.start()
        if self.nodes[0].cluster_info().get("cluster_known_nodes") != str(len(self.nodes)):
            self._create()
        self.wait_ok()
        return self

    def _create(self) -> None:
        cli = shutil.which("redis-cli")
        if cli is None:
            raise DevServerError("redis-cli not found on PATH; it creates the cluster")
        addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
        options = ["--cluster-replicas", str(self.replicas), "--cluster-yes"]
        done = subprocess.run(
            [cli, "--cluster", "create", *addresses, *options],
            capture_output=True,
            text=True,
            timeout=self.start_timeout_s,
            check=False,
        )
        if done.returncode != 0:
            raise DevServerError(f"redis-cli --cluster create failed: {done.stdout[-500:]}")

    def wait_ok(self, timeout_s: float | None = None) -> None:
        """Until every running node says cluster_state:ok, they agree on the slots' owners, and
        every master has its replicas attached and in sync."""
        _wait(
            self._healthy,
            timeout_s or self.start_timeout_s,
            lambda: f"cluster not ok: {self._state_summary()}",
        )

    def _healthy(self) -> bool:
        running = [node for node in self.nodes if node.is_running()]
        try:
            if any(node.cluster_info().get("cluster_state") != "ok" for node in running):
                return False
            views = {self._slot_owners(node) for node in running}
            if len(views) != 1:
                return False
            for node in running:
                info = node.info("replication")
                if info.get("role") == "slave" and info.get("master_link_status") != "up":
                    return False
        except redis.RedisError:
            return False
        return True

    def _state_summary(self) -> str:
        parts = []
        for node in self.nodes:
            if not node.is_running():
                parts.append(f"{node.port}: down")
                continue
            try:
                parts.append(f"{node.port}: {node.cluster_info().get('cluster_state')}")
            except redis.RedisError as exc:
                parts.append(f"{node.port}: {exc}")
        return ", ".join(parts)

    @staticmethod
    def _slot_owners(node: ClusterNode) -> tuple[tuple[int, int, int], ...]:
        with node.client() as client:
            slots = client.execute_command("CLUSTER", "SLOTS")
        # redis-py parses CLUSTER SLOTS into {(start, end): {"primary": (host, port), ...}}.
        if isinstance(slots, dict):
            return tuple(sorted((a, b, v["primary"][1]) for (a, b), v in slots.items()))
        return tuple(sorted((int(s[0]), int(s[1]), int(s[2][1])) for s in slots))

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def kill(self) -> None:
        for node in self.nodes:
            node.kill()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *_exc_info: object) -> None:
        self.kill()

    # --- who is who ---
    def running(self) -> Iterator[ClusterNode]:
        return (node for node in self.nodes if node.is_running())

    def master_nodes(self) -> list[ClusterNode]:
        return [node for node in self.running() if node.role() == "master"]

    def replica_nodes(self) -> list[ClusterNode]:
        return [node for node in self.running() if node.role() == "slave"]

    def by_port(self, port: int) -> ClusterNode:
        return next(node for node in self.nodes if node.port == port)

    def slot_of(self, key: str) -> int:
        with next(self.running()).client() as client:
            return int(client.execute_command("CLUSTER", "KEYSLOT", key))

    def owner_of(self, key: str) -> ClusterNode:
        """The master serving key's slot now."""
        slot = self.slot_of(key)
        node = next(self.running())
        for start, end, port in self._slot_owners(node):
            if start <= slot <= end:
                return self.by_port(port)
        raise DevServerError(f"no master serves slot {slot}")

    def replica_of(self, master: ClusterNode) -> ClusterNode:
        master_id = master.node_id()
        for node in self.replica_nodes():
            with node.client() as client:
                nodes = client.execute_command("CLUSTER", "NODES").decode()
            mine = next(line for line in nodes.splitlines() if "myself" in line)
            if mine.split()[3] == master_id:
                return node
        raise DevServerError(f"master on port {master.port} has no replica")

    # --- faults ---
    def failover(self, replica: ClusterNode, timeout_s: float = 30.0) -> None:
        """CLUSTER FAILOVER on a replica (a manual, coordinated failover: no write is lost), and
        wait until it is master and the cluster is ok again."""
        with replica.client() as client:
            client.execute_command("CLUSTER", "FAILOVER")
        _wait(lambda: replica.role() == "master", timeout_s, lambda: "failover did not finish")
        self.wait_ok(timeout_s)

    def kill_master(self, master: ClusterNode, timeout_s: float = 60.0) -> ClusterNode:
        """kill -9 a master; wait until its replica was promoted and the cluster is ok; return
        the promoted replica. The killed node stays down (start it again to rejoin as replica)."""
        replica = self.replica_of(master)
        master.kill()
        _wait(lambda: replica.role() == "master", timeout_s, lambda: "no replica promoted")
        self.wait_ok(timeout_s)
        return replica

    def move_slot(self, slot: int, target: ClusterNode, batch: int = 100) -> None:
        """Migrate one slot and its keys to master `target`, as `redis-cli --cluster reshard` does:
        IMPORTING on the target, MIGRATING on the source, MIGRATE the keys, then SETSLOT NODE on
        both and the other masters. Clients meanwhile get ASK, then MOVED."""
        source = next(
            self.by_port(port)
            for start, end, port in self._slot_owners(target)
            if start <= slot <= end
        )
        if source is target:
            return
        source_id, target_id = source.node_id(), target.node_id()
        with target.client() as dst, source.client() as src:
            dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
            src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
            while keys := src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, batch):
                src.execute_command(
                    "MIGRATE", "127.0.0.1", target.port, "", 0, 10_000, "KEYS", *keys
                )
            dst.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
            src.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
        for node in self.master_nodes():
            if node not in (source, target):
                with node.client() as client, contextlib.suppress(redis.RedisError):
                    client.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
        self.wait_ok()


def _wait(done: Callable[[], bool], timeout_s: float, why: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if done():
                return
        except redis.RedisError:
            pass
        if time.monotonic() > deadline:
            raise DevServerError(why())
        time.sleep(0.05)
