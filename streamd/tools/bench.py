"""`streamd bench`: an end-to-end benchmark of the pipeline, with its results verified.

Rate mode (`--rate R --duration D`) produces R events/s for D s and prints a report in the form
of the original pipeline's benchmark. Drain mode (`--drain N`) pre-fills N events and times how
fast serve works them off. Either way every event carries the run's id, a sequence number and its
send time in microseconds, so afterwards one query over the run's entry-ID range answers:

- exactly once: lost = produced - distinct sequence numbers in Postgres; duplicated = rows - those;
- end-to-end latency, send time -> COMMIT: the commit timestamp when Postgres tracks them
  (track_commit_timestamp = on), else ingested_at, which is the transaction's start and so reads a
  little low. Send time has microsecond precision (the envelope's `ts` only has milliseconds);
  both clocks are this machine's when bench runs beside Redis and Postgres;
- consumer throughput: rows / (last commit - first commit).

Peak lag is the group's lag sampled every 200 ms while the run lasts (summed over the streams).

With several streams (`--streams N`) batches go to the streams in turn, and each stream is checked
on its own: every stream must hold exactly the events sent to it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

import asyncpg
import orjson

from streamd.backends.connections import postgres_connect
from streamd.backends.faults import REDIS_FAULTS
from streamd.backends.preflight import check_postgres, check_redis, postgres_error, redis_error
from streamd.client.producer import Producer
from streamd.config.settings import Settings
from streamd.errors import StreamdError
from streamd.observability.monitor import Monitor
from streamd.observability.redis_stats import read_streams_stats
from streamd.tools.bench_serve import ServeRunner
from streamd.tools.bench_verify import RunRows, Verified
from streamd.tools.samples import ProduceResult, SampleEvents, produce_paced, progress_step

RULE = "=" * 60
LAG_SAMPLE_S = 0.2
POLL_S = 0.2


class BenchError(StreamdError):
    """The benchmark could not run or could not verify its events."""


@dataclass(slots=True)
class BenchPlan:
    rate: float | None = None
    duration_s: float | None = None
    drain: int | None = None
    batch_size: int = 1000
    serve_procs: int | None = None  # start our own serve with this many processes
    wait_s: float = 60.0  # give up waiting for rows after this long without progress
    global_args: Sequence[str] = ()  # --config/--set, for our own serve
    streams: Sequence[str] = ()  # spread the events over these (empty: settings.stream)

    @property
    def expected(self) -> int:
        if self.drain is not None:
            return self.drain
        assert self.rate is not None and self.duration_s is not None
        return round(self.rate * self.duration_s)


@dataclass(slots=True)
class BenchResult:
    plan: BenchPlan
    run_id: str
    produced: ProduceResult
    verified: Verified
    peak_lag: int | None
    drain_s: float | None = None
    stream: str = ""
    table: str = ""
    sent: dict[str, int] = field(default_factory=dict)  # stream -> events produced to it

    @property
    def lost(self) -> int:
        return max(0, self.produced.produced - self.verified.distinct)

    @property
    def duplicated(self) -> int:
        return self.verified.persisted - self.verified.distinct

    @property
    def per_stream(self) -> dict[str, dict[str, int]]:
        found = self.verified.per_stream
        return {
            name: {"produced": n, "persisted": found.get(name, 0)} for name, n in self.sent.items()
        }

    @property
    def exactly_once(self) -> bool:
        """Nothing lost, nothing twice, nothing dead, and every stream has what it was sent."""
        streams_ok = all(s["produced"] == s["persisted"] for s in self.per_stream.values())
        return self.lost == 0 and self.duplicated == 0 and self.verified.dead == 0 and streams_ok

    @property
    def accuracy(self) -> float | None:
        rate = self.plan.rate
        return None if rate is None else self.produced.rate / rate * 100

    @property
    def consumer_throughput(self) -> float | None:
        span = self.verified.commit_span_s
        return self.verified.persisted / span if span else None

    def to_json(self) -> dict[str, Any]:
        v = self.verified
        return {
            "run_id": self.run_id,
            "mode": "drain" if self.plan.drain is not None else "rate",
            "target_rate": self.plan.rate,
            "duration_s": self.plan.duration_s,
            "expected": self.plan.expected,
            "produced": self.produced.produced,
            "elapsed_s": round(self.produced.elapsed_s, 3),
            "actual_rate": round(self.produced.rate, 2),
            "accuracy": None if self.accuracy is None else round(self.accuracy, 2),
            "persisted": v.persisted,
            "lost": self.lost,
            "duplicated": self.duplicated,
            "dead_lettered": v.dead,
            "exactly_once": self.exactly_once,
            "latency_ms": v.latency_ms,
            "latency_clock": v.clock,
            "consumer_throughput": _round(self.consumer_throughput),
            "commit_span_s": _round(v.commit_span_s, 3),
            "drain_s": _round(self.drain_s, 3),
            "peak_lag": self.peak_lag,
            "serve_procs": self.plan.serve_procs,
            "stream": self.stream,
            "table": self.table,
            "streams": self.per_stream,
        }


def _round(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


# ---------------------------------------------------------------------------------------------
# the run


class Spread:
    """Looks like one Producer to produce_paced; sends each batch to the next stream in turn."""

    def __init__(self, producers: list[Producer]) -> None:
        self.producers = producers
        self.settings = producers[0].settings
        self.sent = {p.stream: 0 for p in producers}
        self._next = 0

    async def produce_batch(self, events: list[tuple[str, Any]]) -> list[str]:
        producer = self.producers[self._next]
        self._next = (self._next + 1) % len(self.producers)
        ids = await producer.produce_batch(events)
        self.sent[producer.stream] += len(ids)
        return ids


class LagSampler:
    """Samples the group's lag (summed over the streams) in the background; keeps the peak."""

    def __init__(self, settings: Settings, streams: Sequence[str]) -> None:
        self.monitor = Monitor(settings)
        self.streams = list(streams)
        self.peak: int | None = None
        self._task: asyncio.Task[None] | None = None

    async def _lag(self) -> int | None:
        stats = await read_streams_stats(self.monitor.redis, self.monitor.settings, self.streams)
        lags = [s.lag for s in stats.values()]
        return None if any(lag is None for lag in lags) else sum(lag or 0 for lag in lags)

    async def _run(self) -> None:
        while True:
            try:
                lag = await self._lag()
            except REDIS_FAULTS:
                lag = None  # a missed sample; the run itself reports real failures
            if lag is not None:
                self.peak = lag if self.peak is None else max(self.peak, lag)
            await asyncio.sleep(LAG_SAMPLE_S)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="lag-sampler")

    async def stop(self) -> int | None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.monitor.aclose()
        return self.peak


