"""The Compose profile `cluster` (docker-compose.yml): six cluster-mode Redis nodes, a one-shot
that assigns slots with one replica per master, and a streamd that reads the cluster, all out of
the default `docker compose up`. The settings it passes are ones streamd accepts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from streamd.config.sources import load_settings

ROOT = Path(__file__).resolve().parents[2]


def services() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return dict(data["services"])


def test_the_default_profile_is_unchanged() -> None:
    default = [name for name, s in services().items() if "profiles" not in s]
    assert default == ["redis", "postgres", "streamd"]


def test_six_cluster_nodes_and_an_init_with_one_replica_each() -> None:
    nodes = {n: s for n, s in services().items() if n.startswith("redis-node-")}
    assert sorted(nodes) == [f"redis-node-{i}" for i in range(1, 7)]
    for service in nodes.values():
        assert service["profiles"] == ["cluster"]
        command = service["command"]
        assert command[command.index("--cluster-enabled") + 1] == "yes"
        assert "--appendonly" in command
    init = services()["redis-cluster-init"]
    script = " ".join(init["command"])
    assert "--cluster create" in script and "--cluster-replicas 1" in script
    assert set(init["depends_on"]) == set(nodes)
    assert all(d["condition"] == "service_healthy" for d in init["depends_on"].values())


def test_streamd_cluster_reads_the_cluster_with_settings_streamd_accepts() -> None:
    service = services()["streamd-cluster"]
    assert service["profiles"] == ["cluster"]
    assert service["depends_on"]["redis-cluster-init"]["condition"] == (
        "service_completed_successfully"
    )
    env = {k: v for k, v in service["environment"].items() if k.startswith("STREAMD_")}
    settings = load_settings(environ={k: str(v) for k, v in env.items()})[0]
    assert settings.redis_cluster is True and settings.shards == 6
    assert settings.stream_names == tuple(f"events:{{{i}}}" for i in range(6))
