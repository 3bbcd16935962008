"""One worker process: an event loop (uvloop), its pools, `tasks` consumers and a reaper.

Everything is built here, after fork: the supervisor hands over only Settings. TERM/INT drain
(stop reading, flush and acknowledge what is in hand, exit 0); a second INT, or QUIT, stops at
once: entries in hand stay pending and are reclaimed later, so a fast stop loses nothing either.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import redis.asyncio as aioredis
import redis.exceptions
import uvloop

from streamd.backends.connections import (
    pooler_in_use,
    postgres_pool,
    redis_client,
    resolve_cluster,
)
from streamd.backends.faults import TRANSIENT_ERRORS, describe
from streamd.backends.preflight import preflight
from streamd.backends.redis_acl import Refusal, grant, username
from streamd.backends.shards import check_shrink
from streamd.common.aio import wait_event
from streamd.common.backoff import Backoff
from streamd.config.settings import Settings
from streamd.errors import StreamdError
from streamd.observability.log import bind_context, get_logger
from streamd.observability.progress import ProgressLog
from streamd.pipeline.batch import BatchObserver, BatchReport
from streamd.pipeline.reader import GroupReader
from streamd.pipeline.retry import log_fault
from streamd.pipeline.routes import Routes
from streamd.worker.backlogs import Backlogs
from streamd.worker.consumer import Consumer
from streamd.worker.group_watch import GroupWatch
from streamd.worker.liveness import Liveness, worker_prefix
from streamd.worker.maintenance import Maintenance
from streamd.worker.reapers import Reapers
from streamd.worker.redis_needs import serve_needs
from streamd.worker.stream_set import StreamSet

HEARTBEAT_INTERVAL_S = 1.0
CLOSE_TIMEOUT_S = 5.0  # per step of a worker's shutdown (tasks, each client, the pool)
# Every entry read allocates a few containers (hiredis lists, a row tuple), so CPython's default
# collector (a collection per 700 allocations) spent ~11% of a worker's CPU under load rescanning
# batches that are alive anyway. streamd's hot path makes no reference cycles; collect rarely.
GC_THRESHOLDS = (50_000, 20, 20)


@dataclass(slots=True)
class WorkerHooks:
    """How a worker talks to whoever runs it (the supervisor, or nobody in single-process mode)."""

    heartbeat: Callable[[], None] | None = None  # called every HEARTBEAT_INTERVAL_S from the loop
    on_ready: Callable[[], None] | None = None  # called once all consumers are reading
    observer: BatchObserver | None = None  # called after every flushed batch
    extra_tasks: list[Callable[[Worker], asyncio.Task[None]]] = field(default_factory=list)


class WorkerTaskFailed(StreamdError):
    """A consumer, the reaper or another task of the worker died; it was logged with its error.
    The worker exits with 1 and the supervisor restarts it (a crash, counted for crash loops)."""


class Worker:
    def __init__(self, settings: Settings, index: int = 0, hooks: WorkerHooks | None = None):
        self.settings = settings
        self.index = index
        self.hooks = hooks or WorkerHooks()
        self.log = get_logger()
        self.consumers: list[Consumer] = []
        self.reaper: Reapers | None = None
        self.stream_set: StreamSet | None = None
        self._wakers: set[asyncio.Task[None]] = set()
        self.progress: ProgressLog | None = None
        self.liveness: Liveness | None = None
        self._liveness_task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._may_unblock = True  # CLIENT UNBLOCK allowed (False once the ACL refused it)
        self._fast = False
        self._interrupts = 0

    # --- signals ---------------------------------------------------------------------------

    def request_stop(self, fast: bool = False) -> None:
        self._fast = self._fast or fast
        self._stop.set()

    def _on_signal(self, signum: int) -> None:
        if signum == signal.SIGINT:
            self._interrupts += 1
        self.request_stop(fast=signum == signal.SIGQUIT or self._interrupts > 1)

    def _install_signals(self, loop: asyncio.AbstractEventLoop) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            # An ignored signal stays ignored (as with nohup): under the supervisor, which owns
            # Ctrl-C, a child must not also act on the SIGINT sent to the whole process group.
            if signal.getsignal(signum) is not signal.SIG_IGN:
                loop.add_signal_handler(signum, self._on_signal, signum)

    # --- run -------------------------------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self._install_signals(loop)
        s = self.settings
        bind_context(proc=self.index, pid=os.getpid())
        # Heartbeats start before preflight, so a slow start is not mistaken for a hung loop.
        heartbeat = asyncio.create_task(self._heartbeat(), name="heartbeat")
        try:
            degraded = await preflight(s, serve_needs(s))
        except BaseException:
            heartbeat.cancel()
            raise
        self._warn_degraded(degraded)
        # Redis answered: decide redis_cluster = auto now, and with it the dead streams' names.
        self.settings = s = resolve_cluster(s)
        await self._check_shards()
        # A connection per consumer, one for the reaper, one for the quiet lane's second write.
        pool = await postgres_pool(s, size=s.tasks + 2)
        control = redis_client(s, max_connections=s.tasks + 8)
        # Consumers read over connections of their own made from this client's settings; its
        # socket timeout covers a blocked XREADGROUP (block_ms) on top of redis_timeout_s. Each
        # consumer keeps one and may borrow one more at a time (the dead-letter script): a pool
        # any smaller answers "Too many connections" when every batch has a dead letter.
        # In a cluster a consumer keeps one per slot it reads (pipeline/reader.py): the cap is
        # per node there, redis-py's (100).
        read_client = redis_client(
            s,
            extra_timeout_s=s.block_ms / 1000,
            max_connections=None if s.redis_cluster is True else 2 * s.tasks + 2,
        )
        readers: list[GroupReader] = []
        tasks: list[asyncio.Task[None]] = []
        self.progress = ProgressLog(s, control)
        try:
            self.stream_set = stream_set = StreamSet(s, control)
            await stream_set.refresh()
            routes = Routes(s, pool, _both(self.hooks.observer, self.progress.observe))
            prefix = worker_prefix(s)
            # Our key exists before any consumer of ours does: reapers elsewhere never see one
            # of our consumers without it.
            self.liveness = Liveness(s, control, prefix)
            await self.liveness.renew()
            # Not among `tasks`: it runs until the drain is over, not until the drain starts.
            self._liveness_task = asyncio.create_task(self.liveness.run(), name="liveness")
            watch = GroupWatch()  # what the consumers delivered, for the reapers' looks
            backlogs = Backlogs()  # which streams have a backlog, for the quiet lane
            for i in range(s.tasks):
                readers.append(self._reader(read_client, f"{prefix}:{i}", stream_set))
                # With two tasks or more, the first is the quiet lane (worker/backlogs.py).
                lane = i == 0 and s.tasks > 1
                consumer = Consumer(s, readers[-1], stream_set, routes, watch, backlogs, lane=lane)
                self.consumers.append(consumer)
            readers.append(self._reader(control, f"{prefix}:reaper", stream_set))
            self.reaper = Reapers(
                s, control, readers[-1], stream_set, routes, self.liveness, watch=watch
            )
            for i, consumer in enumerate(self.consumers):
                tasks.append(asyncio.create_task(consumer.run(), name=f"consumer-{i}"))
            tasks.append(asyncio.create_task(self.reaper.run(), name="reaper"))
            if stream_set.has_patterns:
                # A new stream joins the reads at once, not after a blocked read's block_ms.
                stream_set.on_change.append(lambda: self._wake_soon(control))
                tasks.append(asyncio.create_task(stream_set.run(), name="discover"))
            if s.log_interval_s > 0:
                tasks.append(asyncio.create_task(self.progress.run(), name="progress"))
            if self.index == 0:  # partition upkeep: one per serve (one drop at a time across all)
                upkeep = Maintenance(s, pool, self._stop).run()
                tasks.append(asyncio.create_task(upkeep, name="maintenance"))
            tasks.extend(make(self) for make in self.hooks.extra_tasks)
            self.log.info(
                "worker_started",
                tasks=s.tasks,
                stream=s.stream if not s.streams else None,
                group=s.group,
                consumer_prefix=prefix,
                postgres_pooler=pooler_in_use(s),
                streams=len(stream_set.streams),
            )
            _tune_gc()
            if self.hooks.on_ready is not None:
                self.hooks.on_ready()
            await self._until_stopped(tasks)
            await self._drain(tasks, control)
            await self._release_liveness()
        finally:
            # The heartbeat goes on until everything is closed: a worker on its way out is not
            # a hung one, and the supervisor must see it exit, not kill it 30 s later.
            if self._liveness_task is not None:
                self._liveness_task.cancel()  # a worker that failed: its key expires
            try:
                await self._close(tasks, readers, [read_client, control], pool)
            finally:
                heartbeat.cancel()

    async def _close(
        self,
        tasks: list[asyncio.Task[None]],
        readers: list[GroupReader],
        clients: list[aioredis.Redis],
        pool: object,
    ) -> None:
        """Cancel the tasks and close the connections, each step bounded in time: a task that
        does not end on cancellation is left behind (the process is about to exit anyway)."""
        for task in tasks:
            task.cancel()
        if tasks:
            _, stuck = await asyncio.wait(tasks, timeout=CLOSE_TIMEOUT_S)
            if stuck:
                names = sorted(t.get_name() for t in stuck)
                self.log.warning("worker_tasks_not_stopping", tasks=names)
        for closing in [*(r.aclose() for r in readers), *(c.aclose() for c in clients)]:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(closing, timeout=CLOSE_TIMEOUT_S)
        await _close_pool(pool)

    async def _check_shards(self) -> None:
        """Refuse to start when a shard beyond `shards` still holds work (backends/shards.py).
        Redis going away meanwhile is retried, as every other start-up step is."""
        s = self.settings
        backoff = Backoff(s.retry_initial_s, s.retry_max_s)
        while True:
            client = redis_client(s)
            try:
                await check_shrink(client, s)
                return
            except TRANSIENT_ERRORS as exc:
                delay = backoff.next_delay()
                log_fault(self.log, "shards_check", exc, retry_in_s=round(delay, 3))
            finally:
                await client.aclose()
            if await wait_event(self._stop, delay):
                return  # told to stop: there is nothing to start

    async def _release_liveness(self) -> None:
        """After a complete drain nothing of ours is pending: let reapers know at once. After
        an incomplete one the key expires by itself, and they take over what is left."""
        if self.liveness is None:
            return
        self.liveness.stop()
        if self._liveness_task is not None:
            self._liveness_task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.liveness.release(), timeout=CLOSE_TIMEOUT_S)

    def _warn_degraded(self, degraded: list[Refusal]) -> None:
        """One warning per effect of the optional permissions Redis's ACL refuses."""
        user = username(self.settings)
        effects: dict[str, list[Refusal]] = {}
        for refusal in degraded:
            effects.setdefault(refusal.need.effect, []).append(refusal)
        for effect, refusals in effects.items():
            self.log.warning(
                "redis_permission_missing",
                commands=sorted({r.need.command for r in refusals}),
                effect=effect,
                fix=grant(user, refusals),
            )

    def _reader(self, client: aioredis.Redis, consumer: str, stream_set: StreamSet) -> GroupReader:
        s = self.settings
        return GroupReader(
            client,
            group=s.group,
            consumer=consumer,
            dead_stream_for=s.dead_stream_for,
            dead_maxlen=s.dlq_stream_maxlen,
            named=stream_set.named,
        )

    def _wake_soon(self, control: aioredis.Redis) -> None:
        """Wake the blocked reads (in a task: discovery's callback is synchronous)."""
        if not self._stop.is_set():
            self._wakers.add(task := asyncio.create_task(self._wake_readers(control)))
            task.add_done_callback(self._wakers.discard)

    async def _until_stopped(self, tasks: list[asyncio.Task[None]]) -> None:
        """Wait for a stop request; a task that dies on its own takes the worker down with it,
        logged first (with its error), so the cause is in the log whatever happens next."""
        stop = asyncio.create_task(self._stop.wait(), name="stop-wait")
        done, _ = await asyncio.wait([stop, *tasks], return_when=asyncio.FIRST_COMPLETED)
        if stop in done:
            return
        stop.cancel()
        task = next(iter(done))
        error = task.exception() if not task.cancelled() else None
        if error is None:
            self.log.error("worker_task_failed", task=task.get_name(), error="it ended by itself")
            raise WorkerTaskFailed(f"worker task {task.get_name()} ended by itself")
        self.log.error(
            "worker_task_failed", task=task.get_name(), error=describe(error), exc_info=error
        )
        raise WorkerTaskFailed(f"worker task {task.get_name()} failed: {describe(error)}")

    async def _drain(self, tasks: list[asyncio.Task[None]], control: aioredis.Redis) -> None:
        started = time.monotonic()
        for consumer in self.consumers:
            consumer.stop()
        if self.reaper is not None:
            self.reaper.stop()
        if self.stream_set is not None:
            self.stream_set.stop()
        if self.progress is not None:
            self.progress.stop()
        if self._fast:
            self.log.info("worker_stopping_fast")
            return
        self.log.info("worker_draining")
        deadline = started + self.settings.graceful_timeout_s
        pending = set(tasks)
        while pending and time.monotonic() < deadline:
            await self._wake_readers(control)
            _, pending = await asyncio.wait(pending, timeout=0.1)
            if self._fast:
                break
        if self.progress is not None and self.settings.log_interval_s > 0:
            await self.progress.flush()  # what the last interval did, up to the drain
        if pending:
            self.log.warning("worker_drain_incomplete", tasks=len(pending))
        else:
            self.log.info("worker_drained", ms=round((time.monotonic() - started) * 1000, 1))

    async def _wake_readers(self, control: aioredis.Redis) -> None:
        """CLIENT UNBLOCK every consumer blocked in XREADGROUP, so it returns at once instead of
        after block_ms (and nothing it was about to receive is left pending). Without the
        permission (the start-up check warned) the reads end by themselves, block_ms later."""
        if not self._may_unblock:
            return
        for consumer in self.consumers:
            if consumer.client_id is not None or consumer.reader.clustered:
                try:
                    await consumer.reader.unblock()
                except redis.exceptions.NoPermissionError as exc:
                    self._may_unblock = False
                    self.log.warning(
                        "drain_without_unblock",
                        error=describe(exc),
                        effect=f"blocked reads end after block_ms ({self.settings.block_ms} ms)",
                    )
                    return
                except Exception:  # the read ends by itself after block_ms
                    pass

    async def _heartbeat(self) -> None:
        interval = min(HEARTBEAT_INTERVAL_S, self.settings.heartbeat_timeout_s / 4)
        while True:
            if self.hooks.heartbeat is not None:
                self.hooks.heartbeat()
            await asyncio.sleep(interval)


def _both(first: BatchObserver | None, second: BatchObserver) -> BatchObserver:
    """One observer that calls both (the metrics', when on, and the progress log's)."""
    if first is None:
        return second

    def observe(report: BatchReport) -> None:
        first(report)
        second(report)

    return observe


def _tune_gc() -> None:
    """Move what start-up built (modules, pools) out of the collector's sight, collect rarely."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


async def _close_pool(pool: object) -> None:
    close = pool.close()  # type: ignore[attr-defined]
    try:
        await asyncio.wait_for(close, timeout=5)
    except (TimeoutError, Exception):
        pool.terminate()  # type: ignore[attr-defined]


def run_worker(settings: Settings, index: int = 0, hooks: WorkerHooks | None = None) -> None:
    """Run one worker to completion on a fresh uvloop (call after fork, or in a plain process)."""
    uvloop.run(Worker(settings, index, hooks).run())
