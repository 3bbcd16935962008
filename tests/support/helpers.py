"""Test helpers: wait for conditions, run the real `streamd` as a subprocess, look at Redis and
Postgres synchronously from assertions.

The Postgres helpers run asyncpg on a private event loop in a helper thread, so they work the same
from sync tests and from async tests (where they block the test's loop for a few milliseconds).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import inspect
import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

import asyncpg
import orjson
import redis

from streamd.dev.processes import descendants, wait_gone

T = TypeVar("T")


class WaitTimeout(AssertionError):
    """A condition did not become true in time."""


# ---------------------------------------------------------------------------------------------
# waiting


def wait_until(
    predicate: Callable[[], T],
    timeout: float = 10.0,
    interval: float = 0.02,
    message: str = "",
    ignore: tuple[type[BaseException], ...] = (),
) -> T:
    """Poll `predicate` until it returns a truthy value, and return that value.

    Exceptions of the types in `ignore` count as "not yet" (say, a table not created yet). On
    timeout raises WaitTimeout naming the predicate, `message`, and the last value or exception.
    """
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            last = predicate()
            if last:
                return last
        except ignore as exc:
            last = exc
        if time.monotonic() >= deadline:
            raise WaitTimeout(_timeout_text(predicate, timeout, message, last))
        time.sleep(interval)


async def async_wait_until(
    predicate: Callable[[], T | Awaitable[T]],
    timeout: float = 10.0,  # noqa: ASYNC109 - a polling deadline whose error names the condition
    interval: float = 0.02,
    message: str = "",
    ignore: tuple[type[BaseException], ...] = (),
) -> T:
    """wait_until for async tests: sleeps on the loop, so tasks on it keep running; the predicate
    may be a plain function or a coroutine function."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            value = predicate()
            last = await value if inspect.isawaitable(value) else value
            if last:
                return last
        except ignore as exc:
            last = exc
        if time.monotonic() >= deadline:
            raise WaitTimeout(_timeout_text(predicate, timeout, message, last))
        await asyncio.sleep(interval)


def _timeout_text(predicate: Callable[..., Any], timeout: float, message: str, last: Any) -> str:
    name = getattr(predicate, "__qualname__", repr(predicate))
    what = f"{message} " if message else ""
    return f"{what}(condition {name} still false after {timeout:g} s; last result: {last!r})"


# ---------------------------------------------------------------------------------------------
# Postgres (sync, via asyncpg on a helper thread)


