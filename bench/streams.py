"""Many streams, side by side in one run, on the same private Redis and Postgres (bench/run.py's
lab), printing one table:

- drain: --events (default 500,000) pre-filled over 100 streams, drained by one `streamd serve`,
  against the same events in one stream (target: >= 0.8x);
- spread: 10 streams at 10,000 events/s in total for --duration seconds: p50/p99 end-to-end;
- fairness: a quiet stream at 100 events/s while another stream drains a --backlog
  (default 1,000,000) entry backlog: the quiet stream's p50/p99 end-to-end;
- idle: 1,000 idle streams: serve's CPU (% of one core, supervisor and children) and RSS per child.

End-to-end latency is the producer's send time (in the payload, microseconds) to the row's COMMIT
(track_commit_timestamp is on in the bench server).

    uv run python -m bench.streams
    uv run python -m bench.streams --quick
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg
import orjson
import psutil
import redis
import redis.asyncio as aioredis

from bench.run import ROOT, CpuSample, Lab, sample_payloads, say, stop, tree_cpu
from streamd.client.producer import Producer
from streamd.config.settings import Settings


def start_serve(lab: Lab, tag: str, **env: str) -> subprocess.Popen[bytes]:
    log = open(lab.logs / f"streams-{tag}.log", "wb")  # noqa: SIM115 - lives with proc
    return subprocess.Popen(
        [sys.executable, "-m", "streamd", "serve"],
        env=lab.env(**env),
        stdout=log,
        stderr=log,
        cwd=ROOT,
        start_new_session=True,
    )


def progress(lab: Lab, streams: Sequence[str]) -> tuple[int, int, int]:
    """Entries read, entries pending, groups found, summed over the streams."""
    with redis.Redis.from_url(lab.redis_url, decode_responses=True) as r:
        pipe = r.pipeline(transaction=False)
        for name in streams:
            pipe.xinfo_groups(name)
        replies = pipe.execute(raise_on_error=False)
    read = pending = groups = 0
    for reply in replies:
        for group in reply if isinstance(reply, list) else []:
            if group["name"] == "streamd":
                groups += 1
                read += int(group.get("entries-read") or 0)
                pending += int(group["pending"])
    return read, pending, groups


def fill(lab: Lab, n: int, streams: Sequence[str]) -> None:
    """n sample events, spread evenly (round-robin chunks) over the streams."""
    payloads = sample_payloads(n)
    per = -(-n // len(streams))

    async def go() -> None:
        for i, name in enumerate(streams):
            part = payloads[i * per : (i + 1) * per]
            async with Producer(lab.redis_url, stream=name, max_backlog=None) as producer:
                for j in range(0, len(part), 10_000):
                    await producer.produce_batch(part[j : j + 10_000])

    asyncio.run(go())


def wait_for(lab: Lab, proc: subprocess.Popen[bytes], streams: Sequence[str], n: int) -> None:
    # A look at 100 streams costs this process and Redis a few ms: poll them less often, so the
    # polling does not slow down what it measures (the error stays within 1 % of a drain).
    interval = 0.02 if len(streams) < 10 else 0.05
    while True:
        read, pending, _ = progress(lab, streams)
        if read >= n and pending == 0:
            return
        if proc.poll() is not None:
            raise SystemExit(f"serve exited early; see {lab.logs}")
        time.sleep(interval)


def drain(
    lab: Lab, n: int, streams: Sequence[str], tag: str, **env: str
) -> tuple[float, CpuSample]:
    """Events/s from the first read to the last ack, and CPU µs per event meanwhile."""
    lab.reset()
    fill(lab, n, streams)
    proc = start_serve(lab, tag, **env)
    try:
        while progress(lab, streams)[0] == 0:
            if proc.poll() is not None:
                raise SystemExit(f"serve exited early; see {lab.logs}")
            time.sleep(0.005)
        first, cpu0 = time.perf_counter(), lab.cpu(tree_cpu(proc.pid))
        wait_for(lab, proc, streams, n)
        seconds = time.perf_counter() - first
        cpu = lab.cpu(tree_cpu(proc.pid)).per_event_us(cpu0, n)
    finally:
        stop(proc)
    total, distinct = lab.count()
    if total != n or distinct != n:
        raise SystemExit(f"{tag}: {total} rows ({distinct} distinct), expected {n}")
    return n / seconds, cpu


async def paced(
    url: str, streams: Sequence[str], rate: float, until: asyncio.Event, run: str
) -> int:
    """rate events/s in total, round-robin over the streams, every 10 ms, until `until`."""
    client = aioredis.Redis.from_url(url)
    sent = 0
    started = time.perf_counter()
    try:
        while not until.is_set():
            due = int((time.perf_counter() - started) * rate) - sent
            if due > 0:
                pipe = client.pipeline(transaction=False)
                for i in range(sent, sent + due):
                    data = orjson.dumps({"run": run, "seq": i, "sent_us": time.time_ns() // 1000})
                    pipe.xadd(streams[i % len(streams)], {"type": "t", "data": data})
                await pipe.execute()
                sent += due
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(until.wait(), 0.01)
    finally:
        await client.aclose()
    return sent


async def latency(dsn: str, run: str, expected: int, timeout_s: float = 60) -> tuple[float, float]:
    """p50, p99 in ms of the run's rows, once all `expected` are committed."""
    conn = await asyncpg.connect(dsn)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            n = await conn.fetchval("SELECT count(*) FROM events WHERE payload->>'run' = $1", run)
            if n >= expected:
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"{run}: {n} of {expected} rows after {timeout_s} s")
            await asyncio.sleep(0.1)
        pcts = await conn.fetchval(
            """SELECT percentile_cont(ARRAY[0.5, 0.99]) WITHIN GROUP (ORDER BY
                 extract(epoch FROM pg_xact_commit_timestamp(xmin)) * 1000
                 - (payload->>'sent_us')::bigint / 1000.0)
               FROM events WHERE payload->>'run' = $1""",
            run,
        )
        return float(pcts[0]), float(pcts[1])
    finally:
        await conn.close()


