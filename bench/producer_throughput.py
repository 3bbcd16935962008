"""Producer throughput: events/s that one process writes with produce_batch.

    uv run python bench/producer_throughput.py --redis-url redis://127.0.0.1:6379/0 \
        --events 1000000 --batch 1000 --concurrency 1

Writes to a scratch stream (deleted before and after), with a realistic ~125-byte payload that is
encoded and validated inside the timed loop, as an application would.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import uvloop

from streamd.client.producer import Producer
from streamd.tools.samples import SampleEvents


async def run(url: str, events: int, batch: int, concurrency: int) -> float:
    stream = f"bench:producer:{time.time_ns()}"
    samples = SampleEvents(seed=1)
    async with Producer(url, stream=stream, group=None) as producer:
        await producer.client.delete(stream)
        per_task = events // concurrency // batch

        async def worker() -> None:
            for _ in range(per_task):
                await producer.produce_batch(samples.batch(batch))

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
        written = await producer.client.xlen(stream)
        await producer.client.delete(stream)
    rate = written / elapsed
    print(
        f"batch={batch} concurrency={concurrency}: {written} events in {elapsed:.2f}s "
        f"= {rate:,.0f} events/s"
    )
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=1, help="produce_batch calls in flight")
    parser.add_argument("--repeat", type=int, default=3, help="runs; the median is reported")
    args = parser.parse_args()
    rates = sorted(
        uvloop.run(run(args.redis_url, args.events, args.batch, args.concurrency))
        for _ in range(args.repeat)
    )
    print(f"median: {rates[len(rates) // 2]:,.0f} events/s")


if __name__ == "__main__":
    main()
