"""atlas.llm.transport against real sockets: scripted HTTP/1.1 servers on 127.0.0.1:0, TLS, proxies.

Malformed responses are written byte for byte; every one must end as an httpx exception on a
connection the transport drops (the server counts connections, and sees the dropped one closed).
"""

from __future__ import annotations

import base64
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial

import httpx
import pytest
import trio
import trio.testing
import trustme

from atlas.config import ConfigError, load_settings
from atlas.llm.provider import open_provider_transport
from atlas.llm.transport import MAX_CHUNK, MAX_SSE_EVENT, ProviderTransport, proxy_for

# (stream, request, index of the request on its connection) -> keep the connection open?
Handler = Callable[[trio.abc.Stream, bytes, int], Awaitable[bool]]
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "REQUEST_METHOD",
                   "ATLAS_PROVIDER_PROXY")


@pytest.fixture(autouse=True)
def no_proxy_variables(monkeypatch):
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class ScriptedServer:
    port: int = 0
    connections: int = 0
    ended: int = 0  # connections the client closed
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
        index = 0
        try:
            while (request := await read_request(stream, buffer)) is not None:
                server.requests.append(request)
                if not await handler(stream, request, index):
                    return
                index += 1
            server.ended += 1
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            server.ended += 1
        finally:
            await trio.aclose_forcefully(stream)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, serve_one, 0, host="127.0.0.1"))
        server.port = listeners[0].socket.getsockname()[1]
        yield server
        nursery.cancel_scope.cancel()


def reply(*pieces: bytes, keep: bool = True) -> Handler:
    async def handler(stream: trio.abc.Stream, request: bytes, index: int) -> bool:
        for piece in pieces:
            await stream.send_all(piece)
        return keep

    return handler


async def fetch(transport: ProviderTransport, url: str, **kwargs) -> tuple[httpx.Response, bytes]:
    request = httpx.Request("POST", url, content=b'{"x": 1}', **kwargs)
    response = await transport.handle_async_request(request)
    try:
        body = b"".join([chunk async for chunk in response.stream])
    finally:
        await response.aclose()
    return response, body


CHUNKED = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    b"6;ext=1\r\ndata: \r\n5\r\nhello\r\n0\r\ntrailer: x\r\n\r\n"
)
OK = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"


# Ported from tests/test_lean_http.py.

async def test_chunked_body_with_an_extension_and_connection_reuse():
    async with scripted_server(reply(CHUNKED)) as server, ProviderTransport() as transport:
        url = f"http://127.0.0.1:{server.port}/v1/chat/completions?q=1"
        first, body = await fetch(transport, url, headers={"Authorization": "Bearer k"})
        _, again = await fetch(transport, url, headers={"Accept-Encoding": "gzip"})
    assert first.status_code == 200 and body == again == b"data: hello"
    assert first.headers["content-type"] == "text/event-stream"
    assert first.extensions["http_version"] == b"HTTP/1.1"
    assert server.connections == 1 and len(server.requests) == 2
    assert server.requests[0].startswith(b"POST /v1/chat/completions?q=1 HTTP/1.1\r\n")
    assert b"\r\nAuthorization: Bearer k\r\n" in server.requests[0]
    assert server.requests[0].endswith(b'\r\n\r\n{"x": 1}')
    for request in server.requests:  # asked for, and a caller's own asking replaced
        assert b"\r\nAccept-Encoding: identity\r\n" in request and b"gzip" not in request


async def test_content_length_and_close_delimited_bodies():
    sized = b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 5\r\n\r\nnope!"
    async with scripted_server(reply(sized)) as server, ProviderTransport() as transport:
        url = f"http://127.0.0.1:{server.port}/"
        response, body = await fetch(transport, url)
        await fetch(transport, url)
    assert response.status_code == 401 and body == b"nope!" and server.connections == 1

    until_close = b"HTTP/1.0 200 OK\r\n\r\nall of it"
    async with scripted_server(reply(until_close, keep=False)) as server, ProviderTransport() as transport:
        url = f"http://127.0.0.1:{server.port}/"
        _, body = await fetch(transport, url)
        _, again = await fetch(transport, url)
    assert body == again == b"all of it" and server.connections == 2


