"""The shipped Prometheus kit (deploy/prometheus): promtool's checks and unit tests of the alert
rules, and a real Prometheus (Debian's package) scraping a real `streamd serve` with the shipped
scrape config and rules, whose Postgres alert goes pending when Postgres stops and resolves when
it is back."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from streamd.config.settings import Settings
from streamd.dev.prometheus import PrometheusServer
from streamd.dev.servers import PostgresServer
from tests.support.helpers import ServeProcess, event, wait_until, xadd

ROOT = Path(__file__).resolve().parents[2]
KIT = ROOT / "deploy" / "prometheus"


def run_promtool(promtool: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(promtool), *args], cwd=KIT, capture_output=True, text=True, timeout=60, check=False
    )


def test_promtool_checks_the_config_and_the_rules(promtool: Path) -> None:
    done = run_promtool(promtool, "check", "config", "prometheus.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    done = run_promtool(promtool, "check", "rules", "streamd.rules.yml")
    assert done.returncode == 0, done.stdout + done.stderr


def test_alert_rules_pass_their_promtool_unit_tests(promtool: Path) -> None:
    done = run_promtool(promtool, "test", "rules", "tests/streamd.rules.test.yml")
    assert done.returncode == 0, done.stdout + done.stderr


# --- a real Prometheus, scraping a real serve ------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape_page(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        return str(resp.read().decode())


def shipped_config(target_port: int) -> dict[str, Any]:
    """deploy/prometheus/prometheus.yml as shipped, with the test's target and 1 s intervals (so
    that an alert goes pending within seconds), its rule files by absolute path."""
    config: dict[str, Any] = yaml.safe_load((KIT / "prometheus.yml").read_text())
    config["global"] |= {
        "scrape_interval": "1s",
        "evaluation_interval": "1s",
        "scrape_timeout": "1s",
    }
    config["rule_files"] = [str(KIT / path) for path in config["rule_files"]]
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "streamd"]
    job["static_configs"] = [{"targets": [f"127.0.0.1:{target_port}"]}]
    return config


def alert_states(prometheus: PrometheusServer, name: str) -> set[str]:
    return {a["state"] for a in prometheus.alerts() if a["labels"]["alertname"] == name}


def test_prometheus_alerts_when_postgres_stops_and_resolves_when_it_is_back(
    env: dict[str, str],
    settings: Settings,
    make_postgres: Callable[..., PostgresServer],
    start_serve: Callable[..., ServeProcess],
    make_prometheus: Callable[..., PrometheusServer],
) -> None:
    pg = make_postgres()
    port = free_port()
    environ = env | {"STREAMD_METRICS_PORT": str(port), "STREAMD_POSTGRES_DSN": pg.dsn}
    start_serve(environ=environ).wait_ready(1)
    prometheus = make_prometheus(shipped_config(port))

    def scraped() -> bool:
        up = prometheus.query('up{job="streamd"}')
        pg_up = prometheus.query("streamd_postgres_up")
        return bool(up and up[0]["value"][1] == "1" and pg_up and pg_up[0]["value"][1] == "1")

    wait_until(scraped, timeout=60, message="Prometheus scraping serve")
    groups = prometheus.api("rules")["groups"]
    rules = [r for g in groups for r in g["rules"]]
    shipped = yaml.safe_load((KIT / "streamd.rules.yml").read_text())["groups"][0]["rules"]
    assert {r["name"] for r in rules} == {r["alert"] for r in shipped}
    assert all(r["health"] == "ok" for r in rules), [r for r in rules if r["health"] != "ok"]
    assert not alert_states(prometheus, "StreamdPostgresDown")

    pg.stop()
    states = wait_until(
        lambda: alert_states(prometheus, "StreamdPostgresDown") & {"pending", "firing"},
        timeout=60,
        message="StreamdPostgresDown pending or firing",
    )
    assert states
    assert not alert_states(prometheus, "StreamdRedisDown")  # only what is down

    pg.start()
    wait_until(
        lambda: not alert_states(prometheus, "StreamdPostgresDown"),
        timeout=60,
        message="StreamdPostgresDown resolved",
    )


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(
        (ROOT / "deploy" / "grafana" / "streamd-dashboard.json").read_text()
    )
    return data


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", [])]


def test_every_metric_the_dashboard_queries_exists_in_a_live_metrics_page(
    env: dict[str, str], start_serve: Callable[..., ServeProcess]
) -> None:
    port = free_port()
    start_serve(environ=env | {"STREAMD_METRICS_PORT": str(port)}).wait_ready(1)
    page = wait_until(lambda: scrape_page(port), timeout=30, ignore=(OSError,))
    exposed = set()
    for family in text_string_to_metric_families(page):
        exposed.add(family.name)
        exposed.update(s.name for s in family.samples)
    queried = {name for expr in dashboard_exprs() for name in re.findall(r"\bstreamd_\w+", expr)}
    variables = [v["definition"] for v in dashboard()["templating"]["list"] if "definition" in v]
    queried |= {name for v in variables for name in re.findall(r"\bstreamd_\w+", v)}
    assert len(queried) >= 15
    assert queried - exposed == set()


def test_the_dashboards_queries_run_on_prometheus(
    env: dict[str, str],
    settings: Settings,
    start_serve: Callable[..., ServeProcess],
    make_prometheus: Callable[..., PrometheusServer],
) -> None:
    port = free_port()
    start_serve(environ=env | {"STREAMD_METRICS_PORT": str(port)}).wait_ready(1)
    xadd(settings.redis_url, [event("t", {"i": i}) for i in range(100)] + [{"data": "{}"}])
    prometheus = make_prometheus(shipped_config(port))
    wait_until(
        lambda: len(prometheus.query("streamd_batches_total[10s]")[0]["values"]) >= 3,
        timeout=60,
        ignore=(IndexError, KeyError),
        message="a few scrapes",
    )
    # Grafana's variables, as an "All" selection and a short rate window expand them.
    values = {"$__rate_interval": "1m", "$stream": ".+", "$instance": ".+"}
    for expr in dashboard_exprs():
        query = expr
        for name, value in values.items():
            query = query.replace(name, value)
        assert prometheus.query(query), f"no series: {query}"  # and a bad query raises
