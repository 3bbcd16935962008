"""Load for fault tests: a producer at a fixed rate that survives Redis outages without writing an
event twice, and the exactly-once check that compares what it produced with what Postgres holds.

Why explicit entry IDs. A producer that XADDs with `*` cannot retry safely: when Redis applied an
XADD but the reply was lost (connection cut, timeout, Redis killed after its AOF write), a retry
adds the same event again under a new ID, and the check would blame streamd for a duplicate the
producer made. So the producer picks each ID itself (`<ms>-<seq>`, increasing) and sends a batch
as one MULTI/EXEC, which Redis applies (and logs to its AOF) all or nothing. A retry of a batch
that was applied gets "ID ... equal or smaller than the target stream top item" for its entries:
that error *is* the confirmation. The stream's last ID survives trimming and (with AOF and
appendfsync always) restarts, so the answer is reliable. Each payload also carries a unique key,
and the check counts rows per key too: a duplicate under another ID would show there.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import redis

from tests.support.helpers import pg_fetch, pg_fetchval

_ALREADY_THERE = "equal or smaller than the target stream top item"
SEND_DEADLINE_S = 120.0  # one batch may wait this long for Redis to come back, then we fail


class ProducerFailed(AssertionError):
    pass


class Producer(threading.Thread):
    """XADDs `rate` events per second in batches, until stop(); `ids` and `keys` hold what Redis
    confirmed. Survives Redis restarts, kills and stalls by retrying the same batch."""

    def __init__(
        self,
        url: str,
        *,
        rate: float = 500.0,
        batch: int = 10,
        stream: str = "events",
        run_id: str = "",
        cluster: bool = False,
    ) -> None:
        super().__init__(daemon=True, name="producer")
        self.url, self.rate, self.batch_size, self.stream = url, rate, batch, stream
        self.cluster = cluster  # a Redis Cluster: MULTI/EXEC on the stream's slot's master
        self.run_id = run_id or f"{time.time_ns():x}"
        self.ids: list[str] = []
        self.keys: list[str] = []
        self.retries = 0  # sends that failed (Redis down, cut, stalled) and were retried
        self.confirmed_late = 0  # batches a lost reply had applied: confirmed by the retry
        self.error: BaseException | None = None
        self._stopping = threading.Event()  # not _stop: Thread has a _stop()
        self._last = (0, -1)
        self._n = itertools.count()

    # --- control ---------------------------------------------------------------------------

    def stop(self, timeout: float = SEND_DEADLINE_S + 10) -> None:
        """Stop after the batch in hand is confirmed; raise if the producer failed."""
        self._stopping.set()
        self.join(timeout)
        if self.is_alive():
            raise ProducerFailed(f"producer still sending after {timeout:g} s")
        if self.error is not None:
            raise ProducerFailed(f"producer failed: {self.error!r}") from self.error

    @property
    def produced(self) -> int:
        return len(self.ids)

    # --- the thread --------------------------------------------------------------------------

    def run(self) -> None:
        client = sync_client(self.url, self.cluster)
        interval = self.batch_size / self.rate
        next_at = time.monotonic()
        try:
            while not self._stopping.is_set():
                batch = self._next_batch()
                self._send(client, batch)
                self.ids += [entry_id for entry_id, _, _ in batch]
                self.keys += [key for _, key, _ in batch]
                next_at = max(next_at + interval, time.monotonic() - 1.0)  # no burst after a stall
                self._stopping.wait(max(0.0, next_at - time.monotonic()))
        except BaseException as exc:
            self.error = exc
        finally:
            client.close()

    def _next_id(self) -> str:
        ms, seq = self._last
        now = time.time_ns() // 1_000_000
        self._last = (now, 0) if now > ms else (ms, seq + 1)  # never backwards, even if the clock
        return f"{self._last[0]}-{self._last[1]}"

    def _next_batch(self) -> list[tuple[str, str, dict[str, bytes]]]:
        out = []
        for _ in range(self.batch_size):
            n = next(self._n)
            key = f"{self.run_id}-{n}"
            payload = {"k": key, "n": n, "note": "chaos"}
            fields = {"type": "chaos_event", "data": orjson.dumps(payload)}
            out.append((self._next_id(), key, fields))
        return out

    def _send(self, client: Any, batch: list[tuple[str, str, dict[str, bytes]]]) -> None:
        deadline = time.monotonic() + SEND_DEADLINE_S
        for attempt in itertools.count():
            try:
                pipe = client.pipeline(transaction=True)
                for entry_id, _, fields in batch:
                    pipe.xadd(self.stream, fields, id=entry_id)  # type: ignore[arg-type]
                results = pipe.execute(raise_on_error=False)
            except (
                redis.ConnectionError,
                redis.TimeoutError,
                redis.ResponseError,
                redis.exceptions.ClusterError,  # a master failing over, a slot moving
                redis.exceptions.RedisClusterException,
            ) as exc:
                # Down, cut, stalled, loading its AOF, or EXECABORT (a command refused while
                # queued, e.g. -LOADING): nothing or everything was applied; ask again.
                if time.monotonic() > deadline:
                    raise ProducerFailed(f"batch not confirmed in {SEND_DEADLINE_S:g} s") from exc
                self.retries += 1
                time.sleep(min(0.05 * 2 ** min(attempt, 4), 0.5))  # even when stopping
                continue
            self._check(results)
            return

    def _check(self, results: list[Any]) -> None:
        errors = [r for r in results if isinstance(r, Exception)]
        if not errors:
            return
        if len(errors) == len(results) and all(_ALREADY_THERE in str(e) for e in errors):
            self.confirmed_late += 1  # a previous attempt's EXEC was applied, its reply lost
            return
        raise ProducerFailed(f"partial batch: {errors[:3]!r}")  # MULTI/EXEC makes this a bug


@contextlib.contextmanager
def producing(url: str, **kwargs: Any) -> Iterator[Producer]:
    producer = Producer(url, **kwargs)
    producer.start()
    try:
        yield producer
    finally:
        if producer.is_alive():
            producer.stop()


# ---------------------------------------------------------------------------------------------
# the check


@dataclass
class Outcome:
    """Produced events compared with Postgres, by entry ID and by payload key."""

    produced: int
    rows: int
    lost: list[str] = field(default_factory=list)  # produced IDs with no row
    unexpected: list[str] = field(default_factory=list)  # rows whose ID was never produced
    duplicated: int = 0  # extra rows for one payload key
    dead_rows: int = 0  # dead_letter_queue rows
    dead_stream: int = 0  # entries in the dead stream
    pending: int = 0

    @property
    def exact(self) -> bool:
        return not (self.lost or self.unexpected or self.duplicated or self.dead_rows) and not (
            self.dead_stream or self.pending
        )

    def summary(self) -> str:
        return (
            f"produced={self.produced} rows={self.rows} lost={len(self.lost)} "
            f"duplicated={self.duplicated} unexpected={len(self.unexpected)} "
            f"dlq_rows={self.dead_rows} dlq_stream={self.dead_stream} pending={self.pending}"
            + (f" lost_e.g.={self.lost[:3]}" if self.lost else "")
        )


def outcome(
    dsn: str,
    url: str,
    producer: Producer,
    *,
    stream: str = "events",
    group: str = "streamd",
    events_table: str = "events",
    dlq_table: str = "dead_letter_queue",
    dead_stream: str | None = None,
) -> Outcome:
    rows = pg_fetch(
        dsn,
        f"SELECT entry_id, payload->>'k' AS k FROM \"{events_table}\" WHERE stream = $1",
        stream,
    )
    got = {r["entry_id"] for r in rows}
    produced = set(producer.ids)
    per_key = Counter(r["k"] for r in rows)
    with sync_client(url, producer.cluster) as r:
        dead_length = int(r.xlen(dead_stream or f"{stream}:dead"))
        try:
            pending = int(r.xpending(stream, group)["pending"])
        except redis.ResponseError:
            pending = 0  # no group: nothing was ever delivered
    return Outcome(
        produced=len(produced),
        rows=len(rows),
        lost=sorted(produced - got),
        unexpected=sorted(got - produced),
        duplicated=sum(n - 1 for n in per_key.values() if n > 1),
        dead_rows=int(pg_fetchval(dsn, f'SELECT count(*) FROM "{dlq_table}"')),
        dead_stream=dead_length,
        pending=pending,
    )


def sync_client(url: str, cluster: bool = False) -> Any:
    """A sync client of one Redis or of a cluster (redis-py's RedisCluster)."""
    if cluster:
        return redis.RedisCluster.from_url(url, socket_timeout=2, socket_connect_timeout=2)
    return redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)


def wait_for_outcome(
    dsn: str, url: str, producer: Producer, timeout: float = 60.0, **names: str
) -> Outcome:
    """Poll until Postgres holds every produced event and nothing is pending (or time is up);
    returns the last outcome either way: the caller asserts on it."""
    deadline = time.monotonic() + timeout
    while True:
        result = outcome(dsn, url, producer, **names)
        if (not result.lost and not result.pending) or time.monotonic() > deadline:
            return result
        time.sleep(0.2)
