"""A loopback TCP proxy for fault tests: put it between streamd and Redis or Postgres, then cut,
refuse or stall the traffic (after asyncpg's tests/test_adversity.py).

    with TcpProxy(redis.port) as proxy:   # streamd connects to proxy.port
        proxy.drop()                      # reset every open connection (a network cut)
        proxy.refuse()                    # ... and reset new ones too, until proxy.accept()
        proxy.stall()                     # stop forwarding, keep sockets open (a hung peer)
        proxy.resume()                    # forward again, including what was held

The proxy runs an asyncio loop in a daemon thread of its own, so tests (sync or async) drive it
with plain method calls. It listens on 127.0.0.1 only. `retarget(port)` follows a server that came
back on another port after a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self, TypeVar

T = TypeVar("T")
HOST = "127.0.0.1"
CHUNK = 65536
_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST, not FIN


@dataclass
class ProxyStats:
    accepted: int = 0
    refused: int = 0  # connections reset at once while refusing
    dropped: int = 0  # open connections reset by drop()
    upstream_failed: int = 0  # the server itself was unreachable


@dataclass(eq=False)
class _Link:
    """One proxied connection: the client's side and the server's side."""

    client: asyncio.StreamWriter
    server: asyncio.StreamWriter | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


def _reset(writer: asyncio.StreamWriter | None) -> None:
    """Close a connection with a TCP RST, as a cut network or a dead peer's kernel would."""
    if writer is None:
        return
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    writer.transport.abort()


class TcpProxy:
    def __init__(self, target_port: int, listen_port: int = 0) -> None:
        self.target_port = target_port
        self._listen_port = listen_port
        self.port = 0
        self.stats = ProxyStats()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="proxy")
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._flowing: asyncio.Event | None = None
        self._refusing = False

    # --- life cycle (called from the test's thread) ----------------------------------------

    def start(self) -> Self:
        self._thread.start()
        self._call(self._start)
        return self

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        with contextlib.suppress(Exception):
            self._call(self._close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- faults ----------------------------------------------------------------------------

    def drop(self) -> int:
        """Reset every open connection; returns how many there were. New ones are accepted."""
        return self._call(self._drop)

    def refuse(self) -> int:
        """Drop every open connection and reset every new one until accept()."""
        self._refusing = True
        return self.drop()

    def accept(self) -> None:
        self._refusing = False

    def stall(self) -> None:
        """Stop forwarding in both directions (bytes are held, not lost) and hold new connections
        before they reach the server: to every client the server looks hung."""
        self._call(self._set_flowing, False)

    def resume(self) -> None:
        """Forward again: held bytes are delivered, held connections proceed."""
        self._call(self._set_flowing, True)

    def retarget(self, target_port: int) -> None:
        """Send new connections to another port (the server restarted elsewhere)."""
        self.target_port = target_port

    @property
    def connections(self) -> int:
        return len(self._links)

    # --- the loop side ---------------------------------------------------------------------

    def _call(self, func: Callable[..., Awaitable[T]], *args: object) -> T:
        future = asyncio.run_coroutine_threadsafe(func(*args), self._loop)
        return future.result(timeout=10)

    async def _start(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server = await asyncio.start_server(
            self._handle, HOST, self._listen_port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._drop()
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)
        # Transports finish closing on a later turn of the loop: let them, before it stops
        # (else their sockets are only closed by the garbage collector, with a ResourceWarning).
        await asyncio.sleep(0.05)

    async def _drop(self) -> int:
        links = list(self._links)
        for link in links:
            _reset(link.client)
            _reset(link.server)
            for task in link.tasks:
                task.cancel()
        self._links.difference_update(links)
        self.stats.dropped += len(links)
        return len(links)

    async def _set_flowing(self, on: bool) -> None:
        assert self._flowing is not None
        if on:
            self._flowing.set()
        else:
            self._flowing.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._refusing:
            self.stats.refused += 1
            _reset(writer)
            return
        self.stats.accepted += 1
        link = _Link(writer)
        self._links.add(link)
        try:
            await self._run_link(link, reader)
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            if link in self._links:
                self._links.discard(link)
                writer.close()
                if link.server is not None:
                    link.server.close()

    async def _run_link(self, link: _Link, client_reader: asyncio.StreamReader) -> None:
        assert self._flowing is not None
        await self._flowing.wait()  # a stalled server does not even answer a new connection
        try:
            server_reader, link.server = await asyncio.open_connection(HOST, self.target_port)
        except OSError:
            self.stats.upstream_failed += 1
            _reset(link.client)
            return
        if link not in self._links:  # dropped while connecting
            _reset(link.server)
            return
        link.tasks = [
            asyncio.create_task(self._pump(client_reader, link.server), name="proxy-up"),
            asyncio.create_task(self._pump(server_reader, link.client), name="proxy-down"),
        ]
        # Either side closing ends the link: the other side is closed in _handle.
        await asyncio.wait(link.tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in link.tasks:
            task.cancel()

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        assert self._flowing is not None
        while True:
            await self._flowing.wait()
            data = await src.read(CHUNK)
            if not data:
                return
            await self._flowing.wait()  # stalled while this chunk was in flight: hold it
            dst.write(data)
            await dst.drain()