def run_async(make: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine to completion on a fresh loop in a helper thread and return its result.

    A thread keeps it independent of any loop the caller (an async test) is running."""

    async def main() -> T:
        return await make()

    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="helpers") as pool:
        return pool.submit(lambda: asyncio.run(main())).result()


def with_pg(dsn: str, action: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
    """Connect, run `action(connection)`, close."""

    async def go() -> T:
        conn = await asyncpg.connect(dsn, timeout=10)
        try:
            return await action(conn)
        finally:
            await conn.close()

    return run_async(go)


def pg_fetch(dsn: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    return with_pg(dsn, lambda c: c.fetch(sql, *args))


def pg_fetchval(dsn: str, sql: str, *args: Any) -> Any:
    return with_pg(dsn, lambda c: c.fetchval(sql, *args))


def pg_execute(dsn: str, sql: str, *args: Any) -> str:
    return str(with_pg(dsn, lambda c: c.execute(sql, *args)))


def count_rows(dsn: str, table: str = "events", *, missing_ok: bool = False) -> int:
    """Rows in `table` (a plain identifier); 0 for a missing table if missing_ok."""
    if not table.replace("_", "").isalnum():
        raise ValueError(f"not a plain table name: {table!r}")
    try:
        return int(pg_fetchval(dsn, f'SELECT count(*) FROM "{table}"'))
    except asyncpg.UndefinedTableError:
        if missing_ok:
            return 0
        raise


def counts_by_type(dsn: str, table: str = "events") -> dict[str, int]:
    rows = pg_fetch(dsn, f'SELECT event_type, count(*) AS n FROM "{table}" GROUP BY 1')
    return {r["event_type"]: r["n"] for r in rows}


@contextlib.contextmanager
def table_locked(dsn: str, table: str = "events") -> Iterator[None]:
    """Hold an ACCESS EXCLUSIVE lock on `table` (from another session) inside the block: every
    consumer's COPY waits, holding its batch (pending, unacknowledged) until the lock goes."""
    if not table.replace("_", "").isalnum():
        raise ValueError(f"not a plain table name: {table!r}")
    locked, release = threading.Event(), threading.Event()

    async def hold() -> None:
        conn = await asyncpg.connect(dsn, timeout=10)
        try:
            async with conn.transaction():
                await conn.execute(f'LOCK TABLE "{table}" IN ACCESS EXCLUSIVE MODE')
                locked.set()
                await asyncio.to_thread(release.wait, 60)
        finally:
            await conn.close()

    thread = threading.Thread(target=lambda: asyncio.run(hold()), daemon=True)
    thread.start()
    assert locked.wait(10), "could not lock the table"
    try:
        yield
    finally:
        release.set()
        thread.join(10)


# ---------------------------------------------------------------------------------------------
# Redis (sync redis-py)


def redis_client(url: str) -> redis.Redis:
    """A sync client (bytes in, bytes out); use it as a context manager to close it."""
    return redis.Redis.from_url(url, socket_timeout=10)


def xlen(url: str, stream: str = "events") -> int:
    with redis_client(url) as r:
        return int(r.xlen(stream))


def xpending(url: str, stream: str = "events", group: str = "streamd") -> dict[str, Any]:
    """XPENDING's summary: {"pending": n, "min": id|None, "max": id|None, "consumers": {name: n}}.

    Raises redis.ResponseError (NOGROUP) when the group does not exist."""
    with redis_client(url) as r:
        summary = r.xpending(stream, group)
    consumers = {_text(c["name"]): int(c["pending"]) for c in summary.get("consumers") or []}
    return {
        "pending": int(summary["pending"]),
        "min": _text(summary["min"]) if summary["min"] else None,
        "max": _text(summary["max"]) if summary["max"] else None,
        "consumers": consumers,
    }


def pending_count(url: str, stream: str = "events", group: str = "streamd") -> int:
    return int(xpending(url, stream, group)["pending"])


def xadd(url: str, entries: Iterable[Mapping[Any, Any]], stream: str = "events") -> list[str]:
    """XADD each entry (a field -> value mapping) with a plain pipeline: a producer that is not
    streamd. Returns the entry IDs."""
    with redis_client(url) as r:
        pipe = r.pipeline(transaction=False)
        for fields in entries:
            pipe.xadd(stream, dict(fields))
        return [_text(i) for i in pipe.execute()]


def event(event_type: str, data: Any, **extra: Any) -> dict[str, Any]:
    """A well-formed envelope: {"type": ..., "data": <JSON text>, ...extra}."""
    return {"type": event_type, "data": orjson.dumps(data), **extra}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# ---------------------------------------------------------------------------------------------
# the real streamd, as a subprocess

_serial = itertools.count(1)


class StreamdProcess:
    """`python -m streamd <command> ARGS` in its own process group, stderr (JSON logs) and stdout
    captured to files under log_dir. close() (or the fixture's teardown) kills the whole group."""

    def __init__(
        self,
        env: Mapping[str, str],
        *args: str,
        log_dir: Path,
        command: tuple[str, ...] = (),
        cwd: Path | None = None,
        wrapper: tuple[str, ...] = (),
    ) -> None:
        n = next(_serial)
        label = command[0] if command else "streamd"
        self.log_path = log_dir / f"{label}-{n}.stderr.log"
        self.stdout_path = log_dir / f"{label}-{n}.stdout.log"
        # wrapper: a command that runs streamd (unshare ... for a host of its own)
        self.argv = [*wrapper, sys.executable, "-m", "streamd", *command, *args]
        log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as err, open(self.stdout_path, "wb") as out:
            self.proc = subprocess.Popen(
                self.argv,
                env=dict(env),
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,  # its own group: teardown can kill every child
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def poll(self) -> int | None:
        return self.proc.poll()

    def send_signal(self, sig: int, *, group: bool = False) -> None:
        """Signal the main process (or, with group=True, every process of the group)."""
        if group:
            os.killpg(self.proc.pid, sig)
        else:
            self.proc.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        """Wait for the process to exit by itself; its exit code."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise WaitTimeout(
                f"{self._name()} still running after {timeout:g} s; {self.tail()}"
            ) from None

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM, then wait for the exit code; on timeout kill the group and raise."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.wait(timeout)
        except WaitTimeout:
            self.close()
            raise

    def close(self) -> None:
        """Kill whatever is left of the process group and reap the main process. Idempotent."""
        if self.proc.returncode is None:
            kids = descendants(self.proc.pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
            wait_gone(kids, 5.0)  # its children notice the parent's death; else the killpg below
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)

    def output(self) -> str:
        """Everything written to stderr so far."""
        return self.log_path.read_bytes().decode("utf-8", "replace")

    def stdout(self) -> str:
        return self.stdout_path.read_bytes().decode("utf-8", "replace")

    def logs(self) -> list[dict[str, Any]]:
        """The JSON log lines so far, parsed (other lines, such as tracebacks, are skipped)."""
        out: list[dict[str, Any]] = []
        for line in self.log_path.read_bytes().splitlines():
            if line.startswith(b"{"):
                with contextlib.suppress(orjson.JSONDecodeError):
                    record = orjson.loads(line)
                    if isinstance(record, dict):
                        out.append(record)
        return out

    def events(self, name: str) -> list[dict[str, Any]]:
        """The parsed log lines whose "event" is `name`."""
        return [r for r in self.logs() if r.get("event") == name]

    def tail(self, lines: int = 30) -> str:
        kept = self.output().splitlines()[-lines:]
        return "stderr ends with:\n" + "\n".join(kept)

    def _name(self) -> str:
        return " ".join(self.argv[2:])

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class ServeProcess(StreamdProcess):
    """The real `streamd serve ARGS`."""

    def __init__(
        self,
        env: Mapping[str, str],
        *args: str,
        log_dir: Path,
        cwd: Path | None = None,
        wrapper: tuple[str, ...] = (),
    ) -> None:
        super().__init__(env, *args, log_dir=log_dir, command=("serve",), cwd=cwd, wrapper=wrapper)

    def wait_ready(self, n_workers: int = 1, timeout: float = 30.0) -> None:
        """Wait for n `worker_started` log lines (each worker logs one when its consumers read).

        Fails at once, with the log tail, if serve exits instead."""
        deadline = time.monotonic() + timeout
        while len(self.events("worker_started")) < n_workers:
            code = self.proc.poll()
            if code is not None:
                raise AssertionError(
                    f"streamd serve exited with {code} before ready; {self.tail()}"
                )
            if time.monotonic() >= deadline:
                raise WaitTimeout(
                    f"streamd serve: fewer than {n_workers} worker_started lines after "
                    f"{timeout:g} s; {self.tail()}"
                )
            time.sleep(0.02)
