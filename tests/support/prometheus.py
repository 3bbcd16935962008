"""Fixtures for the Prometheus tests (loaded by tests/conftest.py): Debian's `prometheus` and
`promtool`, installed when missing and the run is root (as `./run.sh test` installs the Redis
and PostgreSQL servers), and private Prometheus servers on free loopback ports."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from streamd.dev.common import DevServerError
from streamd.dev.prometheus import PrometheusServer, prometheus_tool

APT_TIMEOUT_S = 600


def ensure_debian_tool(name: str, package: str) -> Path:
    """The path of `name`; when it is missing and this is root on Debian, `apt-get install
    package` first (one xdist worker at a time). Otherwise the test fails, naming the package."""
    try:
        return prometheus_tool(name)
    except DevServerError as exc:
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            pytest.fail(f"{exc} (as root, the tests install it themselves)", pytrace=False)
    lock_path = Path(tempfile.gettempdir()) / "streamd-apt-install.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another worker may be installing it right now
        try:
            return prometheus_tool(name)
        except DevServerError:
            pass
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for cmd in (
            ["apt-get", "update", "-qq"],
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", package],
        ):
            done = subprocess.run(
                cmd, env=env, capture_output=True, text=True, timeout=APT_TIMEOUT_S, check=False
            )
            if done.returncode != 0:
                tail = " | ".join(done.stderr.strip().splitlines()[-3:])
                pytest.fail(f"{' '.join(cmd)} failed ({done.returncode}): {tail}", pytrace=False)
    return prometheus_tool(name)


@pytest.fixture(scope="session")
def promtool() -> Path:
    return ensure_debian_tool("promtool", "prometheus")


@pytest.fixture(scope="session")
def prometheus_binary() -> Path:
    return ensure_debian_tool("prometheus", "prometheus")


@pytest.fixture
def make_prometheus(
    server_root: Path, prometheus_binary: Path
) -> Iterator[Callable[..., PrometheusServer]]:
    """make_prometheus(config) -> a private Prometheus with that prometheus.yml (a mapping),
    started, and killed and deleted after the test."""
    servers: list[PrometheusServer] = []

    def make(config: dict[str, Any], **kwargs: Any) -> PrometheusServer:
        index = len(servers) + 1
        server = PrometheusServer(
            server_root / f"prometheus-{os.getpid()}-{index}",
            config=config,
            binary=prometheus_binary,
            **kwargs,
        )
        servers.append(server)
        return server.start()

    yield make
    for server in servers:
        server.kill()
        shutil.rmtree(server.dir, ignore_errors=True)