async def test_a_response_closed_unread_keeps_its_connection_when_its_body_is_already_here():
    async with scripted_server(reply(b"HTTP/1.1 429 Too Many\r\ncontent-length: 4\r\n\r\nslow")) as server, \
            ProviderTransport() as transport:
        url = f"http://127.0.0.1:{server.port}/"
        for _ in range(2):
            response = await transport.handle_async_request(httpx.Request("POST", url, content=b"x"))
            await trio.testing.wait_all_tasks_blocked()
            await response.aclose()
    assert response.status_code == 429 and server.connections == 1


async def test_more_than_content_length_is_never_reused():
    # The extra bytes are a whole second response, as if to smuggle it in as the next one's.
    smuggled = OK + b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfake!"
    async with scripted_server(reply(smuggled)) as server, ProviderTransport() as transport:
        url = f"http://127.0.0.1:{server.port}/"
        _, body = await fetch(transport, url)
        _, again = await fetch(transport, url)
    assert body == again == b"ok" and server.connections == 2


async def test_bytes_arriving_on_an_idle_connection_are_never_read_as_the_next_response():
    pooled, sent = trio.Event(), trio.Event()

    async def late_extra(stream: trio.abc.Stream, request: bytes, index: int) -> bool:
        await stream.send_all(OK)
        if index == 0:
            await pooled.wait()
            await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfake!")
            sent.set()
        return True

    async with scripted_server(late_extra) as server, ProviderTransport() as transport:
        url = f"http://127.0.0.1:{server.port}/"
        await fetch(transport, url)
        pooled.set()
        await sent.wait()
        _, body = await fetch(transport, url)
    assert body == b"ok" and server.connections == 2


async def test_a_stale_pooled_connection_is_retried_once_on_a_new_one():
    # The server answers, then closes the connection that the client has pooled.
    async with scripted_server(reply(OK, keep=False)) as server, ProviderTransport() as transport:
        url = f"http://127.0.0.1:{server.port}/"
        for _ in range(3):
            response, body = await fetch(transport, url)
            assert response.status_code == 200 and body == b"ok"
    assert server.connections == 3 and len(server.requests) == 3

    # Closed only once the next request is in: the retry itself, on a new connection.
    async def first_only(stream: trio.abc.Stream, request: bytes, index: int) -> bool:
        if index > 0:
            return False
        await stream.send_all(OK)
        return True

    async with scripted_server(first_only) as server, ProviderTransport() as transport:
        url = f"http://127.0.0.1:{server.port}/"
        await fetch(transport, url)
        _, body = await fetch(transport, url)
    assert body == b"ok" and server.connections == 2 and len(server.requests) == 3


