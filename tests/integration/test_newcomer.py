"""The newcomer's path: the README's second terminal, run line by line as written against the
dev servers of a run.sh project (./run.sh redis-cli, ./run.sh psql, eval "$(./run.sh env)"),
and `dev up`, which checks both ports before it starts either and names commands that work
from where it was called."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from streamd.dev.commands import dev_down
from streamd.dev.processes import free_port
from tests.support.helpers import ServeProcess, pg_fetchval, wait_until

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(180)


def clean_environ(**extra: str) -> dict[str, str]:
    """This environment without streamd's, the seed's or run.sh's own names."""
    seed = ("REDIS_", "POSTGRES_", "NUM_WORKERS", "BATCH_", "XREAD_", "STREAMD_", "RUN_SH_")
    return {k: v for k, v in os.environ.items() if not k.startswith(seed)} | extra


@pytest.fixture
def project(server_root: Path) -> Iterator[Path]:
    """A state directory for run.sh (RUN_SH_STATE_DIR), its dev servers stopped at the end.
    Under server_root: PostgreSQL, another user when the tests run as root, must reach it."""
    state = Path(tempfile.mkdtemp(prefix="runsh-", dir=server_root))
    state.chmod(0o755)
    try:
        yield state
    finally:
        dev_down(state / "dev")
        shutil.rmtree(state, ignore_errors=True)


def start_dev_servers(project: Path) -> dict[str, str]:
    """`streamd dev up` (in a process of its own: the servers outlive it) on free ports; the
    environment it prints."""
    ports = ["--redis-port", str(free_port()), "--postgres-port", str(free_port())]
    done = subprocess.run(
        [sys.executable, "-m", "streamd", "dev", "up", "--root", str(project / "dev"), *ports],
        env=clean_environ(),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return dict(line.removeprefix("export ").split("=", 1) for line in done.stdout.splitlines())


def readme_second_terminal() -> list[str]:
    """The command lines of the README's "In another terminal, in the same directory" block."""
    text = (ROOT / "README.md").read_text()
    after = re.split(r"In another terminal, in the same\s+directory:", text, maxsplit=1)[1]
    block = re.search(r"```sh\n(.*?)```", after, re.S)
    assert block is not None
    return [line for line in block.group(1).splitlines() if line.strip()]


def bash(script: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-ec", script],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_readme_second_terminal_reaches_the_dev_servers(
    project: Path, start_serve: Callable[..., ServeProcess], env: dict[str, str]
) -> None:
    if (ROOT / ".env").exists():
        pytest.skip("a .env in the checkout: run.sh would point at its servers instead")
    dev = start_dev_servers(project)
    # The first terminal: serve on the dev servers (as `./run.sh demo --keep` leaves it).
    start_serve(environ=env | dev).wait_ready(1)
    environ = clean_environ(RUN_SH_STATE_DIR=str(project))
    xadd, psql, use_env, monitor = readme_second_terminal()

    added = bash(xadd, environ)
    assert added.returncode == 0, added.stderr
    assert re.fullmatch(r"\d+-\d+\n", added.stdout), added.stdout
    dsn = dev["STREAMD_POSTGRES_DSN"]
    query = "SELECT count(*) FROM events WHERE payload->>'email' = 'a@example.com'"
    wait_until(lambda: pg_fetchval(dsn, query) == 1, timeout=30, ignore=(Exception,))

    selected = bash(psql, environ)
    assert selected.returncode == 0, selected.stderr
    assert "user_created" in selected.stdout and "a@example.com" in selected.stdout

    dashboard = bash(f"{use_env}\ncommand -v streamd\n{monitor}", environ)
    assert dashboard.returncode == 0, dashboard.stderr
    assert dashboard.stdout.startswith(str(ROOT))  # the project's streamd, on PATH now
    exported = bash(f"{use_env}\nstreamd config --json --no-sources", environ)
    assert dev["STREAMD_REDIS_URL"] in exported.stdout, exported.stdout


def test_run_sh_env_without_servers_says_what_to_do(project: Path) -> None:
    done = bash("./run.sh env", clean_environ(RUN_SH_STATE_DIR=str(project)))
    assert done.returncode == 0
    assert "./run.sh dev up" in done.stderr
    assert "export PATH=" in done.stdout


def test_dev_up_checks_both_ports_before_starting_either(project: Path) -> None:
    redis_port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        pg_port = taken.getsockname()[1]
        done = subprocess.run(
            [
                "./run.sh",
                "dev",
                "up",
                "--redis-port",
                str(redis_port),
                "--postgres-port",
                str(pg_port),
            ],
            cwd=ROOT,
            env=clean_environ(RUN_SH_STATE_DIR=str(project)),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    assert done.returncode != 0
    assert f"port {pg_port} on 127.0.0.1 is already in use" in done.stderr
    # The hint names a command that works from here: run.sh's, as it was called.
    assert "./run.sh dev up --postgres-port N" in done.stderr
    assert not (project / "dev" / "redis" / "redis.pid").exists()  # Redis was never started
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", redis_port)) != 0


def test_dev_up_stops_the_redis_it_started_when_postgres_fails(project: Path) -> None:
    fake = project / "pgbin"  # where the postgres user (under root) may run it
    fake.mkdir()
    for tool in ("initdb", "postgres"):
        (fake / tool).write_text("#!/bin/sh\necho 'no such luck' >&2\nexit 1\n")
        (fake / tool).chmod(0o755)
    redis_port = free_port()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "streamd",
            "dev",
            "up",
            "--root",
            str(project / "dev"),
            "--redis-port",
            str(redis_port),
            "--postgres-port",
            str(free_port()),
        ],
        env=clean_environ(STREAMD_PG_BIN=str(fake)),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode != 0
    assert "initdb" in done.stderr and done.stderr.count("\n") == 1, done.stderr
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", redis_port)) != 0  # Redis started, then stopped