class Bench:
    def __init__(self, settings: Settings, plan: BenchPlan, out: TextIO, progress: TextIO):
        self.settings = settings
        self.plan = plan
        self.out = out  # the report
        self.progress = progress  # progress lines (stderr with --json, so stdout stays JSON)
        self.run_id = secrets.token_hex(6)
        self.samples = SampleEvents(seed=7)
        self.serve: ServeRunner | None = None
        self.streams = list(plan.streams) or [settings.stream]

    def say(self, text: str) -> None:
        print(text, file=self.progress, flush=True)

    async def run(self) -> BenchResult:
        s, plan = self.settings, self.plan
        await check_postgres(s)
        for stream in self.streams:
            # Creates the group (from the start) if missing: nothing is skipped.
            await check_redis(dataclasses.replace(s, stream=stream, streams=()))
        if plan.serve_procs is not None:
            self.serve = ServeRunner(s, plan.serve_procs, plan.global_args)
        lag = LagSampler(s, self.streams)
        try:
            if self.serve is not None and plan.drain is None:
                await self._start_serve()
            lag.start()
            conn = await postgres_connect(s)
            try:
                return await self._measure(conn, lag)
            finally:
                await conn.close(timeout=5)
        finally:
            await lag.stop()
            if self.serve is not None:
                self.say("Stopping streamd serve...")
                await self.serve.stop()

    async def _start_serve(self) -> None:
        assert self.serve is not None
        self.say(f"Starting streamd serve --procs {self.plan.serve_procs} (log: {self.serve.log})")
        await self.serve.start()

    async def _measure(self, conn: asyncpg.Connection, lag: LagSampler) -> BenchResult:
        rows = RunRows(self.settings, conn, self.run_id, self.streams)
        produced, sent = await self._produce()
        if produced.first_id is None or produced.last_id is None:
            raise BenchError("nothing was produced")
        drain_started = time.monotonic()
        if self.serve is not None and self.plan.drain is not None:
            await self._start_serve()
            drain_started = time.monotonic()
        await self._wait_persisted(rows, produced)
        drain_s = time.monotonic() - drain_started if self.plan.drain is not None else None
        verified = await rows.verify(produced.first_id, produced.last_id)
        return BenchResult(
            self.plan,
            self.run_id,
            produced,
            verified,
            lag.peak,
            drain_s,
            stream=",".join(self.streams),
            table=self.settings.events_table,
            sent=sent,
        )

    async def _produce(self) -> tuple[ProduceResult, dict[str, int]]:
        plan = self.plan
        total = plan.expected
        limit = None if plan.drain is not None else self.settings.max_backlog or None
        run = self.run_id
        producers = [
            Producer.from_settings(self.settings, max_backlog=limit, stream=stream)
            for stream in self.streams
        ]
        spread = Spread(producers)
        try:
            for producer in producers:
                await producer.connect()
            result = await produce_paced(
                spread,  # type: ignore[arg-type]  # produce_batch and settings: all it uses
                total,
                lambda count, seq: self.samples.tagged_batch(count, run, seq),
                rate=plan.rate,
                batch_size=plan.batch_size,
                on_progress=lambda n: self.say(f"Produced {n} events..."),
                progress_every=progress_step(total),
            )
        finally:
            for producer in producers:
                await producer.aclose()
        self.say(f"Completed: {result.produced} total events produced")
        return result, spread.sent

    async def _wait_persisted(self, rows: RunRows, produced: ProduceResult) -> None:
        """Until every event is a row (or a dead letter), or no progress for wait_s."""
        assert produced.first_id is not None and produced.last_id is not None
        total = produced.produced
        last_change = time.monotonic()
        last_seen = -1
        last_report = 0.0
        while True:
            persisted, dead = await rows.count(produced.first_id, produced.last_id)
            now = time.monotonic()
            if persisted + dead >= total:
                return
            if persisted + dead != last_seen:
                last_seen, last_change = persisted + dead, now
            elif now - last_change > self.plan.wait_s:
                self.say(f"No progress for {self.plan.wait_s:g}s: is streamd serve running?")
                return
            if now - last_report >= 1.0:
                self.say(f"Waiting for serve: {persisted}/{total} events persisted...")
                last_report = now
            await asyncio.sleep(POLL_S)