def ready(lab: Lab, proc: subprocess.Popen[bytes], streams: Sequence[str]) -> None:
    """Every stream has its group and every consumer task of serve is blocked in its first
    XREADGROUP: what is sent from now on measures the pipeline, not serve's start."""
    tasks = Settings().tasks  # the bench runs serve with the defaults
    while True:
        workers = len(psutil.Process(proc.pid).children())
        with redis.Redis.from_url(lab.redis_url) as r:
            blocked = sum(
                1
                for c in r.client_list()
                if c.get("cmd") == "xreadgroup" and "b" in c.get("flags", "")
            )
        if progress(lab, streams)[2] == len(streams) and workers and blocked >= workers * tasks:
            return
        if proc.poll() is not None:
            raise SystemExit(f"serve exited early; see {lab.logs}")
        time.sleep(0.05)


def spread(lab: Lab, rate: int, duration: float, n: int) -> tuple[float, float, int]:
    """p50, p99 at `rate` events/s in total over n streams (n = 1: the one stream, as a
    baseline), and the events sent."""
    streams = [f"t:{i}" for i in range(n)]
    lab.reset()
    with redis.Redis.from_url(lab.redis_url) as r:
        for name in streams:
            r.xgroup_create(name, "streamd", id="0", mkstream=True)
    proc = start_serve(lab, f"spread-{n}", STREAMD_STREAMS="t:*")
    try:
        ready(lab, proc, streams)

        async def go() -> tuple[int, tuple[float, float]]:
            until = asyncio.Event()
            asyncio.get_running_loop().call_later(duration, until.set)
            sent = await paced(lab.redis_url, streams, rate, until, f"spread-{n}")
            return sent, await latency(lab.dsn, f"spread-{n}", sent)

        sent, (p50, p99) = asyncio.run(go())
    finally:
        stop(proc)
    return p50, p99, sent


def fairness(lab: Lab, backlog: int) -> tuple[float, float, int, float]:
    lab.reset()
    fill(lab, backlog, ["big"])
    with redis.Redis.from_url(lab.redis_url) as r:
        r.xgroup_create("quiet", "streamd", id="0", mkstream=True)
    proc = start_serve(lab, "fairness", STREAMD_STREAMS="big,quiet")
    try:
        while progress(lab, ["big"])[0] == 0:
            time.sleep(0.005)
        started = time.perf_counter()

        async def go() -> tuple[int, tuple[float, float]]:
            until = asyncio.Event()
            producer = asyncio.create_task(paced(lab.redis_url, ["quiet"], 100, until, "quiet"))
            await asyncio.to_thread(wait_for, lab, proc, ["big"], backlog)
            until.set()
            sent = await producer
            return sent, await latency(lab.dsn, "quiet", sent)

        sent, (p50, p99) = asyncio.run(go())
        drain_s = time.perf_counter() - started
    finally:
        stop(proc)
    return p50, p99, sent, drain_s


