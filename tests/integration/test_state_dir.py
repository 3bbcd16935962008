"""What a serve killed with -9 leaves in state_dir (`serve-<pid>.json`, `metrics-<pid>/`) is
deleted by the next serve on the host; the files of a serve that still runs are not."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

from streamd.observability.status_file import read_status_files
from tests.support.helpers import ServeProcess, wait_until


def test_the_next_serve_deletes_a_killed_serves_status_file(
    env: dict[str, str], start_serve: Callable[..., ServeProcess]
) -> None:
    state = Path(env["STREAMD_STATE_DIR"])
    first = start_serve()
    first.wait_ready()
    wait_until(lambda: (state / f"serve-{first.pid}.json").exists(), timeout=10)
    first.send_signal(signal.SIGKILL, group=True)
    assert first.wait(10) == -signal.SIGKILL
    left = {f"serve-{first.pid}.json", f"metrics-{first.pid}"}
    assert left <= {p.name for p in state.iterdir()}
    # A status file of a live process that started before it (a serve still running) stays;
    # one whose pid now belongs to a process that started after it (a reused pid) does not.
    live = os.getpid()
    (state / f"serve-{live}.json").write_text(json.dumps({"pid": live, "started_at": time.time()}))
    reused = os.getppid()
    (state / f"serve-{reused}.json").write_text(json.dumps({"pid": reused, "started_at": 1.0}))
    assert [s["pid"] for s in read_status_files(state)] == [live]  # monitor skips both dead ones

    second = start_serve()
    second.wait_ready()
    (removed,) = second.events("stale_state_removed")
    assert set(removed["removed"]) == left | {f"serve-{reused}.json"}
    names = {p.name for p in state.iterdir()}
    assert not left & names and f"serve-{reused}.json" not in names
    assert f"serve-{live}.json" in names
    assert second.terminate() == 0