async def test_interim_responses_are_skipped():
    raw = (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n"
           b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nyes")
    async with scripted_server(reply(raw)) as server, ProviderTransport() as transport:
        response, body = await fetch(transport, f"http://127.0.0.1:{server.port}/")
    assert response.status_code == 200 and body == b"yes"


async def test_an_obsolete_line_fold_is_unfolded():
    raw = b"HTTP/1.1 200 OK\r\nx-long: one\r\n  two\r\ncontent-length: 2\r\n\r\nok"
    async with scripted_server(reply(raw)) as server, ProviderTransport() as transport:
        response, body = await fetch(transport, f"http://127.0.0.1:{server.port}/")
    assert response.headers["x-long"] == "one two" and body == b"ok"


CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
MALFORMED = {
    "status line garbage": b"garbage\r\n\r\n",
    "status not a number": b"HTTP/1.1 abc OK\r\n\r\n",
    "not HTTP": b"SPDY/3 200 OK\r\n\r\n",
    "HTTP/2 on HTTP/1.1": b"HTTP/2.0 200 OK\r\ncontent-length: 2\r\n\r\nok",
    "header without colon": b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
    "fold at the start": b"HTTP/1.1 200 OK\r\n folded\r\ncontent-length: 2\r\n\r\nok",
    "space before colon": b"HTTP/1.1 200 OK\r\nContent-Length : 2\r\n\r\nok",
    "superscript length": "HTTP/1.1 200 OK\r\nContent-Length: ²\r\n\r\nok".encode(),
    "conflicting lengths": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
    "gzip, chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    "length and chunked": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n"
                          b"Transfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    "unrequested 101": b"HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\n\r\n",
    "negative chunk": CHUNKED_HEAD + b"-2\r\nok\r\n0\r\n\r\n",
    "0x chunk": CHUNKED_HEAD + b"0x2\r\nok\r\n0\r\n\r\n",
    "chunk without its CRLF": CHUNKED_HEAD + b"2\r\nokX\r\n0\r\n\r\n",
    "NUL in a header": b"HTTP/1.1 200 OK\r\nx: a\0b\r\ncontent-length: 2\r\n\r\nok",
    "head too large": b"HTTP/1.1 200 OK\r\n" + b"x: " + b"y" * 200_000 + b"\r\n\r\n",
}


@pytest.mark.parametrize("raw", MALFORMED.values(), ids=MALFORMED.keys())
async def test_malformed_responses_are_protocol_errors_on_dropped_connections(raw):
    # The server keeps each connection open: only the transport can be the one to drop it.
    async with scripted_server(reply(raw)) as server, ProviderTransport() as transport:
        url = f"http://127.0.0.1:{server.port}/"
        for _ in range(2):
            with pytest.raises(httpx.RemoteProtocolError):
                await fetch(transport, url)
        await trio.testing.wait_all_tasks_blocked()
        assert server.connections == 2 and len(server.requests) == 2 and server.ended == 2


@pytest.mark.parametrize("raw", [
    CHUNKED_HEAD + b"5\r\nhel",  # inside a chunk
    CHUNKED_HEAD + b"5\r\nhello\r\n",  # before the last chunk
    b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhello",
    b"HTTP/1.1 200 OK\r\ncontent-len",  # inside the head
], ids=["mid-chunk", "no last chunk", "short content-length", "mid-head"])
async def test_a_truncated_response_is_a_protocol_error(raw):
    async with scripted_server(reply(raw, keep=False)) as server, ProviderTransport() as transport:
        with pytest.raises(httpx.RemoteProtocolError):
            await fetch(transport, f"http://127.0.0.1:{server.port}/")


async def test_an_oversized_chunk_is_a_protocol_error():
    size = MAX_CHUNK + 1
    raw = CHUNKED_HEAD + b"%x\r\n" % size
    async with scripted_server(reply(raw, b"x" * size, b"\r\n0\r\n\r\n")) as server, \
            ProviderTransport() as transport:
        with pytest.raises(httpx.RemoteProtocolError, match="chunk"):
            await fetch(transport, f"http://127.0.0.1:{server.port}/")
        await trio.testing.wait_all_tasks_blocked()
        assert server.ended == 1


SSE_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def test_an_oversized_stream_event_is_a_protocol_error():
    piece = chunk(b"x" * 65536)  # one data line, never ended
    pieces = [SSE_HEAD + chunk(b"data: ")] + [piece] * (MAX_SSE_EVENT // 65536 + 1)
    async with scripted_server(reply(*pieces)) as server, ProviderTransport() as transport:
        with pytest.raises(httpx.RemoteProtocolError, match="event"):
            await fetch(transport, f"http://127.0.0.1:{server.port}/")
        await trio.testing.wait_all_tasks_blocked()
        assert server.ended == 1


async def test_stream_events_are_counted_from_their_blank_line():
    half = b"data: " + b"x" * (MAX_SSE_EVENT * 2 // 3) + b"\n"
    small = chunk(b"data: {}\n\n") * 2000
    # Blank lines as LF LF, CR CR, CRLF CRLF, and one split between two chunks.
    body = (chunk(half + b"\n") + chunk(half + b"\r\r") + chunk(half + b"\r\n\r\n")
            + chunk(half) + chunk(b"\n" + half) + chunk(b"\n") + small + b"0\r\n\r\n")
    async with scripted_server(reply(SSE_HEAD, body)) as server, ProviderTransport() as transport:
        _, received = await fetch(transport, f"http://127.0.0.1:{server.port}/")
    assert len(received) == 5 * len(half) + 9 + 2000 * 10


async def test_a_header_with_a_line_break_is_refused_before_anything_is_sent():
    async with scripted_server(reply(CHUNKED)) as server, ProviderTransport() as transport:
        with pytest.raises(httpx.LocalProtocolError) as caught:
            await fetch(transport, f"http://127.0.0.1:{server.port}/",
                        headers={"Authorization": "Bearer sk-secret\r\nX-Injected: 1"})
    assert server.connections == 0 and server.requests == []
    assert "sk-secret" not in str(caught.value) and caught.value.__cause__ is None


async def test_connect_failure_and_read_timeout(autojump_clock):
    async with ProviderTransport() as transport:
        with pytest.raises(httpx.ConnectError):  # nobody listens there
            await fetch(transport, f"http://127.0.0.1:{free_port()}/")

    async def never_answer(stream: trio.abc.Stream, request: bytes, index: int) -> bool:
        await trio.sleep_forever()
        return False

    async with scripted_server(never_answer) as server, ProviderTransport() as transport:
        with pytest.raises(httpx.ReadTimeout):
            await fetch(transport, f"http://127.0.0.1:{server.port}/",
                        extensions={"timeout": {"connect": 5, "read": 30, "write": 5, "pool": 5}})


@pytest.mark.parametrize("tls", [False, True])
async def test_a_body_that_stalls_midway_times_out_and_its_connection_is_not_reused(tls):
    """Body reads are timed by the transport's watchdog, not a cancel scope per read: a stall
    after the first chunk is a ReadTimeout (within the watchdog's tick), and the next request
    gets a new connection."""

    async def stall_once(stream: trio.abc.Stream, request: bytes, index: int) -> bool:
        if index == 0 and stalled.connections == 1:
            await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhello")
            await trio.sleep_forever()
        await stream.send_all(OK)
        return True

    ca = trustme.CA() if tls else None
    trusting = ssl.create_default_context()
    if ca is not None:
        ca.configure_trust(trusting)
    async with scripted_server(stall_once, tls=ca) as stalled, ProviderTransport(verify=trusting) as transport:
        scheme, host = ("https", "localhost") if tls else ("http", "127.0.0.1")
        url = f"{scheme}://{host}:{stalled.port}/"
        response = await transport.handle_async_request(httpx.Request(
            "GET", url, extensions={"timeout": {"connect": 5, "read": 0.2, "write": 5, "pool": 5}}
        ))
        chunks = response.stream.__aiter__()
        assert await chunks.__anext__() == b"hello"
        started = trio.current_time()
        with pytest.raises(httpx.ReadTimeout), trio.fail_after(10):  # not a hang
            await chunks.__anext__()
        assert trio.current_time() - started >= 0.2  # never before its deadline
        await response.aclose()
        _, body = await fetch(transport, url)
        assert body == b"ok" and stalled.connections == 2


async def test_write_timeout(autojump_clock):
    async def never_read(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery, ProviderTransport() as transport:
        listeners = await nursery.start(partial(trio.serve_tcp, never_read, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        request = httpx.Request("POST", f"http://127.0.0.1:{port}/", content=b"x" * (64 << 20),
                                extensions={"timeout": {"connect": 5, "read": 5, "write": 5, "pool": 5}})
        with pytest.raises(httpx.WriteTimeout):
            await transport.handle_async_request(request)
        nursery.cancel_scope.cancel()


async def test_tls_with_a_trusted_and_an_untrusted_certificate(monkeypatch, tmp_path):
    ca = trustme.CA()
    async with scripted_server(reply(CHUNKED), tls=ca) as server:
        url = f"https://localhost:{server.port}/v1"
        trusting = ssl.create_default_context()
        ca.configure_trust(trusting)
        async with ProviderTransport(verify=trusting) as transport:
            response, body = await fetch(transport, url)
            assert response.status_code == 200 and body == b"data: hello"
        monkeypatch.delenv("SSL_CERT_DIR", raising=False)
        monkeypatch.delenv("SSL_CERT_FILE", raising=False)
        async with ProviderTransport() as transport:  # certifi does not know this CA
            with pytest.raises(httpx.ConnectError):
                await fetch(transport, url)
        ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))  # as httpx: SSL_CERT_FILE is the store
        monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "ca.pem"))
        async with ProviderTransport() as transport:
            _, body = await fetch(transport, url)
            assert body == b"data: hello"


# The connection cap.

async def test_the_cap_counts_busy_connections_and_a_request_waits_for_one():
    async with scripted_server(reply(OK)) as server, ProviderTransport(max_connections=1) as transport:
        url = f"http://127.0.0.1:{server.port}/"
        busy = await transport.handle_async_request(httpx.Request("GET", url))
        bodies: list[bytes] = []

        async def second() -> None:
            bodies.append((await fetch(transport, url))[1])

        async with trio.open_nursery() as nursery:
            nursery.start_soon(second)
            await trio.testing.wait_all_tasks_blocked()
            assert bodies == [] and server.connections == 1  # waiting, not connecting
            assert await busy.aread() == b"ok"
            await busy.aclose()
    assert bodies == [b"ok"] and server.connections == 1


async def test_the_cap_times_out_as_a_pool_timeout(autojump_clock):
    async with scripted_server(reply(OK)) as server, ProviderTransport(max_connections=1) as transport:
        url = f"http://127.0.0.1:{server.port}/"
        busy = await transport.handle_async_request(httpx.Request("GET", url))
        with pytest.raises(httpx.PoolTimeout):
            await fetch(transport, url, extensions={"timeout": {"pool": 3, "connect": 3, "read": 3}})
        await busy.aclose()
    assert server.connections == 1


async def test_an_idle_connection_elsewhere_makes_room_under_the_cap():
    async with scripted_server(reply(OK)) as first, scripted_server(reply(OK)) as second, \
            ProviderTransport(max_connections=1) as transport:
        await fetch(transport, f"http://127.0.0.1:{first.port}/")
        _, body = await fetch(transport, f"http://127.0.0.1:{second.port}/")
        await trio.testing.wait_all_tasks_blocked()
    assert body == b"ok" and first.ended == 1 and second.connections == 1



async def test_hundreds_of_concurrent_requests_each_get_a_connection_that_is_kept_for_the_next():
    # Once the cap was 256 (the 257th concurrent stream waited for another to end) and only 100
    # idle connections were kept (each stream past them reconnected): both cost CPU per delta.
    concurrent = 300
    async with scripted_server(reply(OK)) as server, ProviderTransport() as transport:
        url = f"http://127.0.0.1:{server.port}/"
        for _ in range(2):
            with trio.fail_after(10):  # a request over the cap would wait here
                responses = [await transport.handle_async_request(httpx.Request("GET", url))
                             for _ in range(concurrent)]
            for response in responses:
                assert await response.aread() == b"ok"
                await response.aclose()
    assert server.connections == concurrent  # the second round reused every one of them


@pytest.mark.parametrize("kind", ["atlas", "httpx"])
async def test_the_provider_connection_cap_is_a_setting(kind):
    settings = load_settings({}, {"ATLAS_PROVIDER_MAX_CONNECTIONS": "7"})
    transport = open_provider_transport(kind, max_connections=settings.provider_max_connections)
    async with transport:
        if isinstance(transport, ProviderTransport):
            assert transport.max_connections == 7
        else:
            assert transport._limits.max_connections == transport._limits.max_keepalive_connections == 7
    assert load_settings({}, {}).provider_max_connections == 1000
    with pytest.raises(ConfigError, match="ATLAS_PROVIDER_MAX_CONNECTIONS"):
        load_settings({}, {"ATLAS_PROVIDER_MAX_CONNECTIONS": "0"})


# Proxies.

@dataclass
class ProxyLog:
    port: int = 0
    heads: list[bytes] = field(default_factory=list)


async def splice(source: trio.abc.Stream, sink: trio.abc.Stream, done: trio.CancelScope) -> None:
    try:
        while data := await source.receive_some(65536):
            await sink.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    done.cancel()


@asynccontextmanager
async def connect_proxy(answer: bytes | None = None) -> AsyncIterator[ProxyLog]:
    """A CONNECT proxy: answers 200 (or ``answer``) and splices bytes to 127.0.0.1:port."""
    log = ProxyLog()

    async def serve_one(client: trio.SocketStream) -> None:
        head = bytearray()
        async with client:
            while b"\r\n\r\n" not in head:
                if not (data := await client.receive_some(65536)):
                    return
                head += data
            log.heads.append(bytes(head))
            target = bytes(head).split(b" ", 2)[1]
            if answer is not None:
                await client.send_all(answer)
                return
            async with await trio.open_tcp_stream("127.0.0.1", int(target.rpartition(b":")[2])) as upstream:
                await client.send_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(splice, client, upstream, nursery.cancel_scope)
                    nursery.start_soon(splice, upstream, client, nursery.cancel_scope)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, serve_one, 0, host="127.0.0.1"))
        log.port = listeners[0].socket.getsockname()[1]
        yield log
        nursery.cancel_scope.cancel()


