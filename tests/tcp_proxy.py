"""A TCP forwarder between a client and a server, whose connections a test can kill, as a phone
losing its network does: ``cut()`` resets every connection through it (no WebSocket close frame,
no FIN: an RST), and the proxy keeps listening, so that the client's reconnect goes through.

    async with open_tcp_proxy(server_port) as proxy:
        proxy.url                   # http://127.0.0.1:PORT, for the client
        await proxy.wait_connections(1)
        await proxy.cut()
"""

from __future__ import annotations

import socket
import struct
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial

import trio


class TcpProxy:
    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.accepted = 0  # connections ever accepted
        self._live: dict[trio.CancelScope, tuple[trio.SocketStream, trio.SocketStream]] = {}
        self._changed = trio.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            await self._changed.wait()

    async def wait_connections(self, n: int) -> None:
        """Until ``n`` connections have been accepted since the proxy started."""
        await self.wait_until(lambda: self.accepted >= n)

    @property
    def live(self) -> int:
        return len(self._live)

    async def cut(self) -> int:
        """Reset every live connection, both ways; returns how many there were."""
        pairs = list(self._live.items())
        for scope, (client, server) in pairs:
            for stream in (client, server):
                # SO_LINGER 0: close() sends an RST, as a connection that died would.
                stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            scope.cancel()
        await self.wait_until(lambda: not any(scope in self._live for scope, _ in pairs))
        return len(pairs)

    async def handle(self, client: trio.SocketStream) -> None:
        self.accepted += 1
        try:
            server = await trio.open_tcp_stream("127.0.0.1", self.target_port)
        except OSError:
            await client.aclose()
            self._notify()
            return
        try:
            with trio.CancelScope() as scope:
                self._live[scope] = (client, server)
                self._notify()
                try:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._pump, client, server, nursery.cancel_scope)
                        nursery.start_soon(self._pump, server, client, nursery.cancel_scope)
                finally:
                    del self._live[scope]
        finally:  # also when the proxy itself is closed with connections still live
            for stream in (client, server):
                with trio.CancelScope(shield=True):
                    await stream.aclose()
            self._notify()

    @staticmethod
    async def _pump(source: trio.SocketStream, sink: trio.SocketStream, done: trio.CancelScope) -> None:
        try:
            while data := await source.receive_some(65536):
                await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        done.cancel()  # one side ended: so does the other


@asynccontextmanager
async def open_tcp_proxy(target_port: int) -> AsyncIterator[TcpProxy]:
    proxy = TcpProxy(target_port)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, proxy.handle, 0, host="127.0.0.1"))
        proxy.port = listeners[0].socket.getsockname()[1]
        try:
            yield proxy
        finally:
            nursery.cancel_scope.cancel()
