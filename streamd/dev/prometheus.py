"""A private Prometheus server, for the tests of the shipped scrape config, alert rules and
dashboard (deploy/prometheus, deploy/grafana) against a real `streamd serve`.

Like the Redis and PostgreSQL servers beside it: its own directory, a free loopback port, its own
session, and killed with the test process. It only touches loopback: it listens on 127.0.0.1,
scrapes the targets its config names, and has no Alertmanager, remote write or other outbound
feature configured (Prometheus has no update checks or telemetry of its own).

The binaries come from Debian's `prometheus` package (`prometheus` and `promtool`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Self

from streamd.dev.common import DevServerError
from streamd.dev.servers import _Server

PROMETHEUS_HINT = "install it with: apt-get install prometheus"
HTTP_TIMEOUT_S = 5.0


def prometheus_tool(name: str) -> Path:
    """`prometheus` or `promtool`: $STREAMD_PROMETHEUS_BIN/<name>, else PATH, else /usr/bin."""
    override = os.environ.get("STREAMD_PROMETHEUS_BIN")
    candidates = [Path(override) / name] if override else []
    found = shutil.which(name)
    candidates += [Path(found)] if found else []
    candidates.append(Path("/usr/bin") / name)
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return path
    where = f"in {override} (STREAMD_PROMETHEUS_BIN)" if override else "on PATH"
    raise DevServerError(f"{name} not found {where}; {PROMETHEUS_HINT}")


@dataclass(eq=False)
class PrometheusServer(_Server):
    """prometheus with the given config (a prometheus.yml as a mapping), its TSDB in its dir."""

    config: dict[str, Any] = field(default_factory=dict)
    binary: Path | None = None

    name: ClassVar[str] = "prometheus"
    file_stem: ClassVar[str] = "prometheus"  # prometheus.pid: Prometheus writes none, start() does
    stop_signal: ClassVar[signal.Signals] = signal.SIGTERM
    parent_death_signal: ClassVar[signal.Signals] = signal.SIGKILL

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def config_path(self) -> Path:
        return self.dir / "prometheus.yml"

    def _prepare(self) -> None:
        if self.binary is None:
            self.binary = prometheus_tool("prometheus")
        # JSON is YAML: no YAML library needed to write the config.
        self.config_path.write_text(json.dumps(self.config, indent=2) + "\n")

    def _command(self) -> list[str]:
        return [
            str(self.binary),
            f"--config.file={self.config_path}",
            f"--storage.tsdb.path={self.dir / 'data'}",
            "--storage.tsdb.retention.time=1d",
            f"--web.listen-address=127.0.0.1:{self.port}",
        ]

    def _popen_extra(self) -> dict[str, Any]:
        return {"cwd": str(self.dir)}

    def start(self) -> Self:
        super().start()
        if self._proc is not None:
            self.pid_file.write_text(f"{self._proc.pid}\n")
        return self

    def ping(self) -> bool:
        """/-/ready answers 200 once the TSDB is open and the server serves queries."""
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1.0) as resp:
                return bool(resp.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    # --- the HTTP API ------------------------------------------------------------------------

    def api(self, path: str, **params: str) -> Any:
        """GET /api/v1/<path>?params and return its `data`; a failed query raises DevServerError."""
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        try:
            with urllib.request.urlopen(
                f"{self.url}/api/v1/{path}{query}", timeout=HTTP_TIMEOUT_S
            ) as resp:
                body = json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            body = json.loads(exc.read() or b"{}")
        if body.get("status") != "success":
            raise DevServerError(f"prometheus {path}: {body.get('error') or body}")
        return body["data"]

    def alerts(self) -> list[dict[str, Any]]:
        """The active alerts (pending or firing), as /api/v1/alerts lists them."""
        alerts: list[dict[str, Any]] = self.api("alerts")["alerts"]
        return alerts

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's result vector."""
        data = self.api("query", query=expr)
        result: list[dict[str, Any]] = data["result"]
        return result