async def test_https_through_a_connect_tunnel(monkeypatch):
    ca = trustme.CA()
    trusting = ssl.create_default_context()
    ca.configure_trust(trusting)
    async with scripted_server(reply(CHUNKED), tls=ca) as server, connect_proxy() as proxy:
        monkeypatch.setenv("HTTPS_PROXY", f"http://user:p%40ss@127.0.0.1:{proxy.port}")
        async with ProviderTransport(verify=trusting) as transport:
            url = f"https://localhost:{server.port}/v1/chat/completions"
            _, body = await fetch(transport, url)
            _, again = await fetch(transport, url)
    assert body == again == b"data: hello"
    assert len(proxy.heads) == 1 and server.connections == 1  # the tunnel is kept alive
    assert proxy.heads[0].startswith(b"CONNECT localhost:%d HTTP/1.1\r\n" % server.port)
    assert b"\r\nProxy-Authorization: Basic %s\r\n" % base64.b64encode(b"user:p@ss") in proxy.heads[0]
    assert server.requests[0].startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")


async def test_a_refused_tunnel_is_a_proxy_error(monkeypatch):
    refusal = b"HTTP/1.1 407 Proxy Authentication Required\r\ncontent-length: 0\r\n\r\n"
    async with connect_proxy(answer=refusal) as proxy:
        monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{proxy.port}")
        async with ProviderTransport() as transport:
            with pytest.raises(httpx.ProxyError):
                await fetch(transport, "https://provider.invalid/v1")
    assert proxy.heads[0].startswith(b"CONNECT provider.invalid:443 HTTP/1.1\r\n")


