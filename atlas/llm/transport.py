"""The provider HTTP transport: HTTP/1.1 for httpx, every response parsed by h11.

``ProviderTransport`` is an ``httpx.AsyncBaseTransport`` that drives ``h11`` (the parser httpcore
and Hypercorn use) straight from trio socket reads: per delta of a provider's stream, one socket
read and two ``next_event`` calls, with no generator layers and no scan of the pool. Nothing of a
response is parsed by hand. Requests are ``httpx.Request`` (timeouts from the ``timeout``
extension, as httpcore reads them), responses are ``httpx.Response`` with a streamed body, and
failures are httpx's exceptions, as httpcore raises them:

    httpx.TransportError
     ├── TimeoutException: ConnectTimeout, ReadTimeout, WriteTimeout, PoolTimeout
     ├── NetworkError: ConnectError, ReadError, WriteError
     ├── ProtocolError
     │    ├── RemoteProtocolError   any malformed response, or one past a limit below
     │    └── LocalProtocolError    a request h11 refuses to write (a line break in a header)
     ├── ProxyError                 the proxy refused the tunnel
     └── UnsupportedProtocol        not http:// or https://

A connection that saw an error, or whose response was not read to its end, is closed, never
pooled. Kept: keep-alive per (scheme, host, port), a pooled connection found closed by the server
retried once on a new one, TLS with the trust store httpx uses by default, at most
``max_connections`` open at once. Responses are never decoded: ``Accept-Encoding: identity``.

Proxies follow the environment as ``httpx.AsyncClient(trust_env=True)`` reads it (``proxy_for``);
an http:// proxy is supported, with CONNECT tunnels for https:// and absolute-form requests for
http://.
"""

from __future__ import annotations

import base64
import math
import os
import select
import ssl
from typing import Any

import h11
import httpx
import trio

# httpx's own proxy rules, those of AsyncClient(trust_env=True):
from httpx._utils import URLPattern, get_environment_proxies

from atlas.config import DEFAULT_PROVIDER_MAX_CONNECTIONS
from atlas.deadlines import DeadlineWatch, socket_of

MAX_HEAD = 64 * 1024  # what h11 buffers of a response head not yet complete
MAX_CHUNK = 4 * 1024 * 1024  # one chunk of a chunked body; no provider sends one near this
MAX_SSE_EVENT = 1024 * 1024  # one event of a text/event-stream body, counted up to its blank line
READ_SIZE = 65536
PROXY_OVERRIDE_ENV = "ATLAS_PROVIDER_PROXY"  # one proxy for every provider call, over the variables

Origin = tuple[str, str, int]
ProxyTable = list[tuple[URLPattern, "httpx.URL | None"]]
_NETWORK_ERRORS = (OSError, trio.BrokenResourceError, trio.ClosedResourceError)
_DEFAULT_PORTS = {"http": 80, "https": 443}


def proxy_for(url: httpx.URL, *, override: str | None) -> httpx.URL | None:
    """The proxy for a request to ``url``, or None to connect directly.

    A non-empty ``override`` (``ATLAS_PROVIDER_PROXY``) is the proxy of every call. Otherwise
    HTTPS_PROXY, HTTP_PROXY, ALL_PROXY and NO_PROXY decide, read and matched by httpx's own code as
    ``AsyncClient(trust_env=True)`` does: loopback is not exempt unless NO_PROXY names it."""
    return _pick(_proxy_table(override, trust_env=True), url)


def _proxy_table(override: str | None, *, trust_env: bool) -> ProxyTable:
    if override:
        return [(URLPattern("all://"), _proxy_url(override))]
    if not trust_env:
        return []
    table = [(URLPattern(pattern), None if proxy is None else _proxy_url(proxy))
             for pattern, proxy in get_environment_proxies().items()]
    table.sort(key=lambda entry: entry[0])  # most specific first, as httpx orders its mounts
    return table


def _pick(table: ProxyTable, url: httpx.URL) -> httpx.URL | None:
    for pattern, proxy in table:
        if pattern.matches(url):
            return proxy
    return None


def _proxy_url(text: str) -> httpx.URL:
    url = httpx.URL(text if "://" in text else f"http://{text}")
    if url.scheme != "http":
        shown = url.copy_with(username=None, password=None)
        raise ValueError(f"proxy {shown}: only http:// proxies are supported")
    return url


