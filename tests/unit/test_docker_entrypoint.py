"""deploy/docker/entrypoint.py, the image's entrypoint, run against a stand-in `streamd` on PATH:
exit codes kept (serve's 2 and 78 become 0, so `restart: on-failure` does not loop on them),
signals passed on once each."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ENTRYPOINT = Path(__file__).resolve().parents[2] / "deploy" / "docker" / "entrypoint.py"

# The stand-in: exits with $FAKE_EXIT, or kills itself with $FAKE_SIGNAL, or waits for signals
# and writes each one's name to $FAKE_LOG, exiting 0 on SIGTERM.
FAKE = """#!{python}
import os, signal, sys, time
log = os.environ.get("FAKE_LOG")
def note(sig, _frame):
    with open(log, "a") as f:
        f.write(signal.Signals(sig).name + "\\n")
    if sig == signal.SIGTERM:
        sys.exit(0)
if "FAKE_EXIT" in os.environ:
    sys.exit(int(os.environ["FAKE_EXIT"]))
if "FAKE_SIGNAL" in os.environ:
    os.kill(os.getpid(), int(os.environ["FAKE_SIGNAL"]))
for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(s, note)
with open(log + ".pid", "w") as f:
    f.write(str(os.getpid()))
with open(log, "a") as f:
    f.write("started\\n")
while True:
    time.sleep(0.05)
"""


@pytest.fixture
def fake_path(tmp_path: Path) -> dict[str, str]:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "streamd"
    fake.write_text(FAKE.format(python=sys.executable))
    fake.chmod(0o755)
    return {
        **os.environ,
        "PATH": f"{bindir}:{os.environ['PATH']}",
        "FAKE_LOG": str(tmp_path / "log"),
    }


def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ENTRYPOINT), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.mark.parametrize("code", [2, 78])
def test_serve_exits_a_restart_cannot_fix_become_zero(fake_path: dict[str, str], code: int) -> None:
    done = run(fake_path | {"FAKE_EXIT": str(code)}, "serve")
    assert done.returncode == 0
    assert f"streamd serve exited {code}" in done.stderr


@pytest.mark.parametrize("code", [1, 69, 70])
def test_other_exits_are_kept(fake_path: dict[str, str], code: int) -> None:
    done = run(fake_path | {"FAKE_EXIT": str(code)}, "serve")
    assert done.returncode == code
    assert done.stderr == ""


def test_only_serve_is_mapped_and_serve_is_the_default(fake_path: dict[str, str]) -> None:
    assert run(fake_path | {"FAKE_EXIT": "2"}, "config").returncode == 2
    assert run(fake_path | {"FAKE_EXIT": "2"}, "--set", "stream=serve", "config").returncode == 2
    assert run(fake_path | {"FAKE_EXIT": "78"}).returncode == 0  # no args: serve
    assert run(fake_path | {"FAKE_EXIT": "78"}, "--config", "/c.toml", "serve").returncode == 0


def test_death_by_signal_is_reported_like_a_shell(fake_path: dict[str, str]) -> None:
    done = run(fake_path | {"FAKE_SIGNAL": str(int(signal.SIGKILL))}, "serve")
    assert done.returncode == 128 + signal.SIGKILL


def wait_for_lines(log: Path, count: int) -> list[str]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        lines = log.read_text().splitlines() if log.exists() else []
        if len(lines) >= count:
            return lines
        time.sleep(0.02)
    raise AssertionError(f"{log}: fewer than {count} lines")


def test_signals_reach_streamd_once_each(fake_path: dict[str, str]) -> None:
    log = Path(fake_path["FAKE_LOG"])
    proc = subprocess.Popen(
        [sys.executable, str(ENTRYPOINT), "serve"], env=fake_path, start_new_session=True
    )
    try:
        wait_for_lines(log, 1)
        os.kill(proc.pid, signal.SIGHUP)
        wait_for_lines(log, 2)
        # Ctrl-C on a terminal signals the whole foreground group: streamd, in a session of its
        # own, gets it once (from the entrypoint), never twice (a second INT is a fast stop).
        os.killpg(proc.pid, signal.SIGINT)
        wait_for_lines(log, 3)
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        with contextlib.suppress(OSError, ValueError):  # a stand-in left behind by a failure
            os.kill(int(Path(f"{log}.pid").read_text()), signal.SIGKILL)
    assert log.read_text().splitlines() == ["started", "SIGHUP", "SIGINT", "SIGTERM"]
