"""The shipped Prometheus kit (deploy/prometheus): promtool's checks and unit tests of the alert
rules, and a real Prometheus (Debian's package) scraping a real `streamd serve` with the shipped
scrape config and rules, whose Postgres alert goes pending when Postgres stops and resolves when
it is back."""

from __future__ import annotations

import subprocess
from pathlib import Path

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
