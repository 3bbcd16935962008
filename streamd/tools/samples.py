"""Sample events of five types (user_created, order_placed, ...), and a rate-limited loop that
produces them.

Used by `streamd produce` and `streamd bench`. Payloads are realistic (~125 bytes of JSON) and
varied, but drawn from a pool built once: generating random values per event would cost more
than producing it, and a load generator must not be the bottleneck it measures.
"""

from __future__ import annotations

import asyncio
import random
import string
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

from streamd.backends.faults import REDIS_FAULTS
from streamd.backends.preflight import redis_error
from streamd.client.producer import PartialBatch, Producer, ProducerError
from streamd.config.settings import Settings
from streamd.errors import ConfigError

EVENT_TYPES = (
    "user_created",
    "order_placed",
    "payment_processed",
    "product_viewed",
    "order_shipped",
)

_NAMES = ("Ada Lovelace", "Alan Turing", "Grace Hopper", "Edsger Dijkstra", "Barbara Liskov")
_COUNTRIES = ("US", "GB", "DE", "FR", "IN", "BR", "JP")
_CURRENCIES = ("USD", "EUR", "GBP")
_CATEGORIES = ("electronics", "books", "garden", "toys", "apparel")
_CARRIERS = ("UPS", "DHL", "FedEx", "USPS")


def _token(rng: random.Random, n: int) -> str:
    return "".join(rng.choices(string.hexdigits[:16].upper(), k=n))


def make_event(event_type: str, rng: random.Random) -> dict[str, Any]:
    """One realistic payload of the given type."""
    user_id = rng.randint(1, 999_999)
    order_id = f"ORD-{_token(rng, 8)}"
    amount = round(rng.uniform(5, 500), 2)
    if event_type == "user_created":
        return {
            "user_id": user_id,
            "email": f"user{user_id}@example.com",
            "name": rng.choice(_NAMES),
            "plan": rng.choice(("free", "pro", "team")),
            "country": rng.choice(_COUNTRIES),
        }
    if event_type == "order_placed":
        return {
            "order_id": order_id,
            "user_id": user_id,
            "amount": amount,
            "currency": rng.choice(_CURRENCIES),
            "items": rng.randint(1, 9),
            "channel": rng.choice(("web", "mobile", "store")),
        }
    if event_type == "payment_processed":
        return {
            "txn_id": f"TXN-{_token(rng, 10)}",
            "order_id": order_id,
            "amount": amount,
            "currency": rng.choice(_CURRENCIES),
            "method": rng.choice(("card", "paypal", "bank_transfer")),
            "status": "succeeded",
        }
    if event_type == "product_viewed":
        return {
            "product_id": f"SKU-{rng.randint(10000, 99999)}",
            "user_id": user_id,
            "category": rng.choice(_CATEGORIES),
            "price": amount,
            "referrer": rng.choice(("search", "email", "direct", "ads")),
            "session": _token(rng, 8).lower(),
        }
    if event_type == "order_shipped":
        return {
            "order_id": order_id,
            "carrier": rng.choice(_CARRIERS),
            "tracking": f"1Z{_token(rng, 16)}",
            "warehouse": f"{rng.choice(('FRA', 'DUB', 'IAD', 'SFO'))}-{rng.randint(1, 9)}",
            "items": rng.randint(1, 9),
        }
    raise ValueError(f"unknown sample event type {event_type!r}; one of {', '.join(EVENT_TYPES)}")


