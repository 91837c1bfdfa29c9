"""Hypercorn's keep-alive timer, as Atlas keeps it (``atlas.http_server.KeepAliveTimer``): a
deadline watched by the listener, not a task started per idle period. It must still close what
upstream's timer closed, and only that: a connection idle between requests, one that never
finished its request head, and every idle one as the server shuts down; never a connection
whose request is being answered."""

from __future__ import annotations

import socket
from functools import partial
from typing import Any

import pytest
import trio

import atlas.http_server
from atlas.config import Bind
from atlas.http_server import serve_asgi

KEEP_ALIVE = 0.5
SLOW_REPLY = 3 * KEEP_ALIVE


def keep_alive(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    configure = atlas.http_server.hypercorn_config

    def with_keep_alive(*args: Any, **kwargs: Any) -> Any:
        config = configure(*args, **kwargs)
        config.keep_alive_timeout = seconds
        return config

    monkeypatch.setattr(atlas.http_server, "hypercorn_config", with_keep_alive)


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    if scope["path"] == "/slow":
        await trio.sleep(SLOW_REPLY)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


async def closed_by_server(sock: trio.socket.SocketType, within: float) -> bool:
    """Whether the server ends the connection (EOF or reset) within ``within`` seconds; what it
    sent before (a reply) is read and dropped."""
    with trio.move_on_after(within):
        while True:
            try:
                data = await sock.recv(65536)
            except ConnectionResetError:
                return True
            if not data:
                return True
    return False


async def connected(port: int) -> trio.socket.SocketType:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    await sock.connect(("127.0.0.1", port))
    return sock


async def test_idle_half_sent_and_busy_connections(nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch) -> None:
    keep_alive(monkeypatch, KEEP_ALIVE)
    url = await nursery.start(partial(serve_asgi, app, Bind("127.0.0.1", 0)))
    port = int(url.rsplit(":", 1)[1])
    idle, half, busy = await connected(port), await connected(port), await connected(port)
    with idle, half, busy:
        await idle.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await half.send(b"GET / HTTP/1.1\r\nHo")  # and never the rest
        await busy.send(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        started = trio.current_time()
        assert await closed_by_server(idle, KEEP_ALIVE + 1.0)
        assert await closed_by_server(half, KEEP_ALIVE + 1.0)
        assert trio.current_time() - started >= KEEP_ALIVE * 0.9  # not before the timeout
        # The slow reply outlives the timeout: its connection is not idle, so it gets the reply
        # (and is closed once it has been idle for the timeout in turn).
        reply = b""
        with trio.fail_after(SLOW_REPLY + 2):
            while not reply.endswith(b"ok"):
                reply += await busy.recv(65536)
        assert reply.startswith(b"HTTP/1.1 200"), reply
        assert await closed_by_server(busy, KEEP_ALIVE + 1.0)


async def test_shutting_down_closes_idle_connections_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    keep_alive(monkeypatch, 30.0)  # far beyond what the test waits
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        url = await nursery.start(partial(serve_asgi, app, Bind("127.0.0.1", 0), shutdown_trigger=stop.wait))
        port = int(url.rsplit(":", 1)[1])
        with await connected(port) as idle:
            await idle.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            with trio.fail_after(2):
                assert (await idle.recv(65536)).startswith(b"HTTP/1.1 200")
            stop.set()
            assert await closed_by_server(idle, 1.0)


async def refuse_unread(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Answers 401 at once, without reading the request's body (as an auth check does)."""
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 401, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"no"})


async def test_a_reply_sent_before_the_body_was_read_keeps_the_connection(nursery: trio.Nursery) -> None:
    """Found by this suite (a 401 for a wrong agent secret): a reply written without a turn for
    the connection's reading task (the direct write) ended before Hypercorn had read the request
    body the client had sent with its head, so Hypercorn closed the connection, without
    ``Connection: close``, and the client's next request on it failed. Only WebSocket frames are
    written directly."""
    url = await nursery.start(partial(serve_asgi, refuse_unread, Bind("127.0.0.1", 0)))
    port = int(url.rsplit(":", 1)[1])
    with await connected(port) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for attempt in range(20):
            # Head and body in two writes, as httpx sends them: two reads on the server.
            await sock.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\n")
            await sock.send(b'{"input":1}')
            reply = b""
            with trio.fail_after(2):
                while not reply.endswith(b"no"):
                    data = await sock.recv(65536)
                    assert data, f"the server closed the connection after {attempt} replies"
                    reply += data
            assert reply.startswith(b"HTTP/1.1 401"), reply