def _proxy_headers(proxy: httpx.URL) -> list[tuple[bytes, bytes]]:
    if not proxy.username and not proxy.password:
        return []
    credentials = f"{proxy.username}:{proxy.password}".encode()
    return [(b"Proxy-Authorization", b"Basic " + base64.b64encode(credentials))]


class _Connection:
    __slots__ = ("deadline", "h11", "open", "origin", "stream", "timed_out")

    def __init__(self, stream: trio.abc.Stream, origin: Origin) -> None:
        self.stream = stream
        self.origin = origin
        self.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
        self.open = True  # still counted against max_connections
        self.deadline = math.inf  # of the body read in progress (``DeadlineWatch``)
        self.timed_out = False

    @property
    def socket(self) -> trio.socket.SocketType:
        return socket_of(self.stream)

    async def receive(self, timeout: float) -> bytes:
        with trio.move_on_after(timeout):
            try:
                return await self.stream.receive_some(READ_SIZE)
            except _NETWORK_ERRORS as exc:
                raise httpx.ReadError(str(exc) or type(exc).__name__) from exc
        raise httpx.ReadTimeout("no byte from the server in time")

    async def receive_watched(self, timeout: float) -> bytes:
        """``receive`` for a response body: its timeout is kept by the transport's
        ``DeadlineWatch`` instead of a cancel scope of its own (two context managers per read,
        measured at ~7% of Atlas's CPU while streaming)."""
        if self.timed_out:
            raise httpx.ReadTimeout("no byte from the server in time")
        self.deadline = trio.current_time() + timeout
        try:
            return await self.stream.receive_some(READ_SIZE)
        except _NETWORK_ERRORS as exc:
            if self.timed_out:
                raise httpx.ReadTimeout("no byte from the server in time") from None
            raise httpx.ReadError(str(exc) or type(exc).__name__) from exc
        finally:
            self.deadline = math.inf


class _ClosedBeforeResponse(httpx.RemoteProtocolError):
    """The server closed the connection before a byte of a response: on a pooled one, it was stale."""


class _ResetBeforeResponse(httpx.ReadError):
    """The connection broke before a byte of a response came back."""


class _Body(httpx.AsyncByteStream):
    """The response body, read straight from the connection; back to the pool once complete."""

    def __init__(
        self, transport: ProviderTransport, connection: _Connection, read_timeout: float,
        *, chunked: bool, sse: bool,
    ) -> None:
        self._transport = transport
        self._connection: _Connection | None = connection
        self._timeout = read_timeout
        self._chunked = chunked
        self._sse = sse
        self._chunk = 0  # bytes of the current chunk so far
        self._event = 0  # bytes of the current SSE event so far
        self._last = 0  # the last byte seen, for a blank line split across two reads
        self._complete = False
        self._broken = False

    def __aiter__(self) -> _Body:  # an iterator, not an async generator: nothing to finalize
        return self

    async def __anext__(self) -> bytes:
        # One method, not a helper per read: this runs once per provider chunk (per delta).
        connection = self._connection
        if connection is None or self._complete:
            raise StopAsyncIteration
        parser = connection.h11
        try:
            while True:
                event = parser.next_event()
                if type(event) is h11.Data:
                    data = bytes(event.data)
                    if self._chunked:
                        self._chunk = len(data) if event.chunk_start else self._chunk + len(data)
                        if self._chunk > MAX_CHUNK:
                            raise httpx.RemoteProtocolError(f"a chunk of more than {MAX_CHUNK} bytes")
                    if self._sse:
                        self._count_event(data)
                    return data
                if event is h11.NEED_DATA:
                    parser.receive_data(await connection.receive_watched(self._timeout))
                elif type(event) is h11.EndOfMessage:
                    self._complete = True
                    raise StopAsyncIteration
                else:
                    raise httpx.RemoteProtocolError(f"unexpected {type(event).__name__} in a body")
        except h11.RemoteProtocolError as exc:
            self._broken = True  # whatever is buffered, this connection is done
            raise httpx.RemoteProtocolError(str(exc)) from exc
        except StopAsyncIteration:
            raise
        except BaseException:
            self._broken = True
            raise

    def _count_event(self, data: bytes) -> None:
        # An event ends at a blank line: two line ends in a row (LF LF, CR CR, LF CR, CR LF CR LF).
        # The usual read ends with one event's LF LF: no later blank line to look for then.
        end = data.rfind(b"\n\n")
        if end != len(data) - 2:
            end = max(end, data.rfind(b"\r\r"), data.rfind(b"\n\r"))
        if end >= 0:
            self._event = len(data) - end - 2
        elif data and self._last in b"\r\n" and data[0] in b"\r\n" \
                and not (self._last == 13 and data[0] == 10):
            self._event = len(data) - 1
        else:
            self._event += len(data)
        if data:
            self._last = data[-1]
        if self._event > MAX_SSE_EVENT:
            raise httpx.RemoteProtocolError(f"a stream event of more than {MAX_SSE_EVENT} bytes")

    async def aclose(self) -> None:
        connection, self._connection = self._connection, None
        if connection is None:
            return
        self._transport._watchdog.unwatch(connection)
        reusable = self._complete or (not self._broken and _rest_is_buffered(connection.h11))
        await self._transport._check_in(connection, reusable=reusable)