async def test_http_through_a_proxy_in_absolute_form(monkeypatch):
    async with scripted_server(reply(OK)) as proxy:  # the proxy answers itself
        monkeypatch.setenv("HTTP_PROXY", f"127.0.0.1:{proxy.port}")  # no scheme: http://, as httpx
        async with ProviderTransport() as transport:
            _, body = await fetch(transport, "http://provider.invalid:8080/v1/models?x=1")
    assert body == b"ok"
    assert proxy.requests[0].startswith(b"POST http://provider.invalid:8080/v1/models?x=1 HTTP/1.1\r\n")
    assert b"\r\nHost: provider.invalid:8080\r\n" in proxy.requests[0]


async def test_loopback_is_proxied_unless_no_proxy_names_it(monkeypatch):
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{free_port()}")  # nobody listens there
    async with scripted_server(reply(OK)) as server:
        url = f"http://127.0.0.1:{server.port}/"
        async with ProviderTransport() as transport:
            with pytest.raises(httpx.ConnectError):
                await fetch(transport, url)
        monkeypatch.setenv("NO_PROXY", "example.com, 127.0.0.1")
        async with ProviderTransport() as transport:
            _, body = await fetch(transport, url)
    assert body == b"ok" and server.connections == 1


async def test_atlas_provider_proxy_overrides_the_variables(monkeypatch):
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("NO_PROXY", "*")
    async with scripted_server(reply(OK)) as proxy:
        monkeypatch.setenv("ATLAS_PROVIDER_PROXY", f"http://127.0.0.1:{proxy.port}")
        async with ProviderTransport() as transport:
            await fetch(transport, "http://provider.invalid/v1")
        monkeypatch.delenv("ATLAS_PROVIDER_PROXY")
        async with ProviderTransport(proxy=f"http://127.0.0.1:{proxy.port}") as transport:
            await fetch(transport, "http://other.invalid/v1")
    assert [request.split(b"\r\n")[0] for request in proxy.requests] == [
        b"POST http://provider.invalid/v1 HTTP/1.1", b"POST http://other.invalid/v1 HTTP/1.1"]


