"""Beyond one Redis, side by side in one run: bench/run.py's lab (a private single Redis and
PostgreSQL) plus a private 3-master Redis Cluster with one replica each (streamd/dev/cluster.py),
printing one table:

- drain: --events (default 500,000) pre-filled over 6 shards of the cluster, drained by one
  `streamd serve`, against the same events in one stream on the single Redis (target >= 0.8x),
  alone and then, like each master of the cluster, with one replica (--no-single-replica: alone
  only). The ratio is taken against the single Redis with its replica: the cluster's replicas
  re-apply every delivery (an XCLAIM per entry read) on the same cores, and a lone node would
  leave that cost out of the baseline;
- sustained: --rate (default 10,000) events/s over the 6 shards for --duration seconds: p50/p99
  end-to-end (producer send time -> Postgres commit time; target p99 <= 100 ms);
- takeover: two serves on the cluster at --takeover-rate events/s, one SIGKILLed while its
  batches wait in COPY: p99 and max end-to-end of the entries it held (target p99 <=
  liveness_ttl_s + 2 s).

    uv run python -m bench.cluster
    uv run python -m bench.cluster --quick
    uv run python -m bench.cluster --redis-aof   # appendonly yes on every Redis
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import asyncpg
import psutil
import redis

from bench.run import ROOT, WORK, Lab, sample_payloads, say, stop
from bench.streams import latency
from streamd.client.producer import Producer
from streamd.config.sharding import shard_keys
from streamd.dev.cluster import LocalRedisCluster
from streamd.dev.servers import RedisServer

SHARDS = 6
LOCK_S = 0.5  # takeover: how long the table is locked around the kill


def serve(lab: Lab, tag: str, url: str, **env: str) -> subprocess.Popen[bytes]:
    log = open(lab.logs / f"cluster-{tag}.log", "wb")  # noqa: SIM115 - lives with proc
    return subprocess.Popen(
        [sys.executable, "-m", "streamd", "serve"],
        env=lab.env(STREAMD_REDIS_URL=url, **env),
        stdout=log,
        stderr=log,
        cwd=ROOT,
        start_new_session=True,
    )


def client_of(url: str, cluster: bool) -> redis.Redis | redis.RedisCluster:
    return redis.RedisCluster.from_url(url) if cluster else redis.Redis.from_url(url)


def done_reading(r: redis.Redis | redis.RedisCluster, keys: Sequence[str]) -> tuple[int, int]:
    """Entries read and entries pending by group streamd, over the keys. The caller keeps one
    client for all its polls: a new RedisCluster asks for the slot map and COMMAND's whole
    table each time, which polled every 20 ms took CPU from the drain it timed."""
    read = pending = 0
    for key in keys:
        try:
            groups = r.xinfo_groups(key)
        except redis.ResponseError:
            continue
        for group in groups:
            if group["name"] in (b"streamd", "streamd"):
                read += int(group.get("entries-read") or 0)
                pending += int(group["pending"])
    return read, pending


def fill(url: str, n: int, shards: int) -> None:
    payloads = sample_payloads(n)

    async def go() -> None:
        async with Producer(url, stream="events", max_backlog=None, shards=shards) as producer:
            for i in range(0, len(payloads), 10_000):
                await producer.produce_batch(payloads[i : i + 10_000])

    asyncio.run(go())


def reset_cluster(cluster: LocalRedisCluster) -> None:
    for node in cluster.master_nodes():
        with node.client() as r:
            r.flushall()


@contextlib.contextmanager
def replica_of(url: str, config: dict[str, str]) -> Iterator[None]:
    """A replica of the single Redis at `url`, in sync, for as long as the block runs."""
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    replica = RedisServer(
        WORK / "redis-replica", config={**config, "replicaof": f"127.0.0.1 {port}"}
    )
    replica.start()
    try:
        wait_in_sync(url, 1)
        yield
    finally:
        replica.stop()


def wait_in_sync(url: str, replicas: int, timeout: float = 60.0) -> None:
    """Until `replicas` replicas of the Redis at `url` are online and caught up with it."""
    deadline = time.monotonic() + timeout
    with redis.Redis.from_url(url) as r:
        while time.monotonic() < deadline:
            info = r.info("replication")
            offset = info.get("master_repl_offset", 0)
            online = [
                v
                for k, v in info.items()
                if k.startswith("slave") and isinstance(v, dict) and v.get("state") == "online"
            ]
            if len(online) >= replicas and all(v.get("offset") == offset for v in online):
                return
            time.sleep(0.05)
    raise SystemExit(f"the single Redis's replica did not get in sync within {timeout:g} s")


def drain(lab: Lab, n: int, url: str, cluster: bool, replicas: int = 0) -> float:
    lab.reset()
    if replicas:
        wait_in_sync(url, replicas)  # the reset's FLUSHALL has reached the replica
    shards = SHARDS if cluster else 1
    keys = shard_keys("events", shards)
    fill(url, n, shards)
    proc = serve(lab, f"drain-{cluster}", url, STREAMD_SHARDS=str(shards))
    try:
        with client_of(url, cluster) as r:
            while done_reading(r, keys)[0] == 0:
                if proc.poll() is not None:
                    raise SystemExit(f"serve exited early; see {lab.logs}")
                time.sleep(0.005)
            first = time.perf_counter()
            while True:
                read, pending = done_reading(r, keys)
                if read >= n and pending == 0:
                    break
                time.sleep(0.02)
            seconds = time.perf_counter() - first
    finally:
        stop(proc)
    total, distinct = asyncio.run(_count(lab.dsn))
    if total != n or distinct != n:
        raise SystemExit(f"drain: {total} rows ({distinct} distinct), expected {n}")
    return n / seconds


@dataclass
class Paced:
    """What a paced producer did: events sent, over how long, and how far it fell behind."""

    sent: int
    seconds: float  # from the start to the last reply
    max_behind_ms: float  # the most it ever ran behind its schedule

    @property
    def rate(self) -> float:
        return self.sent / self.seconds if self.seconds else 0.0


async def paced(url: str, rate: float, seconds: float, run: str) -> Paced:
    """rate events/s over the shards for `seconds`, each carrying its send time: every 10 ms,
    what the schedule says is due, through streamd's Producer (one hiredis-packed script call
    per shard, over redis-py's RedisCluster): redis-py's cluster pipeline costs ~40 us of
    Python per XADD, which on a busy box kept it under 10,000/s. Events are stamped when they
    are sent, so a producer that falls behind would flatter the latency: how far it did is
    returned, with the rate it achieved."""
    sent = 0
    behind = 0.0
    async with Producer(url, stream="events", max_backlog=None, shards=SHARDS) as producer:
        started = time.perf_counter()
        while (now := time.perf_counter() - started) < seconds:
            due = int(now * rate) - sent
            if due > 0:
                behind = max(behind, due / rate)
                sent_us = time.time_ns() // 1000
                events = [
                    ("t", {"run": run, "seq": i, "sent_us": sent_us})
                    for i in range(sent, sent + due)
                ]
                # One call per shard (the Producer takes them in turn), all at once.
                calls = min(SHARDS, due)
                await asyncio.gather(
                    *(producer.produce_batch(events[j::calls]) for j in range(calls))
                )
                sent += due
            await asyncio.sleep(0.01)
        elapsed = time.perf_counter() - started
    # One tick's events are due over the tick before it: behind counts from the oldest.
    return Paced(sent, elapsed, behind * 1000)


def groups_ready(url: str) -> None:
    with redis.RedisCluster.from_url(url) as r:
        for key in shard_keys("events", SHARDS):
            with contextlib.suppress(redis.ResponseError):  # made by an earlier run
                r.xgroup_create(key, "streamd", id="0", mkstream=True)


def sustained(lab: Lab, url: str, rate: int, duration: float) -> tuple[float, float, Paced]:
    lab.reset()
    groups_ready(url)
    proc = serve(lab, "sustained", url, STREAMD_SHARDS=str(SHARDS))
    try:
        time.sleep(3)  # consumers connected and blocking

        async def go() -> tuple[Paced, tuple[float, float]]:
            produced = await paced(url, rate, duration, "sustained")
            return produced, await latency(lab.dsn, "sustained", produced.sent)

        produced, (p50, p99) = asyncio.run(go())
    finally:
        stop(proc)
    return p50, p99, produced


def takeover(lab: Lab, url: str, rate: int, ttl_s: float) -> tuple[int, float, float, float, int]:
    """Two serves (instance ids bench-a, bench-b), bench-b SIGKILLed mid-run while Postgres
    holds every batch for LOCK_S: how many entries it held, and their p99 and max end-to-end
    (send -> commit by the survivor; LOCK_S of it is the lock's)."""
    lab.reset()
    groups_ready(url)
    env = {
        "STREAMD_SHARDS": str(SHARDS),
        "STREAMD_LIVENESS_TTL_S": str(ttl_s),
        "STREAMD_REAPER_INTERVAL_S": "0.5",
        "STREAMD_PROCS": "1",
    }
    survivor = serve(
        lab,
        "takeover-a",
        url,
        STREAMD_STATE_DIR=str(WORK / "state-a"),
        STREAMD_INSTANCE_ID="bench-a",
        **env,
    )
    victim = serve(
        lab,
        "takeover-b",
        url,
        STREAMD_STATE_DIR=str(WORK / "state-b"),
        STREAMD_INSTANCE_ID="bench-b",
        **env,
    )
    try:
        for tag, proc in (("takeover-a", survivor), ("takeover-b", victim)):
            _wait_started(lab, tag, proc)

        async def go() -> tuple[int, list[tuple[str, str]]]:
            producing = asyncio.create_task(paced(url, rate, 8.0, "takeover"))
            await asyncio.sleep(3.0)
            # Every consumer waits in COPY for LOCK_S, holding its batch: the victim dies holding
            # entries, as a serve killed mid-write does.
            lock = await asyncpg.connect(lab.dsn)
            try:
                async with lock.transaction():
                    await lock.execute("LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
                    await asyncio.sleep(LOCK_S)
                    _kill_tree(victim.pid)
                    killed_at = time.perf_counter()
                    held = await asyncio.to_thread(_held_by, url, "bench-b:")
            finally:
                await lock.close()
            # Polling Redis: there is no event to await.
            while held and await asyncio.to_thread(_held_by, url, "bench-b:"):  # noqa: ASYNC110
                await asyncio.sleep(0.05)
            taken_over_s.append(time.perf_counter() - killed_at if held else 0.0)
            sent = (await producing).sent
            await latency(lab.dsn, "takeover", sent, timeout_s=120)
            # Until the survivor has taken over what was held (polling Redis: no event to await).
            with client_of(url, True) as r:
                while done_reading(r, shard_keys("events", SHARDS))[1]:  # noqa: ASYNC110
                    await asyncio.sleep(0.1)
            return sent, held

        taken_over_s: list[float] = []
        sent, held = asyncio.run(go())
        p99, worst = asyncio.run(_latency_of(lab.dsn, held))
    finally:
        stop(survivor)
        if victim.poll() is None:
            os.killpg(victim.pid, signal.SIGKILL)
    return len(held), taken_over_s[0], p99, worst, sent


def _wait_started(lab: Lab, tag: str, proc: subprocess.Popen[bytes]) -> None:
    """Until the serve's worker logs worker_started (its consumers are reading)."""
    log = lab.logs / f"cluster-{tag}.log"
    while b'"worker_started"' not in log.read_bytes():
        if proc.poll() is not None:
            raise SystemExit(f"serve {tag} exited early; see {log}")
        time.sleep(0.05)
    time.sleep(1.0)


def _kill_tree(pid: int) -> None:
    """SIGKILL a serve and its workers at once (killing the supervisor alone lets its workers
    drain: they exit cleanly when their parent dies)."""
    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    for proc in reversed(procs):
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(signal.SIGKILL)


def _held_by(url: str, prefix: str) -> list[tuple[str, str]]:
    """(stream, entry ID) of the entries pending under consumers whose name starts with prefix."""
    out: list[tuple[str, str]] = []
    with redis.RedisCluster.from_url(url) as r:
        for key in shard_keys("events", SHARDS):
            for row in r.xpending_range(key, "streamd", min="-", max="+", count=100_000):
                name = row["consumer"]
                name = name.decode() if isinstance(name, bytes) else str(name)
                if name.startswith(prefix):
                    entry = row["message_id"]
                    out.append((key, entry.decode() if isinstance(entry, bytes) else str(entry)))
    return out


async def _latency_of(dsn: str, keys: list[tuple[str, str]]) -> tuple[float, float]:
    """p99 and max end-to-end (ms) of these rows; 0 when there are none."""
    if not keys:
        return 0.0, 0.0
    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow(
            """SELECT percentile_cont(0.99) WITHIN GROUP (ORDER BY ms), max(ms) FROM (
                 SELECT extract(epoch FROM pg_xact_commit_timestamp(e.xmin)) * 1000
                   - (e.payload->>'sent_us')::bigint / 1000.0 AS ms
                 FROM events e JOIN unnest($1::text[], $2::text[]) AS k(s, id)
                   ON e.stream = k.s AND e.entry_id = k.id) t""",
            [k[0] for k in keys],
            [k[1] for k in keys],
        )
        return float(row[0]), float(row[1])
    finally:
        await conn.close()


async def _count(dsn: str) -> tuple[int, int]:
    """Rows, and distinct (stream, entry_id): shards may share an entry ID."""
    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow("SELECT count(*), count(DISTINCT (stream, entry_id)) FROM events")
        return int(row[0]), int(row[1])
    finally:
        await conn.close()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=500_000)
    parser.add_argument("--rate", type=int, default=10_000)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--takeover-rate", type=int, default=2_000)
    parser.add_argument("--ttl", type=float, default=5.0)
    parser.add_argument("--quick", action="store_true", help="100,000 events, 10 s")
    parser.add_argument("--only", choices=("drain", "sustained", "takeover"))
    parser.add_argument(
        "--redis-aof", action="store_true", help="appendonly yes on the single Redis and every node"
    )
    parser.add_argument(
        "--no-single-replica",
        dest="single_replica",
        action="store_false",
        help="drain the single Redis alone only, and take the ratio against that",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.events, args.duration = 100_000, 10.0
    rows: list[tuple[str, str]] = []
    # The same persistence on both sides: the single Redis keeps Redis' default (no AOF), and
    # so do the nodes unless --redis-aof (an AOF logs every delivery, as an XCLAIM per entry,
    # on each of the six nodes: about as much CPU again as the reads themselves).
    aof = {"appendonly": "yes" if args.redis_aof else "no"}
    with (
        Lab.open(None, None, aof=args.redis_aof) as lab,
        LocalRedisCluster(WORK / "cluster", config=aof) as cluster,
    ):
        if args.only in (None, "drain"):
            say(f"drain: {args.events} events, single Redis then cluster ({SHARDS} shards)")
            alone = drain(lab, args.events, lab.redis_url, cluster=False)
            rows.append(("drain, single Redis alone (1 stream)", f"{alone:,.0f} events/s"))
            single = alone
            if args.single_replica:
                with replica_of(lab.redis_url, aof):
                    single = drain(lab, args.events, lab.redis_url, cluster=False, replicas=1)
                rows.append(("drain, single Redis + 1 replica", f"{single:,.0f} events/s"))
            reset_cluster(cluster)
            clustered = drain(lab, args.events, cluster.url, cluster=True)
            rows.append((f"drain, cluster ({SHARDS} shards)", f"{clustered:,.0f} events/s"))
            if args.single_replica:
                rows.append(("drain ratio cluster/single alone", f"{clustered / alone:.2f}x"))
                rows.append(
                    ("drain ratio cluster/single + replica (>= 0.8)", f"{clustered / single:.2f}x")
                )
            else:
                rows.append(("drain ratio cluster/single (>= 0.8)", f"{clustered / single:.2f}x"))
        if args.only in (None, "sustained"):
            reset_cluster(cluster)
            say(f"sustained: {args.rate} events/s for {args.duration:g} s on the cluster")
            p50, p99, produced = sustained(lab, cluster.url, args.rate, args.duration)
            rows.append(
                (
                    f"sustained {args.rate}/s: producer sent",
                    f"{produced.sent} events, {produced.rate:,.0f}/s, "
                    f"at most {produced.max_behind_ms:.0f} ms behind schedule",
                )
            )
            rows.append((f"sustained {args.rate}/s: p50", f"{p50:.1f} ms"))
            rows.append((f"sustained {args.rate}/s: p99 (<= 100 ms)", f"{p99:.1f} ms"))
        if args.only in (None, "takeover"):
            reset_cluster(cluster)
            say(f"takeover: two serves at {args.takeover_rate}/s, one SIGKILLed")
            held, after_s, p99, worst, sent = takeover(
                lab, cluster.url, args.takeover_rate, args.ttl
            )
            bound = args.ttl + 2
            rows.append((f"takeover: entries the killed serve held (of {sent})", f"{held}"))
            rows.append(("takeover: all taken over, after the kill", f"{after_s:.1f} s"))
            rows.append((f"takeover: their p99 (<= {bound:g} s)", f"{p99:.0f} ms"))
            rows.append(("takeover: their max", f"{worst:.0f} ms"))
        for name, value in rows:
            say(f"  {name}: {value}")
    width = max(len(r[0]) for r in rows)
    print("\n".join(f"{name.ljust(width)}  {value}" for name, value in rows))


if __name__ == "__main__":
    main()