def _rest_is_buffered(parser: h11.Connection) -> bool:
    """Read what is already buffered, dropping it: whether it held the end of the response (a
    body closed unread, such as an error status's, then keeps its connection)."""
    try:
        while type(event := parser.next_event()) is h11.Data:
            pass
    except h11.ProtocolError:
        return False
    return type(event) is h11.EndOfMessage


def _request_head(request: httpx.Request, proxy: httpx.URL | None) -> h11.Request:
    url = request.url
    target = url.raw_path
    headers = [(name, value) for name, value in request.headers.raw
               if name.lower() != b"accept-encoding"]
    headers.append((b"Accept-Encoding", b"identity"))  # bodies are passed on as they come
    if proxy is not None and url.scheme == "http":
        target = b"http://%s%s" % (url.netloc, url.raw_path)  # absolute-form, to the proxy
        headers += _proxy_headers(proxy)
    try:
        return h11.Request(method=request.method.encode("ascii"), target=target, headers=headers)
    except h11.LocalProtocolError:
        # Not h11's message: it quotes the value, and a header value may be a user's API key.
        raise httpx.LocalProtocolError(
            "the request has a header name or value h11 refuses to write (a line break or NUL?)"
        ) from None


def _check_head(event: h11.Response) -> tuple[bool, bool]:
    """(chunked, sse) of a response h11 has parsed, after checks h11 leaves to its user."""
    if event.http_version not in (b"1.1", b"1.0"):
        raise httpx.RemoteProtocolError(f"HTTP/{event.http_version.decode()} on an HTTP/1.1 connection")
    chunked = sized = sse = False
    for name, value in event.headers:
        if name == b"transfer-encoding":
            chunked = True
        elif name == b"content-length":
            sized = True
        elif name == b"content-type":
            sse = value.lower().startswith(b"text/event-stream")
    if chunked and sized:  # RFC 9112 6.1: a sign of request smuggling or response splitting
        raise httpx.RemoteProtocolError("both Transfer-Encoding and Content-Length")
    return chunked, sse


def _readable(stream: trio.abc.Stream) -> bool:
    """Whether an idle connection has something to read: the server closed it, or sent bytes
    nobody asked for. Either way it must not carry the next request."""
    fd = socket_of(stream).fileno()
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(0))
    return bool(select.select([fd], [], [], 0)[0])


def _seconds(timeout: float | None) -> float:
    return float("inf") if timeout is None else timeout


