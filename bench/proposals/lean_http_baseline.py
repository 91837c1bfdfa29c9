"""BENCH BASELINE ONLY: the hand-parsing HTTP/1.1 transport Atlas used before ``atlas.llm.transport``
(h11). Kept so ``bench.proposals.transport_ab`` can measure what the parser costs; never used by
Atlas, and not hardened (crafted responses get through it; see issue 10).

A lean HTTP/1.1 transport for provider calls, plugged into httpx as an ``AsyncBaseTransport``.

Why not httpx's default transport (httpcore)? Measured on the bench machine (docs/benchmarks.md):

- reading a provider's SSE stream through httpcore costs ~105-120 µs of CPU per delta (generator
  layers, h11 events, a timeout scope per read), this reader ~60-70 µs, a bare trio read ~40 µs;
- httpcore 1.0's pool scans every connection, polling each idle socket, on every request start
  and end, so per-delta CPU grows with the number of concurrent streams (~50% more after a few
  hundred; encode/httpcore PR #1035).

Everything else stays httpx: requests are ``httpx.Request`` (timeouts from the ``timeout``
extension, as httpcore reads them), responses are ``httpx.Response`` with a streamed body, and
failures are httpx's exception types (``ConnectError``/``ConnectTimeout``, ``ReadTimeout``,
``ReadError``, ``WriteError``/``WriteTimeout``, ``RemoteProtocolError``, ``LocalProtocolError``),
so the provider's error mapping is the same for both transports. ``ATLAS_PROVIDER_TRANSPORT=httpx``
switches back to httpx's own.

Scope: HTTP/1.1 to an OpenAI-compatible API. Keep-alive connections per (scheme, host, port) with
a bounded idle pool; a pooled connection the server closed meanwhile is retried once on a new
connection; TLS with the default trust store and hostname checks; ``content-length``, ``chunked``
and close-delimited bodies; interim 1xx responses skipped. No proxies, redirects, cookies,
compression or environment: provider calls use none of them.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from typing import Any

import httpx
import trio

MAX_HEAD = 64 * 1024
READ_SIZE = 65536
Key = tuple[str, str, int]
_FORBIDDEN_IN_HEADERS = (b"\r", b"\n", b"\0")


class _Connection:
    __slots__ = ("stream", "key", "buffer")

    def __init__(self, stream: trio.abc.Stream, key: Key) -> None:
        self.stream = stream
        self.key = key
        self.buffer = bytearray()

    async def receive(self, timeout: float | None) -> bytes:
        with trio.move_on_after(_seconds(timeout)):
            try:
                return await self.stream.receive_some(READ_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise httpx.ReadError(str(exc) or type(exc).__name__) from exc
        raise httpx.ReadTimeout("no byte from the server in time")

    async def read_head(self, timeout: float | None) -> bytes:
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end >= 0:
                head = bytes(self.buffer[:end])
                del self.buffer[:end + 4]
                return head
            if len(self.buffer) > MAX_HEAD:
                raise httpx.RemoteProtocolError("response head too large")
            data = await self.receive(timeout)
            if not data:
                if self.buffer:
                    raise httpx.RemoteProtocolError("connection closed inside the response head")
                raise _ClosedBeforeResponse("connection closed before the response head")
            self.buffer += data


class _ClosedBeforeResponse(httpx.RemoteProtocolError):
    """Not a byte of a response came back: on a pooled connection, the server had closed it."""


class _Body(httpx.AsyncByteStream):
    """The response body, read straight from the connection; back to the pool once complete."""

    def __init__(
        self, transport: LeanTransport, connection: _Connection, headers: dict[str, str],
        read_timeout: float | None, *, empty: bool, keep_alive: bool,
    ) -> None:
        self._transport = transport
        self._connection: _Connection | None = connection
        self._timeout = read_timeout
        self._keep_alive = keep_alive
        self._chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        length = headers.get("content-length")
        self._length = None
        if not self._chunked and length is not None:
            if not length.strip().isdigit():
                raise httpx.RemoteProtocolError("malformed content-length")
            self._length = int(length)
        self._complete = empty or self._length == 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        connection = self._connection
        if connection is None or self._complete:
            return
        if self._chunked:
            async for chunk in self._chunks(connection):
                yield chunk
        elif self._length is not None:
            async for chunk in self._sized(connection, self._length):
                yield chunk
        else:
            async for chunk in self._until_close(connection):
                yield chunk
        self._complete = True

    async def _chunks(self, connection: _Connection) -> AsyncIterator[bytes]:
        buffer = connection.buffer
        while True:
            line_end = buffer.find(b"\r\n")
            if line_end < 0:
                await self._fill(connection)
                continue
            try:
                size = int(bytes(buffer[:line_end]).split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise httpx.RemoteProtocolError("malformed chunk size") from None
            if size == 0:
                # The last chunk; trailers, if any, end with an empty line.
                while not (buffer[line_end + 2:line_end + 4] == b"\r\n"
                           or buffer.find(b"\r\n\r\n", line_end) >= 0):
                    await self._fill(connection)
                end = line_end + 4 if buffer[line_end + 2:line_end + 4] == b"\r\n" \
                    else buffer.find(b"\r\n\r\n", line_end) + 4
                del buffer[:end]
                return
            need = line_end + 2 + size + 2
            while len(buffer) < need:
                await self._fill(connection)
            if buffer[need - 2:need] != b"\r\n":
                raise httpx.RemoteProtocolError("malformed chunk")
            chunk = bytes(buffer[line_end + 2:need - 2])
            del buffer[:need]
            yield chunk

    async def _sized(self, connection: _Connection, length: int) -> AsyncIterator[bytes]:
        buffer = connection.buffer
        if buffer:
            chunk = bytes(buffer[:length])
            del buffer[:length]
            length -= len(chunk)
            yield chunk
        while length > 0:
            data = await connection.receive(self._timeout)
            if not data:
                raise httpx.RemoteProtocolError("connection closed before the body's end")
            if len(data) > length:  # more than announced: never reuse this connection
                self._keep_alive = False
                data = data[:length]
            length -= len(data)
            yield data

    async def _until_close(self, connection: _Connection) -> AsyncIterator[bytes]:
        self._keep_alive = False
        if connection.buffer:
            chunk = bytes(connection.buffer)
            del connection.buffer[:]
            yield chunk
        while data := await connection.receive(self._timeout):
            yield data

    async def _fill(self, connection: _Connection) -> None:
        data = await connection.receive(self._timeout)
        if not data:
            raise httpx.RemoteProtocolError("connection closed inside a chunked body")
        connection.buffer += data

    async def aclose(self) -> None:
        connection, self._connection = self._connection, None
        if connection is None:
            return
        reusable = self._complete and self._keep_alive and not connection.buffer
        if not (reusable and self._transport._release(connection)):
            await _close(connection)


async def _close(connection: _Connection) -> None:
    with trio.CancelScope(shield=True):
        await trio.aclose_forcefully(connection.stream)


def _request_bytes(request: httpx.Request, body: bytes) -> bytes:
    lines = [b"%s %s HTTP/1.1" % (request.method.encode("ascii"), request.url.raw_path)]
    for name, value in request.headers.raw:
        # A value with a line break would smuggle headers (a user's key is data, not trusted).
        if any(bad in name or bad in value for bad in _FORBIDDEN_IN_HEADERS) or b":" in name:
            raise httpx.LocalProtocolError(f"invalid character in header {name.decode('latin-1')!r}")
        lines.append(b"%s: %s" % (name, value))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def _parse_head(raw_head: bytes) -> tuple[bytes, int, list[tuple[bytes, bytes]]]:
    lines = raw_head.split(b"\r\n")
    try:
        version, status_text = lines[0].split(b" ", 2)[:2]
        status = int(status_text)
    except ValueError:
        raise httpx.RemoteProtocolError("malformed status line") from None
    if not version.startswith(b"HTTP/1."):
        raise httpx.RemoteProtocolError("not an HTTP/1.x response")
    headers = []
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon:
            raise httpx.RemoteProtocolError("malformed header line")
        headers.append((name.strip(), value.strip()))
    return version, status, headers


class LeanTransport(httpx.AsyncBaseTransport):
    def __init__(self, *, max_idle_per_host: int = 100, ssl_context: ssl.SSLContext | None = None) -> None:
        self.max_idle_per_host = max_idle_per_host
        self._idle: dict[Key, list[_Connection]] = {}
        self._ssl = ssl_context or ssl.create_default_context()

    async def aclose(self) -> None:
        idle, self._idle = self._idle, {}
        for connections in idle.values():
            for connection in connections:
                await _close(connection)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeouts: dict[str, Any] = request.extensions.get("timeout", {})
        url = request.url
        if url.scheme not in ("http", "https"):
            raise httpx.UnsupportedProtocol(f"unsupported URL scheme {url.scheme!r}")
        key = (url.scheme, url.host, url.port or (443 if url.scheme == "https" else 80))
        try:
            body = request.content
        except httpx.RequestNotRead:
            body = b"".join([part async for part in request.stream])  # type: ignore[union-attr]
        data = _request_bytes(request, body)
        # A pooled connection may have been closed by the server meanwhile: one retry on a new
        # connection, and only when not a byte of a response came back.
        for reused in (True, False):
            connection = self._take(key) if reused else await self._connect(key, timeouts.get("connect"))
            if connection is None:
                continue
            try:
                version, status, raw_headers = await self._exchange(connection, data, timeouts)
            except (httpx.ReadError, httpx.WriteError, _ClosedBeforeResponse):
                await _close(connection)
                if reused and not connection.buffer:
                    continue  # a stale pooled connection: once more on a new one
                raise
            except BaseException:
                await _close(connection)
                raise
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in raw_headers}
            connection_header = headers.get("connection", "").lower()
            keep_alive = (
                "close" not in connection_header
                if version == b"HTTP/1.1" else "keep-alive" in connection_header
            )
            empty = request.method == "HEAD" or status in (204, 304)
            try:
                stream = _Body(self, connection, headers, timeouts.get("read"),
                               empty=empty, keep_alive=keep_alive)
            except BaseException:
                await _close(connection)
                raise
            return httpx.Response(
                status, headers=raw_headers, stream=stream,
                extensions={"http_version": version},
            )
        raise AssertionError("not reached: the second try connects or raises")

    async def _exchange(
        self, connection: _Connection, data: bytes, timeouts: dict[str, Any]
    ) -> tuple[bytes, int, list[tuple[bytes, bytes]]]:
        with trio.move_on_after(_seconds(timeouts.get("write"))) as scope:
            try:
                await connection.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise httpx.WriteError(str(exc) or type(exc).__name__) from exc
        if scope.cancelled_caught:
            raise httpx.WriteTimeout("sending the request timed out")
        while True:  # skip interim responses (100 Continue, 103 Early Hints)
            version, status, headers = _parse_head(await connection.read_head(timeouts.get("read")))
            if not 100 <= status < 200 or status == 101:
                return version, status, headers

    def _take(self, key: Key) -> _Connection | None:
        idle = self._idle.get(key)
        return idle.pop() if idle else None

    def _release(self, connection: _Connection) -> bool:
        """Back to the idle pool; False when the pool is full (the caller closes it)."""
        idle = self._idle.setdefault(connection.key, [])
        if len(idle) >= self.max_idle_per_host:
            return False
        idle.append(connection)
        return True

    async def _connect(self, key: Key, timeout: float | None) -> _Connection:
        scheme, host, port = key
        try:
            with trio.fail_after(_seconds(timeout)):
                if scheme == "https":
                    ssl_stream = await trio.open_ssl_over_tcp_stream(
                        host, port, ssl_context=self._ssl, https_compatible=True
                    )
                    await ssl_stream.do_handshake()
                    stream: trio.abc.Stream = ssl_stream
                else:
                    stream = await trio.open_tcp_stream(host, port)
        except trio.TooSlowError as exc:
            raise httpx.ConnectTimeout("connecting timed out") from exc
        except (OSError, trio.BrokenResourceError, ssl.SSLError) as exc:
            raise httpx.ConnectError(str(exc) or type(exc).__name__) from exc
        return _Connection(stream, key)


def _seconds(timeout: float | None) -> float:
    return float("inf") if timeout is None else timeout
