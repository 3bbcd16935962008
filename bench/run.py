"""streamd's benchmarks, side by side with the seed's design and the raw COPY limit, in one run,
on the same private Redis and Postgres, printing one table.

    uv run python -m bench                     # everything (about 25 minutes on 2 cores)
    uv run python -m bench --quick             # smaller and shorter, for a first look
    uv run python -m bench --only drain --repeat 5

Sections:
- drain: the same pre-filled stream (--events, default 500,000 events of the seed's five types,
  ~125-byte JSON payloads) drained by the seed design, by a FastStream app (bench/faststream_app.py:
  batch StreamSub, asyncpg COPY, 2 workers), by `streamd serve` with its defaults, and
  written by parallel binary COPY with no Redis at all (the ceiling). Median events/s, ratios,
  and where the CPU went: microseconds of CPU per event spent by the consumer's processes, by
  Redis and by Postgres (with private servers), which shows what bounds each contender.
- sustained: a producer (`streamd bench`, its own process) at increasing rates for --duration
  seconds each; the highest rate each contender keeps up with (lag bounded to one second of events,
  nothing lost or duplicated, p99 end-to-end latency <= 500 ms), with p50/p99 at that rate and at
  1,000 and 10,000 events/s. Latency is producer send time -> Postgres commit time
  (track_commit_timestamp is on in the bench server).
- memory: RSS of each streamd child and Redis memory while draining a 1,000,000-entry backlog.

Servers: a private Redis (its defaults: no AOF; --redis-aof for appendfsync everysec) and
PostgreSQL (fsync on, defaults otherwise) under bench/.work, unless --redis-url and
--postgres-dsn name others (their data is wiped).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import psutil
import redis

from bench.raw_copy import copy_parallel, make_rows
from streamd.client.producer import Producer
from streamd.config.sources import load_settings
from streamd.dev.pg_setup import initdb
from streamd.dev.servers import PostgresServer, RedisServer
from streamd.tools.samples import SampleEvents

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / ".work"
P99_BOUND_MS = 500.0
DEFAULT_RATES = (1_000, 10_000, 20_000, 30_000, 40_000, 50_000, 60_000, 70_000, 80_000, 100_000)


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# the lab: servers, data, contenders


@dataclass
class Lab:
    redis_url: str
    dsn: str
    logs: Path
    servers: list[Any] = field(default_factory=list)

    @classmethod
    @contextlib.contextmanager
    def open(cls, redis_url: str | None, dsn: str | None, *, aof: bool = False) -> Iterator[Lab]:
        WORK.mkdir(parents=True, exist_ok=True)
        logs = WORK / "logs"
        logs.mkdir(exist_ok=True)
        if redis_url and dsn:
            yield cls(redis_url, dsn, logs)
            return
        shutil.rmtree(WORK / "redis", ignore_errors=True)
        shutil.rmtree(WORK / "pg", ignore_errors=True)
        # Redis' own defaults keep no AOF; with --redis-aof every delivery is also logged (as an
        # XCLAIM per entry), which costs Redis about as much CPU again as the reads themselves.
        rs = RedisServer(WORK / "redis", config={"appendonly": "yes" if aof else "no"})
        template = initdb(WORK / "pg-template") if not (WORK / "pg-template").exists() else None
        pg = PostgresServer(
            WORK / "pg",
            template=template or WORK / "pg-template",
            fsync=True,
            settings={"track_commit_timestamp": "on", "max_connections": "200"},
        )
        lab = cls(rs.start().url, pg.start().dsn, logs, [rs, pg])
        try:
            yield lab
        finally:
            for server in lab.servers:
                server.stop()

    def cpu(self, consumer: float) -> CpuSample:
        """CPU seconds used so far by Redis and Postgres (only when the lab started them: an
        outside server's processes are not ours to read), beside the consumer's, given."""
        redis_pid, pg_pid = (s.pid for s in self.servers) if self.servers else (None, None)
        return CpuSample(consumer, tree_cpu(redis_pid), tree_cpu(pg_pid))

    def env(self, **extra: str) -> dict[str, str]:
        base = {k: v for k, v in os.environ.items() if not k.startswith("STREAMD_")}
        empty = WORK / "empty.toml"
        empty.write_text("")
        return (
            base
            | {
                "STREAMD_REDIS_URL": self.redis_url,
                "STREAMD_POSTGRES_DSN": self.dsn,
                "STREAMD_CONFIG": str(empty),
                "STREAMD_METRICS_PORT": "0",
                "STREAMD_STATE_DIR": str(WORK / "state"),
                "STREAMD_LOG_FORMAT": "json",
            }
            | extra
        )

    def reset(self, table_sql: str = "") -> None:
        """Empty stream, groups and tables; the schema as `streamd db init` makes it, then
        table_sql (a contender's own table)."""
        with redis.Redis.from_url(self.redis_url) as r:
            r.flushdb()
        asyncio.run(self._reset_pg())
        run_quiet([sys.executable, "-m", "streamd", "db", "init"], self.env())
        if table_sql:
            self.execute(table_sql)

    async def _reset_pg(self) -> None:
        conn = await asyncpg.connect(self.dsn)
        try:
            await conn.execute("DROP TABLE IF EXISTS events, dead_letter_queue")
            await conn.execute("CHECKPOINT")
        finally:
            await conn.close()

    def execute(self, sql: str) -> None:
        async def run() -> None:
            conn = await asyncpg.connect(self.dsn)
            try:
                await conn.execute(sql)
            finally:
                await conn.close()

        asyncio.run(run())

    def fill(self, n: int) -> None:
        """Pre-fill the stream with n sample events."""
        asyncio.run(self._fill(sample_payloads(n)))

    async def _fill(self, payloads: list[tuple[str, bytes]]) -> None:
        async with Producer(self.redis_url, stream="events", max_backlog=None) as producer:
            for i in range(0, len(payloads), 10_000):
                await producer.produce_batch(payloads[i : i + 10_000])

    def group(self, name: str) -> dict[str, Any] | None:
        with redis.Redis.from_url(self.redis_url, decode_responses=True) as r:
            try:
                groups = r.xinfo_groups("events")
            except redis.ResponseError:  # no stream yet
                return None
            for group in groups:
                if group["name"] == name:
                    return dict(group)
        return None

    def count(self) -> tuple[int, int]:
        async def go() -> tuple[int, int]:
            conn = await asyncpg.connect(self.dsn)
            try:
                row = await conn.fetchrow("SELECT count(*), count(DISTINCT entry_id) FROM events")
                return int(row[0]), int(row[1])
            finally:
                await conn.close()

        return asyncio.run(go())


def tree_cpu(pid: int | None) -> float:
    """CPU seconds of pid and its descendants so far. A process's own times plus those of the
    children it has waited for (Postgres backends that ended, say) cover everything that ran."""
    if pid is None:
        return 0.0
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            t = proc.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
    return total


def own_cpu() -> float:
    """CPU seconds of this process alone (not its children)."""
    t = psutil.Process().cpu_times()
    return t.user + t.system


@dataclass
class CpuSample:
    consumer: float
    redis: float
    postgres: float

    def per_event_us(self, since: CpuSample, events: int) -> CpuSample:
        scale = 1e6 / events
        return CpuSample(
            (self.consumer - since.consumer) * scale,
            (self.redis - since.redis) * scale,
            (self.postgres - since.postgres) * scale,
        )


def sample_payloads(n: int) -> list[tuple[str, bytes]]:
    """n (type, JSON payload) pairs of the seed's five types, ~125 bytes each (a sequence number
    makes each one unique), the same every run."""
    samples = SampleEvents(seed=42)
    events = [(t, orjson.dumps(d)[:-1]) for t, d in samples.batch(len(samples.pool))]
    return [
        (t, b'%s,"seq":%d}' % (head, i))
        for i, (t, head) in enumerate(events[i % len(events)] for i in range(n))
    ]


def run_quiet(argv: list[str], env: dict[str, str]) -> None:
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{' '.join(argv)} failed:\n{done.stderr}")


# streamd's earlier events layout: the text key (stream, entry_id), unpartitioned.
TEXT_KEY_TABLE = """
DROP TABLE events;
CREATE TABLE events (
    stream text NOT NULL, entry_id text NOT NULL, event_type text NOT NULL,
    payload jsonb NOT NULL, produced_at timestamptz NOT NULL,
    ingested_at timestamptz NOT NULL DEFAULT now(), meta jsonb,
    PRIMARY KEY (stream, entry_id)
);
CREATE INDEX ON events USING brin (ingested_at);
"""


@dataclass
class Contender:
    name: str
    group: str
    env: dict[str, str] = field(default_factory=dict)  # settings of this contender
    table_sql: str = ""  # run after `db init`: the table this contender writes into
    # Consumers that start one by one, slowly (spawned processes importing their app): the
    # timed window opens once this many are in the group, so no start-up falls inside it.
    consumers: int = 0

    def start(self, lab: Lab, tag: str) -> subprocess.Popen[bytes]:
        if self.group == "streamd":
            argv = [sys.executable, "-m", "streamd", "serve"]
        elif self.group == "faststream":
            argv = FASTSTREAM_RUN
        else:
            argv = [sys.executable, "-m", "bench.seed_baseline", lab.redis_url, lab.dsn]
        # the child has its own copy of the file: ours is closed at once (no leak per start)
        with open(lab.logs / f"{self.name}-{tag}.log", "wb") as log:
            return subprocess.Popen(
                argv,
                env=lab.env(**self.env),
                stdout=log,
                stderr=log,
                cwd=ROOT,
                start_new_session=True,
            )


# The seed on its own table, as it was designed: the text key, one heap.
SEED = Contender("seed design", "seed", table_sql=TEXT_KEY_TABLE)
# A FastStream app (bench/faststream_app.py) on the same layout: batch StreamSub, asyncpg COPY,
# 2 worker processes under the FastStream CLI's own supervisor.
FASTSTREAM = Contender("FastStream app", "faststream", table_sql=TEXT_KEY_TABLE, consumers=2)
FASTSTREAM_RUN = [sys.executable, "-m", "faststream", "run", "bench.faststream_app:app", "-w", "2"]
STREAMD = Contender("streamd", "streamd")
# The layouts of docs/partitions.md side by side: the default is partitioned by day.
STREAMD_UNPARTITIONED = Contender(  # serve makes the table again, with its settings
    "streamd unpartitioned", "streamd", {"STREAMD_PARTITION_INTERVAL": ""}, "DROP TABLE events"
)
STREAMD_TEXT_KEY = Contender("streamd text key", "streamd", table_sql=TEXT_KEY_TABLE)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# ---------------------------------------------------------------------------------------------
# drain


def drain_once(lab: Lab, contender: Contender, n: int, tag: str) -> tuple[float, CpuSample]:
    """Events/s for one drain of n pre-filled events, from the first read (or the read once all
    its `consumers` are in) to the last ack, and the CPU per event spent meanwhile (start-up,
    imports and connecting left out): the entries read before the window are left out too."""
    lab.reset(contender.table_sql)
    lab.fill(n)
    proc = contender.start(lab, tag)
    first: tuple[float, CpuSample, int] | None = None  # when the window opened, read by then
    earliest: tuple[float, CpuSample, int] | None = None  # the first read: if all finish first
    try:
        while True:
            group = lab.group(contender.group)
            now = time.perf_counter()
            if group is not None:
                read = int(group.get("entries-read") or 0)
                if earliest is None and read > 0:
                    earliest = (now, lab.cpu(tree_cpu(proc.pid)), 0)
                if first is None and read > 0 and group["consumers"] >= contender.consumers:
                    first = (now, lab.cpu(tree_cpu(proc.pid)), read if contender.consumers else 0)
                if read >= n and group["pending"] == 0:
                    cpu = lab.cpu(tree_cpu(proc.pid))
                    break
            if proc.poll() is not None:
                raise SystemExit(f"{contender.name} exited early; see {lab.logs}")
            time.sleep(0.01)
    finally:
        stop(proc)
    if first is None or first[2] >= n:  # done before the last consumer came: time it all
        first = earliest
    assert first is not None
    total, distinct = lab.count()
    if total != n or distinct != n:
        raise SystemExit(f"{contender.name}: {total} rows ({distinct} distinct), expected {n}")
    timed = n - first[2]
    return timed / (now - first[0]), cpu.per_event_us(first[1], timed)


def drain_raw(lab: Lab, n: int) -> tuple[float, CpuSample]:
    lab.reset()
    rows = make_rows(sample_payloads(n), first_ms=int(time.time() * 1000))
    # this process alone: the servers the lab started are its children, counted apart
    before = lab.cpu(own_cpu())
    seconds = asyncio.run(copy_parallel(lab.dsn, rows, connections=psutil.cpu_count() or 2))
    cpu = lab.cpu(own_cpu()).per_event_us(before, n)
    total, distinct = lab.count()
    if total != n or distinct != n:
        raise SystemExit(f"raw COPY: {total} rows ({distinct} distinct), expected {n}")
    return n / seconds, cpu


CONTENDERS = (
    "seed design",
    "FastStream app",
    "streamd",
    "streamd unpartitioned",
    "streamd text key",
    "raw parallel COPY",
)
_BY_NAME = {c.name: c for c in (SEED, FASTSTREAM, STREAMD, STREAMD_UNPARTITIONED, STREAMD_TEXT_KEY)}
CPU_PARTS = ("consumer", "redis", "postgres")


@dataclass
class DrainResult:
    rates: dict[str, list[float]]
    cpu: dict[str, list[CpuSample]] = field(default_factory=dict)

    def median(self, name: str) -> float:
        return statistics.median(self.rates[name])

    def median_cpu(self, name: str) -> CpuSample | None:
        samples = self.cpu.get(name)
        if not samples:
            return None
        return CpuSample(
            *(statistics.median(getattr(s, part) for s in samples) for part in CPU_PARTS)
        )


def bench_drain(lab: Lab, n: int, repeat: int) -> DrainResult:
    result = DrainResult({name: [] for name in CONTENDERS}, {name: [] for name in CONTENDERS})
    for i in range(repeat):  # interleaved, so drift on a shared machine hits all three alike
        for name in CONTENDERS:
            if name == "raw parallel COPY":
                rate, cpu = drain_raw(lab, n)
            else:
                rate, cpu = drain_once(lab, _BY_NAME[name], n, f"drain{i}")
            result.rates[name].append(rate)
            result.cpu[name].append(cpu)
            say(
                f"  drain {i + 1}/{repeat} {name}: {rate:,.0f} events/s; CPU µs/event "
                f"consumer {cpu.consumer:.1f}, Redis {cpu.redis:.1f}, Postgres {cpu.postgres:.1f}"
            )
    return result


# ---------------------------------------------------------------------------------------------
# sustained


@dataclass
class Step:
    rate: int
    actual_rate: float
    p50: float | None
    p99: float | None
    peak_lag: int | None
    lost: int
    duplicated: int

    @property
    def kept_up(self) -> bool:
        """The producer got its rate, nothing was lost or doubled, and the backlog never grew past
        one second of events."""
        lag_ok = self.peak_lag is not None and self.peak_lag <= max(self.rate, 1000)
        return (
            self.lost == 0
            and self.duplicated == 0
            and lag_ok
            and self.actual_rate >= 0.97 * self.rate
        )

    @property
    def fast(self) -> bool:
        """Kept up, with p99 end-to-end latency within P99_BOUND_MS."""
        return self.kept_up and self.p99 is not None and self.p99 <= P99_BOUND_MS


def sustained_step(lab: Lab, contender: Contender, rate: int, duration: float) -> Step:
    lab.reset(contender.table_sql)
    proc = contender.start(lab, f"rate{rate}")
    try:
        deadline = time.monotonic() + 30
        while lab.group(contender.group) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)  # consumers connected and blocking
        argv = [
            sys.executable,
            "-m",
            "streamd",
            "bench",
            "--rate",
            str(rate),
            "--duration",
            str(duration),
            "--json",
        ]
        done = subprocess.run(
            argv,
            env=lab.env(STREAMD_GROUP=contender.group),
            capture_output=True,
            text=True,
            check=False,
        )
    finally:
        stop(proc)
    try:
        out = orjson.loads(done.stdout)
    except orjson.JSONDecodeError:
        raise SystemExit(f"streamd bench failed:\n{done.stdout}\n{done.stderr}") from None
    latency = out.get("latency_ms") or {}
    return Step(
        rate,
        float(out["actual_rate"] or 0),
        latency.get("p50"),
        latency.get("p99"),
        out.get("peak_lag"),
        int(out["lost"]),
        int(out["duplicated"]),
    )


def bench_sustained(lab: Lab, rates: list[int], duration: float) -> dict[str, list[Step]]:
    results: dict[str, list[Step]] = {}
    for contender in (SEED, STREAMD):
        steps: list[Step] = []
        for rate in rates:
            step = sustained_step(lab, contender, rate, duration)
            steps.append(step)
            say(
                f"  {contender.name} @ {rate:,}/s: actual {step.actual_rate:,.0f}/s, "
                f"p50 {step.p50} ms, p99 {step.p99} ms, peak lag {step.peak_lag}, "
                f"lost {step.lost}, dup {step.duplicated} -> "
                f"{'kept up' if step.kept_up else 'fell behind'}"
                f"{', p99 within bound' if step.fast else ''}"
            )
            if not step.kept_up and rate > 10_000:
                break
        results[contender.name] = steps
    return results


# ---------------------------------------------------------------------------------------------
# memory


@dataclass
class Memory:
    backlog: int
    child_rss_mb: float
    redis_before_mb: float
    redis_after_mb: float
    xlen_after: int


def bench_memory(lab: Lab, backlog: int) -> Memory:
    lab.reset()
    lab.fill(backlog)
    with redis.Redis.from_url(lab.redis_url) as r:
        before = int(r.info("memory")["used_memory"])
    proc = STREAMD.start(lab, "memory")
    peak = 0
    try:
        while True:
            for child in psutil.Process(proc.pid).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    peak = max(peak, child.memory_info().rss)
            group = lab.group(STREAMD.group)
            if group and int(group.get("entries-read") or 0) >= backlog and not group["pending"]:
                break
            time.sleep(0.1)
        time.sleep(6)  # one reaper round: trimming runs every reaper_interval_s
        with redis.Redis.from_url(lab.redis_url) as r:
            after = int(r.info("memory")["used_memory"])
            xlen = int(r.xlen("events"))
    finally:
        stop(proc)
    mb = 1024 * 1024
    return Memory(backlog, peak / mb, before / mb, after / mb, xlen)


# ---------------------------------------------------------------------------------------------
# report


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{cpu}, {psutil.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB"


def report(
    args: argparse.Namespace,
    drain: DrainResult | None,
    sustained: dict[str, list[Step]] | None,
    memory: Memory | None,
) -> str:
    lines = [
        f"streamd benchmark — {machine()} — Redis, Postgres, producer and consumers "
        "share these cores",
        "",
    ]
    if drain:
        seed, raw = drain.median("seed design"), drain.median("raw parallel COPY")
        names = [n for n in CONTENDERS if n in drain.rates]  # a file of an earlier run: fewer
        lines += [
            f"drain: {args.events:,} pre-filled events, median of {args.repeat}",
            f"  {'contender':<22}{'events/s':>12}{'vs seed':>10}{'vs raw COPY':>13}",
        ]
        for name in names:
            rate = drain.median(name)
            lines.append(f"  {name:<22}{rate:>12,.0f}{rate / seed:>9.2f}x{rate / raw:>12.2f}x")
        if "FastStream app" in names:  # the second reference (issue 13's target: >= 4x)
            faststream = drain.median("FastStream app")
            for name in (n for n in names if n.startswith("streamd")):
                lines.append(f"  {name} / FastStream app: {drain.median(name) / faststream:.2f}x")
        lines.append("")
        if any(drain.cpu.values()):
            lines += [
                "  CPU per event (µs, median) while draining: who spends it",
                f"  {'contender':<22}{'consumer':>10}{'Redis':>8}{'Postgres':>10}{'total':>8}",
            ]
            for name in names:
                cpu = drain.median_cpu(name)
                if cpu is not None:
                    parts = [cpu.consumer, cpu.redis, cpu.postgres]
                    cells = "".join(f"{v:>{w}.1f}" for v, w in zip(parts, (10, 8, 10), strict=True))
                    lines.append(f"  {name:<22}{cells}{sum(parts):>8.1f}")
            lines.append("")
    if sustained:
        lines += [
            f"sustained: producer at a fixed rate for {args.duration:g} s per step; kept up = "
            "lag <= 1 s of events, nothing lost or duplicated",
            f"  {'contender':<14}{'max kept up':>13}{'p50/p99 there':>20}"
            f"{f'max with p99<={P99_BOUND_MS:g}ms':>22}{'p99 @1k/s':>12}{'p99 @10k/s':>12}",
        ]
        for name, steps in sustained.items():
            best = _best(steps, lambda s: s.kept_up)
            quick = _best(steps, lambda s: s.fast)
            at = {s.rate: s for s in steps}
            lines.append(
                f"  {name:<14}{(f'{best.rate:,}/s' if best else 'none'):>13}"
                f"{(f'{best.p50:g}/{best.p99:g} ms' if best else '-'):>20}"
                f"{(f'{quick.rate:,}/s' if quick else 'none'):>22}"
                f"{_p99(at.get(1_000)):>12}{_p99(at.get(10_000)):>12}"
            )
        lines.append("")
    if memory:
        lines += [
            f"memory: {memory.backlog:,}-entry backlog drained by streamd",
            f"  RSS per child (max): {memory.child_rss_mb:.0f} MB; Redis used_memory: "
            f"{memory.redis_before_mb:.0f} MB with the backlog, {memory.redis_after_mb:.0f}"
            f" MB after (XLEN {memory.xlen_after} after trimming)",
        ]
    return "\n".join(lines)


def _best(steps: list[Step], ok: Callable[[Step], bool]) -> Step | None:
    return max((s for s in steps if ok(s)), key=lambda s: s.rate, default=None)


def _p99(step: Step | None) -> str:
    return f"{step.p99:g} ms" if step and step.p99 is not None else "-"


def report_from_json(path: Path) -> str:
    data = orjson.loads(path.read_bytes())
    args = argparse.Namespace(**data["args"])
    saved = data.get("drain")
    drain = None
    if saved:
        # files written before the CPU accounting hold the rates alone
        rates, cpu = (saved["rates"], saved["cpu"]) if "rates" in saved else (saved, {})
        drain = DrainResult(rates, {k: [CpuSample(**c) for c in v] for k, v in cpu.items()})
    sustained = {
        name: [Step(**step) for step in steps]
        for name, steps in (data.get("sustained") or {}).items()
    } or None
    memory = Memory(**data["memory"]) if data.get("memory") else None
    return report(args, drain, sustained, memory)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("--events", type=int, default=500_000, help="drain size")
    parser.add_argument("--repeat", type=int, default=3, help="drain runs per contender")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds per sustained step")
    parser.add_argument("--rates", default=",".join(map(str, DEFAULT_RATES)))
    parser.add_argument("--backlog", type=int, default=1_000_000, help="memory section backlog")
    parser.add_argument("--only", default="drain,sustained,memory")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="--events 200000 --repeat 1 --duration 15 --backlog 300000",
    )
    parser.add_argument("--redis-aof", action="store_true", help="Redis with appendonly yes")
    parser.add_argument("--redis-url")
    parser.add_argument("--postgres-dsn")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument("--report", type=Path, help="print the table of an earlier --json file")
    args = parser.parse_args()
    if args.report:
        print(report_from_json(args.report))
        return
    if args.quick:
        args.events, args.repeat, args.duration, args.backlog = 200_000, 1, 15.0, 300_000
    sections = set(args.only.split(","))
    load_settings(environ={})  # fail early on a broken install
    with Lab.open(args.redis_url, args.postgres_dsn, aof=args.redis_aof) as lab:
        drain = sustained = memory = None
        if "drain" in sections:
            say("drain...")
            drain = bench_drain(lab, args.events, args.repeat)
        if "sustained" in sections:
            say("sustained...")
            rates = [int(r) for r in args.rates.split(",")]
            sustained = bench_sustained(lab, rates, args.duration)
        if "memory" in sections:
            say("memory...")
            memory = bench_memory(lab, args.backlog)
    print(report(args, drain, sustained, memory))
    if args.json:
        args.json.write_bytes(
            orjson.dumps(
                {
                    "args": vars(args) | {"json": str(args.json)},
                    "drain": drain,
                    "sustained": sustained,
                    "memory": memory,
                },
                default=lambda o: o.__dict__,
                option=orjson.OPT_INDENT_2,
            )
        )


if __name__ == "__main__":
    main()