class ProviderTransport(httpx.AsyncBaseTransport):
    """``verify`` as httpx's (True: certifi, or SSL_CERT_FILE/SSL_CERT_DIR when ``trust_env``).
    ``proxy`` overrides the proxy variables for every request; left None, ``ATLAS_PROVIDER_PROXY``
    does, when ``trust_env``. ``max_connections`` counts every open connection, busy or idle.

    Every connection that ends cleanly stays idle for the next request, up to that one cap: the
    oldest idle one is closed when a new connection needs its place. A smaller idle cap (100, as
    once here) closed and reopened a connection per stream past it; with the cap at 256 the
    257th concurrent stream waited for another to end. Both showed as CPU per delta at 300
    streams (measured: 111-123 against 102 us, docs/benchmarks.md)."""

    def __init__(
        self, *, verify: ssl.SSLContext | str | bool = True, proxy: str | None = None,
        trust_env: bool = True, max_connections: int = DEFAULT_PROVIDER_MAX_CONNECTIONS,
    ) -> None:
        self.max_connections = max_connections
        self._ssl = httpx.create_ssl_context(verify=verify, trust_env=trust_env)
        if proxy is None and trust_env:
            proxy = os.environ.get(PROXY_OVERRIDE_ENV)
        self._proxies = _proxy_table(proxy, trust_env=trust_env)
        self._idle: dict[Origin, list[_Connection]] = {}
        self._open = 0
        self._pool_changed = trio.lowlevel.ParkingLot()
        # Read timeouts of response bodies (a timeout fires up to a tick late).
        self._watchdog = DeadlineWatch(0.05, "atlas provider read timeouts")
        self._closed = False

    async def aclose(self) -> None:
        self._closed = True
        self._watchdog.close()
        idle, self._idle = self._idle, {}
        for connections in idle.values():
            for connection in connections:
                await self._close(connection)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeouts: dict[str, Any] = request.extensions.get("timeout", {})
        url = request.url
        if url.scheme not in _DEFAULT_PORTS:
            raise httpx.UnsupportedProtocol(f"unsupported URL scheme {url.scheme!r}")
        origin = (url.scheme, url.raw_host.decode("ascii"), url.port or _DEFAULT_PORTS[url.scheme])
        proxy = _pick(self._proxies, url)
        head = _request_head(request, proxy)  # refused here, before any connection
        try:
            body = request.content
        except httpx.RequestNotRead:
            body = b"".join([part async for part in request.stream])  # type: ignore[union-attr]
        # A pooled connection may have been closed by the server meanwhile: one retry on a new
        # connection, and only when not a byte of a response came back.
        for fresh in (False, True):
            connection, pooled = await self._check_out(origin, proxy, timeouts, fresh=fresh)
            try:
                event = await self._exchange(connection, head, body, timeouts)
                chunked, sse = _check_head(event)
            except (httpx.WriteError, _ClosedBeforeResponse, _ResetBeforeResponse):
                await self._close(connection)
                if pooled:
                    continue
                raise
            except BaseException:
                await self._close(connection)
                raise
            stream = _Body(self, connection, _seconds(timeouts.get("read")), chunked=chunked, sse=sse)
            self._watchdog.watch(connection)
            return httpx.Response(
                event.status_code, headers=event.headers.raw_items(), stream=stream,
                extensions={"http_version": b"HTTP/" + event.http_version,
                            "reason_phrase": event.reason},
            )
        raise AssertionError("not reached: a new connection answers or raises")

    async def _exchange(
        self, connection: _Connection, head: h11.Request, body: bytes, timeouts: dict[str, Any]
    ) -> h11.Response:
        parser = connection.h11
        try:
            data = parser.send(head)
            if body:
                data += parser.send(h11.Data(data=body))
            data += parser.send(h11.EndOfMessage())
        except h11.LocalProtocolError as exc:  # the body does not match the request's framing
            raise httpx.LocalProtocolError(str(exc)) from exc
        with trio.move_on_after(_seconds(timeouts.get("write"))) as scope:
            try:
                await connection.stream.send_all(data)
            except _NETWORK_ERRORS as exc:
                raise httpx.WriteError(str(exc) or type(exc).__name__) from exc
        if scope.cancelled_caught:
            raise httpx.WriteTimeout("sending the request timed out")
        read_timeout = _seconds(timeouts.get("read"))
        answered = False  # any byte of a response yet
        while True:
            try:
                event = parser.next_event()
            except h11.RemoteProtocolError as exc:
                raise httpx.RemoteProtocolError(str(exc)) from exc
            if event is h11.NEED_DATA:
                answered = answered or bool(parser.trailing_data[0])
                try:
                    data = await connection.receive(read_timeout)
                except httpx.ReadError as exc:
                    if answered:
                        raise
                    raise _ResetBeforeResponse(str(exc)) from exc
                if not data and not answered:
                    raise _ClosedBeforeResponse("the server closed the connection before responding")
                parser.receive_data(data)
            elif type(event) is h11.Response:
                return event
            elif type(event) is h11.InformationalResponse:  # 100 Continue, 103 Early Hints
                answered = True
            else:
                raise httpx.RemoteProtocolError(f"unexpected {type(event).__name__} before a response")

    async def _check_out(
        self, origin: Origin, proxy: httpx.URL | None, timeouts: dict[str, Any], *, fresh: bool
    ) -> tuple[_Connection, bool]:
        """An idle connection to ``origin`` (pooled: True) or a new one, within the pool timeout."""
        with trio.move_on_after(_seconds(timeouts.get("pool"))) as scope:
            while True:
                if not fresh and (connection := await self._take(origin)) is not None:
                    return connection, True
                if self._open < self.max_connections:
                    break
                if not await self._evict_idle():
                    await self._pool_changed.park()
        if scope.cancelled_caught:
            raise httpx.PoolTimeout(f"all {self.max_connections} connections stayed busy")
        self._open += 1
        try:
            return await self._connect(origin, proxy, timeouts.get("connect")), False
        except BaseException:
            self._open -= 1
            self._pool_changed.unpark_all()
            raise

    async def _take(self, origin: Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        while idle:
            connection = idle.pop()
            if not _readable(connection.stream):
                return connection
            await self._close(connection)
        return None

    async def _evict_idle(self) -> bool:
        """Close the oldest idle connection to any origin, to make room; False if none is idle."""
        for idle in self._idle.values():
            if idle:
                await self._close(idle.pop(0))
                return True
        return False

    async def _check_in(self, connection: _Connection, *, reusable: bool) -> None:
        parser = connection.h11
        if (reusable and not self._closed and parser.our_state is h11.DONE
                and parser.their_state is h11.DONE and not parser.trailing_data[0]):
            parser.start_next_cycle()
            self._idle.setdefault(connection.origin, []).append(connection)
            self._pool_changed.unpark_all()
            return
        await self._close(connection)

    async def _close(self, connection: _Connection) -> None:
        if connection.open:
            connection.open = False
            self._open -= 1
            self._pool_changed.unpark_all()
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(connection.stream)

    async def _connect(self, origin: Origin, proxy: httpx.URL | None, timeout: float | None) -> _Connection:
        scheme, host, port = origin
        stream: trio.abc.Stream | None = None
        try:
            with trio.fail_after(_seconds(timeout)):
                if proxy is None:
                    stream = await trio.open_tcp_stream(host, port)
                else:
                    stream = await trio.open_tcp_stream(proxy.raw_host.decode("ascii"), proxy.port or 80)
                    if scheme == "https":
                        await _open_tunnel(stream, host, port, proxy)
                if scheme == "https":
                    stream = trio.SSLStream(stream, self._ssl, server_hostname=host, https_compatible=True)
                    await stream.do_handshake()
        except BaseException as exc:
            if stream is not None:
                with trio.CancelScope(shield=True):
                    await trio.aclose_forcefully(stream)
            if isinstance(exc, trio.TooSlowError):
                raise httpx.ConnectTimeout("connecting timed out") from exc
            if isinstance(exc, _NETWORK_ERRORS):
                raise httpx.ConnectError(str(exc) or type(exc).__name__) from exc
            raise
        return _Connection(stream, origin)


async def _open_tunnel(stream: trio.abc.Stream, host: str, port: int, proxy: httpx.URL) -> None:
    """Ask the proxy for a tunnel to host:port with CONNECT; the proxy's answer is parsed by h11."""
    target = (f"[{host}]:{port}" if ":" in host else f"{host}:{port}").encode("ascii")
    parser = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
    headers = [(b"Host", target), *_proxy_headers(proxy)]
    await stream.send_all(parser.send(h11.Request(method=b"CONNECT", target=target, headers=headers))
                          + parser.send(h11.EndOfMessage()))
    while True:
        try:
            event = parser.next_event()
        except h11.RemoteProtocolError as exc:
            raise httpx.RemoteProtocolError(f"from the proxy: {exc}") from exc
        if event is h11.NEED_DATA:
            parser.receive_data(await stream.receive_some(READ_SIZE))
        elif type(event) is h11.Response:
            if not 200 <= event.status_code < 300:
                raise httpx.ProxyError(f"the proxy refused the tunnel (HTTP {event.status_code})")
            if parser.trailing_data[0]:
                raise httpx.ProxyError("the proxy sent bytes before the tunnel's first")
            return
        elif type(event) is not h11.InformationalResponse:
            raise httpx.ProxyError("the proxy closed the connection instead of opening a tunnel")
