"""`streamd health [--ready]`, the image's HEALTHCHECK, against the real `streamd serve`."""

from __future__ import annotations

import socket
from collections.abc import Callable

from streamd.dev.servers import PostgresServer
from tests.support.helpers import ServeProcess, wait_until
from tests.support.streamd_cli import explain, run_streamd


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_health_follows_the_serve_and_its_services(
    env: dict[str, str],
    make_postgres: Callable[..., PostgresServer],
    start_serve: Callable[..., ServeProcess],
) -> None:
    pg = make_postgres()
    port = free_port()
    # Serve listens on the wildcard address, as in the image: health asks loopback.
    environ = env | {
        "STREAMD_POSTGRES_DSN": pg.dsn,
        "STREAMD_METRICS_PORT": str(port),
        "STREAMD_METRICS_HOST": "0.0.0.0",
    }
    down = run_streamd(environ, "health")
    assert down.returncode == 1, explain(down)
    assert f"http://127.0.0.1:{port}/healthz: no answer" in down.stderr

    serve = start_serve(environ=environ)
    serve.wait_ready(1)
    alive = wait_until(lambda: (r := run_streamd(environ, "health")).returncode == 0 and r, 30)
    assert alive.stdout == f"http://127.0.0.1:{port}/healthz: ok\n"
    ready = wait_until(
        lambda: (r := run_streamd(environ, "health", "--ready")).returncode == 0 and r, 30
    )
    assert ready.stdout.endswith("/readyz: ready\n")

    pg.kill()
    not_ready = wait_until(
        lambda: (r := run_streamd(environ, "health", "--ready")).returncode == 1 and r, 30
    )
    assert "503 not ready: postgres" in not_ready.stderr, explain(not_ready)
    assert run_streamd(environ, "health").returncode == 0  # alive all the same


def test_health_without_metrics_is_a_config_error(env: dict[str, str]) -> None:
    done = run_streamd(env | {"STREAMD_METRICS_PORT": "0"}, "health")
    assert done.returncode == 2, explain(done)
    assert (
        done.stderr
        == "streamd: error: metrics_port is 0: serve has no /healthz or /readyz to ask\n"
    )