class SampleEvents:
    """A pool of sample events to draw from, cycling; one type or all five, evenly mixed."""

    def __init__(
        self, event_type: str | None = None, seed: int | None = None, pool_size: int = 1000
    ) -> None:
        rng = random.Random(seed)
        types = [event_type] if event_type else list(EVENT_TYPES)
        self.pool: list[tuple[str, dict[str, Any]]] = [
            (t, make_event(t, rng)) for _ in range(pool_size // len(types) or 1) for t in types
        ]
        rng.shuffle(self.pool)
        self._next = 0

    def batch(self, n: int) -> list[tuple[str, dict[str, Any]]]:
        start = self._next
        self._next = (start + n) % len(self.pool)
        pool = self.pool
        return [pool[(start + i) % len(pool)] for i in range(n)]

    def tagged_batch(self, n: int, run: str, first_seq: int) -> list[tuple[str, dict[str, Any]]]:
        """Events whose payloads also carry the run id, a sequence number and the send time (µs),
        so a benchmark can find them in Postgres and measure exactly-once and latency."""
        start = self._next
        self._next = (start + n) % len(self.pool)
        sent_us = time.time_ns() // 1000
        pool = self.pool
        size = len(pool)
        out: list[tuple[str, dict[str, Any]]] = []
        for i in range(n):
            event_type, data = pool[(start + i) % size]
            tags = {"bench_run": run, "sent_us": sent_us, "seq": first_seq + i}
            out.append((event_type, data | tags))
        return out


# ---------------------------------------------------------------------------------------------
# the produce loop


@dataclass(slots=True)
class ProduceResult:
    produced: int
    elapsed_s: float
    first_id: str | None
    last_id: str | None

    @property
    def rate(self) -> float:
        return self.produced / self.elapsed_s if self.elapsed_s > 0 else 0.0


BatchMaker = Callable[[int, int], list[tuple[str, Any]]]  # (count, first seq) -> events


def progress_step(total: int) -> int:
    """Print progress every 1000 events, or rarer for big runs (~10 lines/s)."""
    step = 1000
    while total // step > 100:
        step *= 10
    return step


async def produce_paced(
    producer: Producer,
    total: int,
    make_batch: BatchMaker,
    *,
    rate: float | None,
    batch_size: int,
    on_progress: Callable[[int], None] | None = None,
    progress_every: int = 1000,
) -> ProduceResult:
    """Produce `total` events, at most `rate` per second (None: as fast as possible).

    Event i is due at (i + 1) / rate seconds after the start, so the run takes total / rate
    seconds and the achieved rate is measured against that schedule, not against sleep accuracy.
    Events that are due go out together, up to batch_size per round trip.
    """
    sent = 0
    first_id: str | None = None
    last_id: str | None = None
    next_report = progress_every
    started = time.perf_counter()
    while sent < total:
        if rate is None:
            count = min(batch_size, total - sent)
        else:
            count = await _wait_until_due(started, sent, rate, batch_size, total)
        try:
            ids = await producer.produce_batch(make_batch(count, sent))
        except PartialBatch as exc:  # some chunks of this call were written, then a refusal
            raise ProducerError(_stopped(sent + len(exc.written_ids), total, exc)) from None
        except ProducerError as exc:  # Redis refused the call (maxmemory, ...): earlier ones stand
            raise ProducerError(_stopped(sent, total, exc)) from None
        except REDIS_FAULTS as exc:
            # The connection failed mid-call: this call's events may or may not be there.
            error = redis_error(producer.settings, exc, "produce")
            raise type(error)(
                f"{sent} of {total} events written (and maybe the {count} in flight), then: {error}"
            ) from None
        sent += len(ids)
        first_id = first_id or ids[0]
        last_id = ids[-1]
        while on_progress is not None and sent >= next_report:
            on_progress(next_report)
            next_report += progress_every
    return ProduceResult(sent, time.perf_counter() - started, first_id, last_id)


def _stopped(written: int, total: int, exc: Exception) -> str:
    return f"{written} of {total} events written, then: {exc}"


async def _wait_until_due(
    started: float, sent: int, rate: float, batch_size: int, total: int
) -> int:
    """Sleep until at least one event is due; return how many are due (capped)."""
    min_tick_s = 0.005  # gather events into round trips: at most 200 wake-ups a second
    while True:
        elapsed = time.perf_counter() - started
        due = min(total, int(elapsed * rate)) - sent
        if due > 0:
            return min(due, batch_size)
        next_due = (sent + 1) / rate
        await asyncio.sleep(max(next_due - elapsed, min_tick_s if sent else 0.0))


# ---------------------------------------------------------------------------------------------
# `streamd produce`


async def produce_samples(
    settings: Settings,
    total: int,
    *,
    rate: float | None,
    batch_size: int,
    event_type: str | None,
    out: TextIO | None = None,
) -> ProduceResult:
    """Produce `total` sample events with progress lines and a summary, worded as the original
    pipeline's producer printed them."""
    out = out or sys.stdout
    if event_type is not None and event_type not in EVENT_TYPES:
        names = ", ".join(EVENT_TYPES)
        raise ConfigError(f"--type {event_type!r}: not a sample type; one of {names}")
    samples = SampleEvents(event_type)
    pace = f" at {rate:g} events/sec" if rate else ""
    print(f"Producing {total} events to stream {settings.stream!r}{pace}...", file=out, flush=True)

    def progress(n: int) -> None:
        print(f"Produced {n} events...", file=out, flush=True)

    try:
        async with Producer.from_settings(settings) as producer:
            result = await produce_paced(
                producer,
                total,
                lambda count, _seq: samples.batch(count),
                rate=rate,
                batch_size=batch_size,
                on_progress=progress,
                progress_every=progress_step(total),
            )
    except REDIS_FAULTS as exc:
        raise redis_error(settings, exc, "produce") from None
    print(
        f"Completed: {result.produced} total events produced in {result.elapsed_s:.2f} seconds "
        f"({result.rate:,.0f} events/sec)",
        file=out,
        flush=True,
    )
    return result