def test_proxy_for_reads_the_environment_as_httpx_does(monkeypatch):
    def chosen(url: str, override: str | None = None) -> str | None:
        proxy = proxy_for(httpx.URL(url), override=override)
        return None if proxy is None else str(proxy)

    assert chosen("https://api.example.com/v1") is None
    monkeypatch.setenv("HTTPS_PROXY", "http://tls-proxy:3128")
    monkeypatch.setenv("ALL_PROXY", "http://any-proxy:3128")
    monkeypatch.setenv("NO_PROXY", ".internal,example.org,10.0.0.1")
    assert chosen("https://api.example.com/v1") == "http://tls-proxy:3128"
    assert chosen("http://api.example.com/v1") == "http://any-proxy:3128"
    assert chosen("http://localhost:8000/v1") == "http://any-proxy:3128"  # loopback not exempt
    assert chosen("https://llm.internal/v1") is None
    assert chosen("https://internal/v1") == "http://tls-proxy:3128"  # .internal: subdomains only
    assert chosen("https://example.org/v1") is None and chosen("https://a.example.org/v1") is None
    assert chosen("http://10.0.0.1:8000/v1") is None
    assert chosen("https://llm.internal/v1", override="corp:8080") == "http://corp:8080"
    monkeypatch.setenv("https_proxy", "http://lower:1")  # lower case wins, as in urllib
    assert chosen("https://api.example.com/v1") == "http://lower:1"


def test_only_http_proxies_are_supported(monkeypatch):
    monkeypatch.setenv("ALL_PROXY", "socks5://user:secret@127.0.0.1:1080")
    with pytest.raises(ValueError, match="only http://") as caught:
        ProviderTransport()
    assert "secret" not in str(caught.value)
    assert ProviderTransport(trust_env=False)._proxies == []