@dataclass
class Idle:
    cpu_pct: float
    rss_mb: list[float]


def idle(lab: Lab, n: int, window_s: float) -> Idle:
    streams = [f"i:{i:04d}" for i in range(n)]
    lab.reset()
    with redis.Redis.from_url(lab.redis_url) as r:
        pipe = r.pipeline(transaction=False)
        for name in streams:
            pipe.xadd(name, {"type": "t", "data": "{}"})
        pipe.execute()
    proc = start_serve(lab, "idle", STREAMD_STREAMS="i:*")
    try:
        wait_for(lab, proc, streams, n)
        time.sleep(5)  # start-up work (groups, first reaper rounds) done
        before, t0 = tree_cpu(proc.pid), time.perf_counter()
        time.sleep(window_s)
        used, seconds = tree_cpu(proc.pid) - before, time.perf_counter() - t0
        rss = [c.memory_info().rss / 2**20 for c in psutil.Process(proc.pid).children()]
    finally:
        stop(proc)
    return Idle(100 * used / seconds, rss)


def cpu_text(cpu: CpuSample) -> str:
    return (
        f"CPU µs/event: serve {cpu.consumer:.1f}, Redis {cpu.redis:.1f}, "
        f"Postgres {cpu.postgres:.1f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=500_000)
    parser.add_argument("--backlog", type=int, default=1_000_000)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--idle-window", type=float, default=30.0)
    parser.add_argument("--quick", action="store_true", help="100,000 events, shorter runs")
    parser.add_argument("--redis-url")
    parser.add_argument("--postgres-dsn")
    args = parser.parse_args()
    if args.quick:
        args.events, args.backlog, args.duration, args.idle_window = 100_000, 200_000, 5, 10
    many = [f"s:{i:03d}" for i in range(100)]
    with Lab.open(args.redis_url, args.postgres_dsn) as lab:
        say(f"drain of {args.events:,} events: 1 stream, then 100 streams")
        one, one_cpu = drain(lab, args.events, ["events"], "drain-1")
        say(f"  1 stream: {one:,.0f} events/s; {cpu_text(one_cpu)}")
        hundred, hundred_cpu = drain(lab, args.events, many, "drain-100", STREAMD_STREAMS="s:*")
        say(f"  100 streams: {hundred:,.0f} events/s; {cpu_text(hundred_cpu)}")
        say(f"1 stream, then 10 streams, at 10,000 events/s for {args.duration:g} s")
        b50, b99, b_sent = spread(lab, 10_000, args.duration, 1)
        say(f"  1 stream: p50 {b50:.1f} ms, p99 {b99:.1f} ms")
        s50, s99, s_sent = spread(lab, 10_000, args.duration, 10)
        say(f"  10 streams: p50 {s50:.1f} ms, p99 {s99:.1f} ms")
        say(f"quiet stream at 100 events/s while another drains {args.backlog:,}")
        q50, q99, q_sent, q_drain = fairness(lab, args.backlog)
        say(f"1,000 idle streams for {args.idle_window:g} s")
        rest = idle(lab, 1000, args.idle_window)
    rss = ", ".join(f"{mb:.0f}" for mb in rest.rss_mb)
    print(
        "\n".join(
            [
                "| measure | result | target |",
                "|---|---|---|",
                f"| drain {args.events:,}, 1 stream | {one:,.0f} events/s; {cpu_text(one_cpu)} | |",
                f"| drain {args.events:,}, 100 streams | {hundred:,.0f} events/s "
                f"({hundred / one:.2f}x); {cpu_text(hundred_cpu)} | >= 0.8x |",
                f"| 1 stream, 10,000 events/s ({b_sent:,} sent) | p50 {b50:.1f} ms, "
                f"p99 {b99:.1f} ms | (baseline) |",
                f"| 10 streams, 10,000 events/s ({s_sent:,} sent) | p50 {s50:.1f} ms, "
                f"p99 {s99:.1f} ms | p99 <= 50 ms |",
                f"| quiet stream at 100/s during a {args.backlog:,} drain ({q_drain:.1f} s, "
                f"{q_sent:,} sent) | p50 {q50:.1f} ms, p99 {q99:.1f} ms | p99 <= 100 ms |",
                f"| 1,000 idle streams | CPU {rest.cpu_pct:.1f}% of a core; RSS per child "
                f"{rss} MB | <= 5%, <= 150 MB |",
            ]
        )
    )


if __name__ == "__main__":
    main()
