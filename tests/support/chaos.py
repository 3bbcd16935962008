"""The chaos driver: `streamd serve` under a fixed-rate producer while faults are injected, then the
exactly-once check. Used by tests/faults/test_chaos.py (short) and bench/chaos.py (as long as you
like).

Faults, one at a time, at random (seeded) moments:
  kill_worker        SIGKILL a worker child; the supervisor starts another, a reaper reclaims
  postgres_restart   fast shutdown, down for a moment, start
  postgres_kill      SIGKILL of the server and its backends, then crash recovery
  redis_restart      shutdown (AOF fsynced), down for a moment, start
  redis_kill         SIGKILL, then start from the AOF (appendfsync always)
  cut_redis / cut_postgres        reset every connection through the proxy
  refuse_redis / refuse_postgres  ... and refuse new ones for a moment
  stall_redis / stall_postgres    stop forwarding for up to 3 s (longer than the timeouts)
streamd reaches both services through TCP proxies (tests/support/proxy.py); the producer and the
checks talk to them directly.
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
import psutil

from streamd.dev.servers import PostgresServer, RedisServer
from tests.support.helpers import ServeProcess
from tests.support.load import Outcome, Producer, wait_for_outcome
from tests.support.proxy import TcpProxy

FAULTS = (
    "kill_worker",
    "postgres_restart",
    "postgres_kill",
    "redis_restart",
    "redis_kill",
    "cut_redis",
    "cut_postgres",
    "refuse_redis",
    "refuse_postgres",
    "stall_redis",
    "stall_postgres",
)
WEIGHTS = {"kill_worker": 3}  # the fault the supervisor and the reaper exist for: more often

# Short timeouts and fast recovery, so a minute holds many faults. max_deliveries is raised: under
# a fault every second or two an entry can be delivered many times without being bad (each killed
# holder and each lost read reply counts one), and this run checks loss, not poison detection.
SERVE_SETTINGS = {
    "STREAMD_TASKS": "3",
    "STREAMD_BATCH_SIZE": "200",
    "STREAMD_BLOCK_MS": "200",
    "STREAMD_REDIS_TIMEOUT_S": "1",
    "STREAMD_POSTGRES_TIMEOUT_S": "1.5",
    "STREAMD_RETRY_INITIAL_S": "0.05",
    "STREAMD_RETRY_MAX_S": "0.5",
    "STREAMD_CLAIM_MIN_IDLE_MS": "2000",
    "STREAMD_REAPER_INTERVAL_S": "0.5",
    "STREAMD_MAX_DELIVERIES": "20",
    "STREAMD_CRASH_LOOP_MAX": "100000",  # the kills are deliberate
    "STREAMD_RESTART_BACKOFF_MAX_S": "1",
    "STREAMD_HEARTBEAT_TIMEOUT_S": "10",
    "STREAMD_GRACEFUL_TIMEOUT_S": "20",
    "STREAMD_METRICS_PORT": "0",
}


@dataclass
class ChaosConfig:
    duration_s: float = 60.0  # of fault injection; the drain and checks come after
    rate: float = 400.0  # events per second
    procs: int = 2
    mean_gap_s: float = 1.5  # mean pause between two faults
    seed: int | None = None
    faults: tuple[str, ...] = FAULTS
    settle_timeout_s: float = 90.0  # after the last fault, for everything to land


@dataclass
class Figures:
    seed: int
    duration_s: float = 0.0
    faults: Counter[str] = field(default_factory=Counter)
    outcome: Outcome | None = None
    producer_retries: int = 0
    producer_confirmed_late: int = 0
    child_restarts: int = 0
    supervisor_alive: bool = False
    serve_exit: int | None = None
    bad_log_lines: list[str] = field(default_factory=list)
    crashes: list[dict[str, Any]] = field(default_factory=list)

    def ok(self) -> bool:
        return (
            self.outcome is not None
            and self.outcome.exact
            and self.supervisor_alive
            and self.serve_exit == 0
            and not self.bad_log_lines
            and not self.crashes
        )

    def report(self) -> str:
        o = self.outcome
        faults = ", ".join(f"{k}={v}" for k, v in sorted(self.faults.items()))
        lines = [
            f"chaos seed={self.seed} duration={self.duration_s:.1f}s",
            f"  faults injected: {sum(self.faults.values())} ({faults})",
            f"  events produced: {o.produced if o else '?'}  rows: {o.rows if o else '?'}",
            f"  lost: {len(o.lost) if o else '?'}  duplicated: {o.duplicated if o else '?'}  "
            f"unexpected: {len(o.unexpected) if o else '?'}",
            f"  dlq rows: {o.dead_rows if o else '?'}  dlq stream: {o.dead_stream if o else '?'}"
            f"  pending: {o.pending if o else '?'}",
            f"  producer retries: {self.producer_retries} (confirmed late: "
            f"{self.producer_confirmed_late})  child restarts: {self.child_restarts}",
            f"  supervisor alive at the end: {self.supervisor_alive}  serve exit: "
            f"{self.serve_exit}  worker crashes: {len(self.crashes)}  "
            f"unparsable log lines: {len(self.bad_log_lines)}",
        ]
        return "\n".join(lines)


StartServe = Callable[[Mapping[str, str]], ServeProcess]


class Chaos:
    def __init__(
        self,
        redis: RedisServer,
        postgres: PostgresServer,
        start_serve: StartServe,
        base_env: Mapping[str, str],
        config: ChaosConfig,
        say: Callable[[str], None] = lambda _line: None,
    ) -> None:
        self.redis, self.postgres = redis, postgres
        self.start_serve, self.base_env, self.config, self.say = start_serve, base_env, config, say
        seed = config.seed if config.seed is not None else random.SystemRandom().randrange(2**32)
        self.rng = random.Random(seed)
        self.figures = Figures(seed=seed)
        self.redis_proxy = TcpProxy(redis.port)
        self.pg_proxy = TcpProxy(postgres.port)
        self.serve: ServeProcess | None = None

    # --- the run ---------------------------------------------------------------------------

    def run(self) -> Figures:
        started = time.monotonic()
        with self.redis_proxy, self.pg_proxy:
            self.serve = self.start_serve(self._environ())
            self.serve.wait_ready(self.config.procs, timeout=60)
            producer = Producer(self.redis.url, rate=self.config.rate, batch=10)
            producer.start()
            try:
                self._inject_until(started + self.config.duration_s)
            finally:
                self._heal()
                producer.stop()
            self.figures.duration_s = time.monotonic() - started
            self.figures.outcome = wait_for_outcome(
                self.postgres.dsn, self.redis.url, producer, timeout=self.config.settle_timeout_s
            )
            self._finish(producer)
        return self.figures

    def _environ(self) -> dict[str, str]:
        return {
            **self.base_env,
            **SERVE_SETTINGS,
            "STREAMD_PROCS": str(self.config.procs),
            "STREAMD_REDIS_URL": f"redis://127.0.0.1:{self.redis_proxy.port}/0",
            "STREAMD_POSTGRES_DSN": (
                f"postgresql://postgres@127.0.0.1:{self.pg_proxy.port}/postgres"
            ),
        }

    def _inject_until(self, deadline: float) -> None:
        while True:
            gap = min(self.rng.expovariate(1 / self.config.mean_gap_s), 3 * self.config.mean_gap_s)
            if time.monotonic() + gap >= deadline:
                return
            time.sleep(gap)
            weights = [WEIGHTS.get(k, 1) for k in self.config.faults]
            kind = self.rng.choices(self.config.faults, weights)[0]
            getattr(self, kind)()
            self.figures.faults[kind] += 1
            self.say(f"  {time.monotonic() - deadline + self.config.duration_s:6.1f}s  {kind}")

    def _finish(self, producer: Producer) -> None:
        assert self.serve is not None
        f = self.figures
        f.producer_retries, f.producer_confirmed_late = producer.retries, producer.confirmed_late
        f.supervisor_alive = self.serve.poll() is None
        f.child_restarts = len(self.serve.events("child_restarted"))
        f.crashes = self.serve.events("worker_crashed")
        f.serve_exit = self.serve.terminate(timeout=60) if f.supervisor_alive else self.serve.poll()
        f.bad_log_lines = _unparsable(self.serve.output())

    # --- faults ----------------------------------------------------------------------------

    def _pause(self, low: float = 0.3, high: float = 2.0) -> None:
        time.sleep(self.rng.uniform(low, high))

    def kill_worker(self) -> None:
        assert self.serve is not None
        children = psutil.Process(self.serve.pid).children()
        if children:
            os.kill(self.rng.choice(children).pid, signal.SIGKILL)

    def postgres_restart(self) -> None:
        self.postgres.stop()
        self._pause()
        self._start(self.postgres, self.pg_proxy)

    def postgres_kill(self) -> None:
        self.postgres.kill()
        self._pause()
        self._start(self.postgres, self.pg_proxy)

    def redis_restart(self) -> None:
        self.redis.stop()
        self._pause()
        self._start(self.redis, self.redis_proxy)

    def redis_kill(self) -> None:
        self.redis.kill()
        self._pause()
        self._start(self.redis, self.redis_proxy)

    def cut_redis(self) -> None:
        self.redis_proxy.drop()

    def cut_postgres(self) -> None:
        self.pg_proxy.drop()

    def refuse_redis(self) -> None:
        self._refuse(self.redis_proxy)

    def refuse_postgres(self) -> None:
        self._refuse(self.pg_proxy)

    def stall_redis(self) -> None:
        self._stall(self.redis_proxy)

    def stall_postgres(self) -> None:
        self._stall(self.pg_proxy)

    def _refuse(self, proxy: TcpProxy) -> None:
        proxy.refuse()
        try:
            self._pause()
        finally:
            proxy.accept()

    def _stall(self, proxy: TcpProxy) -> None:
        proxy.stall()
        try:
            self._pause(0.3, 3.0)
        finally:
            proxy.resume()

    @staticmethod
    def _start(server: RedisServer | PostgresServer, proxy: TcpProxy) -> None:
        server.start()
        proxy.retarget(server.port)  # a restart may have had to take another port

    def _heal(self) -> None:
        for proxy in (self.redis_proxy, self.pg_proxy):
            proxy.accept()
            proxy.resume()
        for server, proxy in ((self.redis, self.redis_proxy), (self.postgres, self.pg_proxy)):
            if not server.is_running():
                self._start(server, proxy)


def _unparsable(stderr: str) -> list[str]:
    """Lines of serve's stderr that are not one JSON object each (interleaved writes, stray
    prints); the final `streamd: error:` line of a failed run counts too."""
    bad = []
    for line in stderr.splitlines():
        try:
            if not isinstance(orjson.loads(line), dict):
                bad.append(line)
        except orjson.JSONDecodeError:
            bad.append(line)
    return bad
