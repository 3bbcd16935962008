"""A task of a worker that dies (a bug, say) must not stop the heartbeat: it is logged with its
error at once, the worker closes down in bounded time while its heartbeat goes on, and exits with
an error the supervisor restarts it for. Run in process, on uvloop, against real servers."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable

import pytest
import structlog
import uvloop

from streamd.config import Settings
from streamd.worker.process import CLOSE_TIMEOUT_S, Worker, WorkerHooks, WorkerTaskFailed

pytestmark = pytest.mark.timeout(60)


def run_with_failing_task(settings: Settings, after_s: float) -> tuple[list[float], list[dict]]:
    """Run a worker whose extra task raises after `after_s`; the heartbeat times and the logs."""
    beats: list[float] = []

    async def boom() -> None:
        await asyncio.sleep(after_s)
        raise RuntimeError("a bug in a task")

    def make(_worker: Worker) -> asyncio.Task[None]:
        return asyncio.create_task(boom(), name="boom")

    hooks = WorkerHooks(heartbeat=lambda: beats.append(time.monotonic()), extra_tasks=[make])
    failed = pytest.raises(WorkerTaskFailed, match="worker task boom failed: RuntimeError")
    with structlog.testing.capture_logs() as logs, failed:
        uvloop.run(Worker(settings, hooks=hooks).run())
    beats.append(time.monotonic())  # the end
    return beats, logs


@pytest.mark.parametrize("after_s", [0.0, 0.5], ids=["while-connecting", "while-reading"])
def test_a_dying_task_is_logged_first_and_the_worker_exits_in_bounded_time(
    after_s: float, make_settings: Callable[..., Settings]
) -> None:
    """0.0: the task dies while the consumers are still connecting (where, under uvloop, a
    consumer's cancellation has been seen to get lost: the close must not wait for it)."""
    settings = make_settings(heartbeat_timeout_s=2, block_ms=200)
    started = time.monotonic()
    beats, logs = run_with_failing_task(settings, after_s)
    failed = [e for e in logs if e["event"] == "worker_task_failed"]
    assert len(failed) == 1 and failed[0]["task"] == "boom"
    assert failed[0]["error"] == "RuntimeError: a bug in a task"
    assert failed[0]["log_level"] == "error"
    # Bounded: the tasks, then each connection, at most CLOSE_TIMEOUT_S each.
    assert beats[-1] - started < after_s + 4 * CLOSE_TIMEOUT_S + 5
    gaps = [b - a for a, b in itertools.pairwise(beats)]
    interval = settings.heartbeat_timeout_s / 4
    assert max(gaps) < interval + 1.0, gaps  # the heartbeat went on until the very end
