"""The deploy kits, checked by parsing them (no kubectl or docker here): the Kubernetes manifests
(probes, grace period, metrics address, disruption budget, KEDA trigger) against the settings the
pod would really resolve; Compose, .env.example and the Dockerfile against what Docker does with
them; the Grafana dashboard's shape."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from streamd.config import Settings, load_settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"


def k8s_objects() -> dict[str, dict[str, Any]]:
    """Every object under deploy/kubernetes, by kind (each kind appears once)."""
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc["kind"] not in out, f"{doc['kind']} twice"
            out[doc["kind"]] = doc | {"_file": path.name}
    return out


@pytest.fixture(scope="module")
def objects() -> dict[str, dict[str, Any]]:
    return k8s_objects()


@pytest.fixture(scope="module")
def container(objects: dict[str, dict[str, Any]]) -> dict[str, Any]:
    containers = objects["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    c: dict[str, Any] = containers[0]
    return c


@pytest.fixture(scope="module")
def pod_settings(
    objects: dict[str, dict[str, Any]],
    container: dict[str, Any],
    tmp_path_factory: pytest.TempPathFactory,
) -> Settings:
    """The settings streamd resolves in the pod: the ConfigMap's streamd.toml, mounted where
    STREAMD_CONFIG points, and the container's literal env (the Secret's file stands in)."""
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = objects["Deployment"]["spec"]["template"]["spec"]["volumes"]
    config_volume = next(v for v in volumes if "configMap" in v)
    assert config_volume["configMap"]["name"] == objects["ConfigMap"]["metadata"]["name"]
    assert env["STREAMD_CONFIG"] == f"{mounts[config_volume['name']]}/streamd.toml"
    secret_volume = next(v for v in volumes if "secret" in v)
    assert env["STREAMD_POSTGRES_PASSWORD_FILE"].startswith(mounts[secret_volume["name"]] + "/")
    assert env["STREAMD_STATE_DIR"] in mounts.values()  # writable: the root filesystem is not

    scratch = tmp_path_factory.mktemp("pod")
    config = scratch / "streamd.toml"
    config.write_text(objects["ConfigMap"]["data"]["streamd.toml"])
    secret = scratch / "postgres-password"
    secret.write_text("s3cret\n")
    env |= {"STREAMD_CONFIG": str(config), "STREAMD_POSTGRES_PASSWORD_FILE": str(secret)}
    settings, _ = load_settings(environ=env)  # unknown keys or bad values raise here
    assert settings.postgres_password == "s3cret"
    return settings


def labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_kustomization_lists_the_core_manifests(objects: dict[str, dict[str, Any]]) -> None:
    listed = set(objects["Kustomization"]["resources"])
    files = {o["_file"] for o in objects.values()}
    # The CRD-based ones are applied separately: a cluster without KEDA or the operator would
    # refuse the whole kustomization.
    assert listed == files - {"kustomization.yaml", "scaledobject.yaml", "servicemonitor.yaml"}
    assert {"configmap.yaml", "deployment.yaml", "poddisruptionbudget.yaml"} <= listed


def test_deployment_probes_use_healthz_and_readyz_on_the_metrics_port(
    container: dict[str, Any], pod_settings: Settings
) -> None:
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["metrics"] == pod_settings.metrics_port
    liveness, readiness = container["livenessProbe"], container["readinessProbe"]
    assert liveness["httpGet"]["path"] == "/healthz"
    assert readiness["httpGet"]["path"] == "/readyz"
    for probe in (liveness, readiness):
        assert ports.get(probe["httpGet"]["port"], probe["httpGet"]["port"]) == ports["metrics"]
        # /readyz waits up to 2 s for Redis and 2 s for Postgres before it answers.
        assert probe["timeoutSeconds"] > 4


def test_metrics_listen_on_every_interface_of_the_pod(pod_settings: Settings) -> None:
    assert pod_settings.metrics_host == "0.0.0.0"


def test_termination_grace_outlasts_the_drain(
    objects: dict[str, dict[str, Any]], pod_settings: Settings
) -> None:
    grace = objects["Deployment"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > pod_settings.graceful_timeout_s
    assert pod_settings.graceful_timeout_s == 30  # the documented value, not the default by luck


def test_no_service_links_reach_streamds_settings(objects: dict[str, dict[str, Any]]) -> None:
    # REDIS_PORT=tcp://..., POSTGRES_PORT=..., STREAMD_SERVICE_HOST=... would be read as settings.
    assert objects["Deployment"]["spec"]["template"]["spec"]["enableServiceLinks"] is False


def test_the_container_runs_streamd_serve_itself_as_non_root(container: dict[str, Any]) -> None:
    assert [*container["command"], *container["args"]] == ["streamd", "serve"]
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False


def test_pod_disruption_budget_and_service_select_the_pods(
    objects: dict[str, dict[str, Any]],
) -> None:
    pod_labels = objects["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert labels_match(objects["Deployment"]["spec"]["selector"]["matchLabels"], pod_labels)
    pdb = objects["PodDisruptionBudget"]
    assert pdb["apiVersion"] == "policy/v1"
    assert labels_match(pdb["spec"]["selector"]["matchLabels"], pod_labels)
    assert pdb["spec"]["maxUnavailable"] == 1
    assert labels_match(objects["Service"]["spec"]["selector"], pod_labels)
    monitor = objects["ServiceMonitor"]
    assert labels_match(
        monitor["spec"]["selector"]["matchLabels"], objects["Service"]["metadata"]["labels"]
    )
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"


def test_keda_scales_the_deployment_on_the_groups_lag(
    objects: dict[str, dict[str, Any]], container: dict[str, Any], pod_settings: Settings
) -> None:
    scaled = objects["ScaledObject"]
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    assert scaled["spec"]["scaleTargetRef"]["name"] == objects["Deployment"]["metadata"]["name"]
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "redis-streams"
    meta = trigger["metadata"]
    assert meta["stream"] == pod_settings.stream
    assert meta["consumerGroup"] == pod_settings.group
    assert int(meta["lagCount"]) > 0 and "pendingEntriesCount" not in meta
    assert int(meta["activationLagCount"]) >= 0
    # KEDA reads the address from the container's env: the same Redis streamd uses.
    env = {e["name"]: e.get("value") for e in container["env"]}
    url = urlsplit(pod_settings.redis_url)
    assert env[meta["hostFromEnv"]] == url.hostname
    assert int(env[meta["portFromEnv"]]) == url.port
    assert url.path == f"/{meta['databaseIndex']}"
    assert scaled["spec"]["minReplicaCount"] >= 1  # lag-based scaling could go to 0; we keep one


# --- Docker -----------------------------------------------------------------------------------


def env_file(path: Path) -> dict[str, str]:
    """What `docker run --env-file` and Compose's env_file make of a file: NAME=VALUE lines,
    the value being the rest of the line (a `#` in it included), comment and blank lines skipped."""
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, sep, value = line.partition("=")
        assert sep, f"not NAME=VALUE: {line!r}"
        out[name.strip()] = value
    return out


def test_env_example_has_no_inline_comments_and_loads() -> None:
    path = ROOT / ".env.example"
    values = env_file(path)
    for name, value in values.items():
        assert "#" not in value and value == value.strip(), f"{name}={value!r}"
    settings, sources = load_settings(environ=values)
    assert settings.tasks == 5 and sources["tasks"] == "env NUM_WORKERS"
    assert settings.batch_timeout_s == 2 and settings.block_ms == 5000
    assert settings.postgres_password == "streaming_pass"


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def test_compose_hands_env_to_streamd_and_stops_after_the_drain() -> None:
    service = compose()["services"]["streamd"]
    assert [e["path"] for e in service["env_file"]] == [".env"]
    env = service["environment"]
    drain = float(env["STREAMD_GRACEFUL_TIMEOUT_S"])
    grace = re.fullmatch(r"(\d+)s", service["stop_grace_period"])
    assert grace is not None and int(grace.group(1)) > drain
    assert service["restart"] == "on-failure"  # with the entrypoint: no loop on 2 and 78
    assert service["init"] is True
    assert env["STREAMD_METRICS_HOST"] == "0.0.0.0"


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, rest) per Dockerfile instruction, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", (ROOT / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_health_ports_stop_and_entrypoint() -> None:
    instructions = dockerfile()
    by_name: dict[str, list[str]] = {}
    for word, rest in instructions:
        by_name.setdefault(word, []).append(rest)
    env = dict(re.findall(r'(\w+)=("[^"]*"|\S+)', " ".join(by_name["ENV"])))
    port = env["STREAMD_METRICS_PORT"]
    assert by_name["EXPOSE"] == [port]
    assert env["STREAMD_METRICS_HOST"] == "0.0.0.0"
    (health,) = by_name["HEALTHCHECK"]
    assert health.endswith('CMD ["streamd", "health"]')
    assert by_name["STOPSIGNAL"] == ["SIGTERM"]
    # `docker stop` waits 10 s before SIGKILL: the image's default drain fits in it.
    assert float(env["STREAMD_GRACEFUL_TIMEOUT_S"]) < 10
    assert json.loads(by_name["ENTRYPOINT"][0]) == ["streamd-entrypoint"]
    assert json.loads(by_name["CMD"][0]) == ["serve"]
    copied = [rest for rest in by_name["COPY"] if "entrypoint" in rest]
    assert copied == ["--chmod=0755 deploy/docker/entrypoint.py /usr/local/bin/streamd-entrypoint"]


# --- Grafana ----------------------------------------------------------------------------------


def dashboard_exprs() -> list[str]:
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "streamd-dashboard.json").read_text())
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def test_dashboard_panels_have_queries_and_the_stream_variable() -> None:
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "streamd-dashboard.json").read_text())
    names = [v["name"] for v in dashboard["templating"]["list"]]
    assert names == ["datasource", "stream", "instance"]
    exprs = dashboard_exprs()
    assert len(exprs) >= 20
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(set(ids)) == len(ids)
    assert all(p.get("targets") for p in panels)
    # Stream-labelled metrics follow the $stream picker.
    for expr in exprs:
        for name in ("streamd_consumer_lag", "streamd_pending", "streamd_dead_letters_total"):
            if name in expr:
                assert '"$stream"' in expr or "($stream)" in expr, expr
