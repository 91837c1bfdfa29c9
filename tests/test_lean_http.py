"""atlas.llm.lean_http against real sockets: a scripted HTTP/1.1 server on 127.0.0.1:0 (and TLS)."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial

import httpx
import pytest
import trio
import trustme
from servers import free_port

from atlas.llm.lean_http import LeanTransport

Handler = Callable[[trio.abc.Stream, bytes], Awaitable[bool]]  # returns: keep the connection?


@dataclass
class ScriptedServer:
    port: int = 0
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)


async def read_request(stream: trio.abc.Stream, buffer: bytearray) -> bytes | None:
    while b"\r\n\r\n" not in buffer:
        data = await stream.receive_some(65536)
        if not data:
            return None
        buffer += data
    head, _, rest = bytes(buffer).partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(rest) < length:
        rest += await stream.receive_some(65536)
    buffer[:] = rest[length:]
    return head + b"\r\n\r\n" + rest[:length]


@asynccontextmanager
async def scripted_server(handler: Handler, *, tls: trustme.CA | None = None) -> AsyncIterator[ScriptedServer]:
    server = ScriptedServer()
    context = None
    if tls is not None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.issue_cert("localhost").configure_cert(context)

    async def serve_one(stream: trio.abc.Stream) -> None:
        if context is not None:
            stream = trio.SSLStream(stream, context, server_side=True)
        server.connections += 1
        buffer = bytearray()
        try:
            while (request := await read_request(stream, buffer)) is not None:
                server.requests.append(request)
                if not await handler(stream, request):
                    break
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, serve_one, 0, host="127.0.0.1"))
        server.port = listeners[0].socket.getsockname()[1]
        yield server
        nursery.cancel_scope.cancel()


def reply(raw: bytes, keep: bool = True) -> Handler:
    async def handler(stream: trio.abc.Stream, request: bytes) -> bool:
        await stream.send_all(raw)
        return keep

    return handler


async def fetch(transport: LeanTransport, url: str, **kwargs) -> tuple[httpx.Response, bytes]:
    request = httpx.Request("POST", url, content=b'{"x": 1}', **kwargs)
    response = await transport.handle_async_request(request)
    body = b"".join([chunk async for chunk in response.stream])
    await response.aclose()
    return response, body


CHUNKED = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    b"6;ext=1\r\ndata: \r\n5\r\nhello\r\n0\r\ntrailer: x\r\n\r\n"
)


async def test_chunked_body_and_connection_reuse():
    async with scripted_server(reply(CHUNKED)) as server, LeanTransport() as transport:
        url = f"http://127.0.0.1:{server.port}/v1/chat/completions?q=1"
        first, body = await fetch(transport, url, headers={"Authorization": "Bearer k"})
        second, again = await fetch(transport, url)
    assert first.status_code == 200 and body == again == b"data: hello"
    assert first.headers["content-type"] == "text/event-stream"
    assert server.connections == 1 and len(server.requests) == 2
    assert server.requests[0].startswith(b"POST /v1/chat/completions?q=1 HTTP/1.1\r\n")
    assert b"\r\nAuthorization: Bearer k\r\n" in server.requests[0]
    assert server.requests[0].endswith(b'\r\n\r\n{"x": 1}')


async def test_content_length_and_close_delimited_bodies():
    sized = b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 5\r\n\r\nnope!"
    async with scripted_server(reply(sized)) as server, LeanTransport() as transport:
        url = f"http://127.0.0.1:{server.port}/"
        response, body = await fetch(transport, url)
        await fetch(transport, url)
    assert response.status_code == 401 and body == b"nope!" and server.connections == 1

    until_close = b"HTTP/1.0 200 OK\r\n\r\nall of it"
    async with scripted_server(reply(until_close, keep=False)) as server, LeanTransport() as transport:
        url = f"http://127.0.0.1:{server.port}/"
        _, body = await fetch(transport, url)
        _, again = await fetch(transport, url)
    assert body == again == b"all of it" and server.connections == 2


async def test_more_than_content_length_is_never_reused():
    async with scripted_server(reply(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokEXTRA")) as server, \
            LeanTransport() as transport:
        url = f"http://127.0.0.1:{server.port}/"
        _, body = await fetch(transport, url)
        await fetch(transport, url)
    assert body == b"ok" and server.connections == 2


async def test_a_stale_pooled_connection_is_retried_once_on_a_new_one():
    # The server answers, then closes the connection that the client has pooled.
    sized = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
    async with scripted_server(reply(sized, keep=False)) as server, LeanTransport() as transport:
        url = f"http://127.0.0.1:{server.port}/"
        for _ in range(3):
            response, body = await fetch(transport, url)
            assert response.status_code == 200 and body == b"ok"
    assert server.connections == 3 and len(server.requests) == 3


async def test_interim_responses_are_skipped():
    raw = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nyes"
    async with scripted_server(reply(raw)) as server, LeanTransport() as transport:
        response, body = await fetch(transport, f"http://127.0.0.1:{server.port}/")
    assert response.status_code == 200 and body == b"yes"


@pytest.mark.parametrize("raw", [b"garbage\r\n\r\n", b"HTTP/1.1 abc OK\r\n\r\n", b"SPDY/3 200 OK\r\n\r\n",
                                 b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n"])
async def test_malformed_responses_are_protocol_errors(raw):
    async with scripted_server(reply(raw)) as server, LeanTransport() as transport:
        with pytest.raises(httpx.RemoteProtocolError):
            await fetch(transport, f"http://127.0.0.1:{server.port}/")


async def test_a_header_with_a_line_break_is_refused_before_anything_is_sent():
    async with scripted_server(reply(CHUNKED)) as server, LeanTransport() as transport:
        with pytest.raises(httpx.LocalProtocolError):
            await fetch(transport, f"http://127.0.0.1:{server.port}/",
                        headers={"Authorization": "Bearer k\r\nX-Injected: 1"})
    assert server.connections == 0 and server.requests == []


async def test_connect_failure_and_read_timeout(autojump_clock):
    async with LeanTransport() as transport:
        with pytest.raises(httpx.ConnectError):  # nobody listens there
            await fetch(transport, f"http://127.0.0.1:{free_port()}/")

    async def never_answer(stream: trio.abc.Stream, request: bytes) -> bool:
        await trio.sleep_forever()
        return False

    async with scripted_server(never_answer) as server, LeanTransport() as transport:
        with pytest.raises(httpx.ReadTimeout):
            await fetch(transport, f"http://127.0.0.1:{server.port}/",
                        extensions={"timeout": {"connect": 5, "read": 30, "write": 5, "pool": 5}})


async def test_tls_with_a_trusted_and_an_untrusted_certificate():
    ca = trustme.CA()
    async with scripted_server(reply(CHUNKED), tls=ca) as server:
        trusting = ssl.create_default_context()
        ca.configure_trust(trusting)
        async with LeanTransport(ssl_context=trusting) as transport:
            response, body = await fetch(transport, f"https://localhost:{server.port}/v1")
            assert response.status_code == 200 and body == b"data: hello"
        async with LeanTransport() as transport:  # the system trust store does not know this CA
            with pytest.raises(httpx.ConnectError):
                await fetch(transport, f"https://localhost:{server.port}/v1")
