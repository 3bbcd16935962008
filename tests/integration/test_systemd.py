"""systemd integration: the unit file (checked by systemd-analyze itself) and sd_notify messages
received by a real datagram socket from the real `streamd serve`."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from streamd.config.settings import Settings
from streamd.errors import EXIT_BOOT, EXIT_USAGE
from streamd.supervisor import systemd
from streamd.supervisor.systemd import Notifier
from tests.support.helpers import ServeProcess, wait_until

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "streamd.service"
needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)


def unit_values() -> dict[str, list[str]]:
    """Key -> every value it is given (unit files may repeat a key)."""
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def installed_unit(directory: Path) -> Path:
    """The unit with ExecStart pointing at this checkout's streamd (verify checks it exists)."""
    streamd = Path(sys.executable).with_name("streamd")
    text = UNIT.read_text().replace("/usr/local/bin/streamd", str(streamd))
    path = directory / "streamd.service"
    path.write_text(text)
    return path


# --- the unit file --------------------------------------------------------------------------


@needs_analyze
def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    unit = installed_unit(tmp_path)
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # verify exits 0 even for unknown or unparsable settings; it only warns. Take no warnings.
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "" and result.stdout.strip() == "", result.stderr


@needs_analyze
def test_unit_is_hardened(tmp_path: Path) -> None:
    unit = installed_unit(tmp_path)
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    found = re.search(r"Overall exposure level for \S+: ([\d.]+)", result.stdout)
    if found is None:
        pytest.skip(f"this systemd-analyze cannot assess units offline: {result.stderr[:200]}")
    assert float(found.group(1)) < 2.0, result.stdout  # systemd's "OK" band (or "SAFE")


def test_the_units_command_line_runs_serve_with_its_config_file(
    start_serve: Callable[..., ServeProcess], tmp_path: Path
) -> None:
    """ExecStart as written: its options after `serve`, with the config file it names (here a
    copy in tmp_path), must start serve and read that file."""
    argv = unit_values()["ExecStart"][0].split()
    assert argv[:2] == ["/usr/local/bin/streamd", "serve"]
    config = tmp_path / "streamd.toml"
    config.write_text("tasks = 3\n")
    args = [str(config) if arg == "/etc/streamd/streamd.toml" else arg for arg in argv[2:]]
    assert str(config) in args
    serve = start_serve(*args, "--procs", "1")
    serve.wait_ready()
    assert serve.events("worker_started")[0]["tasks"] == 3
    assert serve.terminate() == 0