# ---------------------------------------------------------------------------------------------
# the report


def render(result: BenchResult) -> str:
    plan, p, v = result.plan, result.produced, result.verified
    lines = [RULE, "BENCHMARK RESULTS", RULE, f"Total Events: {p.produced}"]
    if plan.drain is None:
        lines += [
            f"Elapsed Time: {p.elapsed_s:.2f} seconds",
            f"Actual Rate: {p.rate:.2f} events/sec",
            f"Target Rate: {plan.rate:g} events/sec",
            f"Accuracy: {result.accuracy:.2f}%",
        ]
    else:
        since = "serve ready" if plan.serve_procs is not None else "end of pre-fill"
        lines += [
            f"Pre-fill Time: {p.elapsed_s:.2f} seconds ({p.rate:,.0f} events/sec)",
            f"Drain Time: {result.drain_s:.2f} seconds ({since} to the last row)",
        ]
    verdict = "yes" if result.exactly_once else "NO"
    lines += [
        "-" * 60,
        f"Persisted: {v.persisted}",
        f"Lost: {result.lost}",
        f"Duplicated: {result.duplicated}",
        f"Dead-lettered: {v.dead}",
        f"Exactly once: {verdict}",
        *_stream_lines(result),
        f"Consumer Throughput: {_rate(result.consumer_throughput)} (first to last commit)",
        f"Peak Lag: {'n/a' if result.peak_lag is None else result.peak_lag} entries",
        f"End-to-end Latency (send -> commit, by {v.clock}):",
        "  " + "  ".join(f"{k}: {_ms(x)}" for k, x in v.latency_ms.items()),
        RULE,
    ]
    return "\n".join(lines)


def _stream_lines(result: BenchResult) -> list[str]:
    """Per stream, with several: what it was sent and what it holds."""
    if len(result.sent) < 2:
        return []
    per_stream = result.per_stream
    wrong = [name for name, s in per_stream.items() if s["produced"] != s["persisted"]]
    lines = [
        f"Per stream: {len(per_stream) - len(wrong)} of {len(per_stream)} hold what they were sent"
    ]
    shown = per_stream if len(per_stream) <= 10 else {n: per_stream[n] for n in wrong}
    for name, s in shown.items():
        mark = "" if name not in wrong else "  <- MISMATCH"
        lines.append(f"  {name}: {s['produced']} produced, {s['persisted']} persisted{mark}")
    return lines


def _rate(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.0f} events/sec"


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} ms"


def header(plan: BenchPlan, settings: Settings) -> str:
    if plan.drain is not None:
        lines = [RULE, "STREAMING BENCHMARK (drain)", RULE, f"Pre-fill: {plan.drain} events"]
    else:
        lines = [
            RULE,
            "STREAMING BENCHMARK",
            RULE,
            f"Target Rate: {plan.rate:g} events/sec",
            f"Duration: {plan.duration_s:g} seconds",
            f"Expected Total: {plan.expected} events",
        ]
    # Said up front: without --serve, the events are real entries of the running serve's stream.
    whose = "its own serve's" if plan.serve_procs is not None else "the running serve's"
    streams = list(plan.streams) or [settings.stream]
    if len(streams) == 1:
        where = f"stream {streams[0]}"
    else:
        where = f"{len(streams)} streams {streams[0]} .. {streams[-1]}"
    lines.append(f"Writes to: {where}, table {settings.events_table} ({whose})")
    if plan.serve_procs is None:
        lines.append("  (--serve runs a serve of its own, on a stream and table of its own)")
    return "\n".join([*lines, RULE])


async def run_bench(
    settings: Settings, plan: BenchPlan, *, as_json: bool, out: TextIO | None = None
) -> int:
    """Run, print the report (or one JSON object); exit code 1 unless exactly once held."""
    out = out or sys.stdout
    progress = sys.stderr if as_json else out
    print(header(plan, settings), file=progress, flush=True)
    try:
        result = await Bench(settings, plan, out, progress).run()
    except REDIS_FAULTS as exc:
        raise redis_error(settings, exc, "benchmark") from None
    except (asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise postgres_error(settings, exc, "verify the benchmark") from None
    if as_json:
        out.write(orjson.dumps(result.to_json()).decode() + "\n")
    else:
        out.write(render(result) + "\n")
    out.flush()
    return 0 if result.to_json()["exactly_once"] else 1