def test_unit_matches_the_supervisor() -> None:
    values = unit_values()
    one = {key: vals[-1] for key, vals in values.items()}
    assert one["Type"] == "notify"
    assert one["NotifyAccess"] == "main"  # only the supervisor speaks; children have no socket
    assert one["KillMode"] == "mixed"  # TERM to the supervisor alone: it drains its children
    assert one["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert one["Restart"] == "on-failure"
    prevented = {int(code) for code in one["RestartPreventExitStatus"].split()}
    assert prevented == {EXIT_USAGE, EXIT_BOOT}
    # systemd's SIGKILL must come after the supervisor's own drain timeout.
    assert int(one["TimeoutStopSec"]) > Settings().graceful_timeout_s
    # The supervisor pings at half WATCHDOG_USEC from a loop that never sleeps longer than 0.5 s.
    assert int(one["WatchdogSec"]) >= 5
    assert one["DynamicUser"] == "yes" or "User" in one
    assert one["ProtectSystem"] == "strict" and one["NoNewPrivileges"] == "yes"
    assert one["RuntimeDirectory"] == "streamd"  # state_dir defaults to $RUNTIME_DIRECTORY
    assert one["EnvironmentFile"].startswith("-/etc/streamd/")


# --- Notifier -------------------------------------------------------------------------------


class Listener:
    """A datagram socket like systemd's notify socket; records each message and its sender."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(address)
        self.sock.setblocking(False)
        self.received: list[tuple[int, dict[str, str]]] = []

    def poll(self) -> list[tuple[int, dict[str, str]]]:
        creds_size = socket.CMSG_SPACE(struct.calcsize("3i"))
        while True:
            try:
                data, ancdata, _flags, _addr = self.sock.recvmsg(4096, creds_size)
            except BlockingIOError:
                return self.received
            pid = 0
            for level, kind, raw in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("3i", raw[: struct.calcsize("3i")])[0]
            fields = dict(line.split("=", 1) for line in data.decode().splitlines())
            self.received.append((pid, fields))

    def having(self, key: str) -> list[dict[str, str]]:
        return [fields for _pid, fields in self.poll() if key in fields]

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def listener() -> Iterator[tuple[str, Listener]]:
    # AF_UNIX paths are limited to 108 bytes: pytest's tmp_path can be longer.
    directory = tempfile.mkdtemp(prefix="sdn-")
    path = os.path.join(directory, "notify")
    found = Listener(path)
    yield path, found
    found.close()
    shutil.rmtree(directory, ignore_errors=True)


def test_notifier_sends_to_a_path_socket(listener: tuple[str, Listener]) -> None:
    path, found = listener
    notifier = Notifier({"NOTIFY_SOCKET": path})
    assert notifier.ready("running")
    assert notifier.stopping("bye")
    assert [fields for _pid, fields in found.poll()] == [
        {"READY": "1", "STATUS": "running"},
        {"STOPPING": "1", "STATUS": "bye"},
    ]


def test_notifier_sends_to_an_abstract_socket() -> None:
    name = f"streamd-test-{os.getpid()}"
    found = Listener("\0" + name)
    try:
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).watchdog()
        assert [fields for _pid, fields in found.poll()] == [{"WATCHDOG": "1"}]
    finally:
        found.close()


def test_notifier_without_a_socket_or_with_a_dead_one_does_nothing(tmp_path: Path) -> None:
    assert not Notifier({}).enabled
    assert not Notifier({}).ready("x")
    assert not Notifier({"NOTIFY_SOCKET": "vsock:2:1234"}).enabled
    assert not Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")}).ready("x")


def test_watchdog_interval_is_half_the_timeout_and_only_for_us() -> None:
    env = {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "30000000"}
    assert Notifier(env).watchdog_interval_s() == 15.0
    assert Notifier(env | {"WATCHDOG_PID": str(os.getpid())}).watchdog_interval_s() == 15.0
    assert Notifier(env | {"WATCHDOG_PID": "1"}).watchdog_interval_s() is None
    assert Notifier({"WATCHDOG_USEC": "30000000"}).watchdog_interval_s() is None


def test_unset_environment_removes_the_notify_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.setenv(name, "1")
    systemd.unset_environment()
    assert not {"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"} & set(os.environ)


# --- the real serve -------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_serve_speaks_sd_notify(
    env: dict[str, str],
    listener: tuple[str, Listener],
    start_serve: Callable[..., ServeProcess],
) -> None:
    path, found = listener
    serve = start_serve(
        "--procs", "2", environ=env | {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"}
    )
    ready = wait_until(lambda: found.having("READY"), timeout=60, message="READY=1")
    assert ready[0]["STATUS"] == "running: 2/2 workers consuming, 0 restarts"
    assert len(serve.events("child_ready")) == 2  # READY=1 only once both children consume
    wait_until(lambda: len(found.having("WATCHDOG")) >= 3, timeout=10, message="WATCHDOG=1")

    serve.send_signal(signal.SIGHUP)
    wait_until(lambda: len(found.having("READY")) == 2, timeout=60, message="READY=1 again")
    reloading = found.having("RELOADING")
    assert len(reloading) == 1 and reloading[0]["MONOTONIC_USEC"].isdigit()

    assert serve.terminate() == 0
    stopping = found.having("STOPPING")
    assert len(stopping) == 1 and stopping[0]["STATUS"].startswith("stopping")
    assert {pid for pid, _fields in found.poll()} == {serve.pid}  # NotifyAccess=main holds

    order = [key for _pid, fields in found.poll() for key in fields if key != "STATUS"]
    significant = [k for k in order if k in ("READY", "RELOADING", "STOPPING")]
    assert significant == ["READY", "RELOADING", "READY", "STOPPING"]
