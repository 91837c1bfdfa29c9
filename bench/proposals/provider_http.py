"""PROPOSAL (not used by Atlas): a lean HTTP/1.1 transport for provider calls, as an httpx transport.

Why: reading a provider's SSE stream through httpcore costs ~105-120 µs of CPU per delta on the
bench machine (async-generator layers, h11 events, a ``fail_after`` per read); this transport's
reader costs ~60-70 µs through ``httpx.Response`` (~45-55 µs read directly), and a bare trio
``receive_some`` loop alone ~37-42 µs (the floor), all at 250 streams x 30 deltas/s.
Measured with ``python -m bench.proposals.read_path`` and end to end with ``python -m bench``
(see docs/benchmarks.md, "Proposals").

Drop-in: it is an ``httpx.AsyncBaseTransport``. ``atlas.provider.open_provider_transport()``
returns ``LeanTransport()`` (or, before that refactor, ``httpx.AsyncClient(transport=
LeanTransport(), ...)``), and nothing else changes: requests are ``httpx.Request`` (timeouts from
the request's ``timeout`` extension, as httpcore reads them), responses are ``httpx.Response``
with a streamed body, and failures are httpx's exception types, so ``transport_error`` maps them
unchanged: connect failures ``httpx.ConnectError``/``ConnectTimeout``, no byte for the read timeout
``httpx.ReadTimeout``, a broken connection ``httpx.ReadError``, a malformed response
``httpx.RemoteProtocolError``.

What it does: HTTP/1.1 only, keep-alive connections per (scheme, host, port) with a bounded idle
pool (a pooled connection the server closed meanwhile is retried once on a new one), TLS for
https with the default trust store and hostname checks, ``content-length``, ``chunked`` and
close-delimited bodies. No proxies, redirects, cookies or environment, none of which provider
calls use (``trust_env=False`` today).
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


class _Connection:
    __slots__ = ("stream", "key", "buffer")

    def __init__(self, stream: trio.abc.Stream, key: Key) -> None:
        self.stream = stream
        self.key = key
        self.buffer = bytearray()

    async def receive(self, timeout: float | None) -> bytes:
        with trio.move_on_after(float("inf") if timeout is None else timeout) as scope:
            try:
                return await self.stream.receive_some(READ_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise httpx.ReadError(str(exc) or type(exc).__name__) from exc
        assert scope.cancelled_caught
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
                raise httpx.RemoteProtocolError("connection closed before the response head")
            self.buffer += data


class _Body(httpx.AsyncByteStream):
    """The response body, read straight from the connection; back to the pool once complete."""

    def __init__(self, transport: LeanTransport, connection: _Connection, headers: dict[str, str],
                 read_timeout: float | None, empty: bool) -> None:
        self._transport = transport
        self._connection: _Connection | None = connection
        self._timeout = read_timeout
        self._keep_alive = headers.get("connection", "").lower() != "close"
        self._chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        length = headers.get("content-length")
        self._length = None if self._chunked or length is None else int(length)
        self._complete = empty or self._length == 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        connection = self._connection
        if connection is None or self._complete:
            return
        buffer, timeout = connection.buffer, self._timeout
        if self._chunked:
            while True:
                line_end = buffer.find(b"\r\n")
                if line_end < 0:
                    await self._fill(connection)
                    continue
                try:
                    size = int(bytes(buffer[:line_end]).split(b";", 1)[0], 16)
                except ValueError:
                    raise httpx.RemoteProtocolError("malformed chunk size") from None
                if size == 0:
                    # The last chunk; trailers, if any, end with an empty line.
                    while True:
                        rest = buffer[line_end + 2:]
                        if rest.startswith(b"\r\n") or rest.find(b"\r\n\r\n") >= 0:
                            break
                        await self._fill(connection)
                    del buffer[:]
                    self._complete = True
                    return
                need = line_end + 2 + size + 2
                while len(buffer) < need:
                    await self._fill(connection)
                chunk = bytes(buffer[line_end + 2:line_end + 2 + size])
                del buffer[:need]
                yield chunk
        elif self._length is not None:
            left = self._length
            if buffer:
                chunk = bytes(buffer[:left])
                del buffer[:left]
                left -= len(chunk)
                yield chunk
            while left > 0:
                data = await connection.receive(timeout)
                if not data:
                    raise httpx.RemoteProtocolError("connection closed before the body's end")
                left -= len(data)
                yield data[: len(data) + min(0, left)]
            self._complete = True
        else:  # close-delimited
            self._keep_alive = False
            if buffer:
                chunk = bytes(buffer)
                del buffer[:]
                yield chunk
            while data := await connection.receive(timeout):
                yield data
            self._complete = True

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
        scheme = url.scheme
        port = url.port or (443 if scheme == "https" else 80)
        key = (scheme, url.host, port)
        try:
            body = request.content
        except httpx.RequestNotRead:
            body = b"".join([part async for part in request.stream])  # type: ignore[union-attr]
        head = [b"%s %s HTTP/1.1" % (request.method.encode(), url.raw_path)]
        head += [b"%s: %s" % (name, value) for name, value in request.headers.raw]
        data = b"\r\n".join(head) + b"\r\n\r\n" + body
        # A pooled connection may have been closed by the server meanwhile: one retry on a new one.
        for reused in (True, False):
            connection = self._take(key) if reused else await self._connect(key, timeouts.get("connect"))
            if connection is None:
                continue
            try:
                with trio.move_on_after(_seconds(timeouts.get("write"))) as scope:
                    await connection.stream.send_all(data)
                if scope.cancelled_caught:
                    raise httpx.WriteTimeout("sending the request timed out")
                raw_head = await connection.read_head(timeouts.get("read"))
            except (httpx.ReadError, httpx.RemoteProtocolError, trio.BrokenResourceError,
                    trio.ClosedResourceError, OSError) as exc:
                await _close(connection)
                if reused:
                    continue
                if isinstance(exc, httpx.TransportError):
                    raise
                raise httpx.WriteError(str(exc) or type(exc).__name__) from exc
            except BaseException:
                await _close(connection)
                raise
            lines = raw_head.split(b"\r\n")
            try:
                status = int(lines[0].split(b" ", 2)[1])
            except (IndexError, ValueError):
                await _close(connection)
                raise httpx.RemoteProtocolError("malformed status line") from None
            raw_headers = []
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                raw_headers.append((name.strip(), value.strip()))
            lookup = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in raw_headers}
            empty = request.method == "HEAD" or status in (204, 304) or 100 <= status < 200
            return httpx.Response(
                status, headers=raw_headers,
                stream=_Body(self, connection, lookup, timeouts.get("read"), empty),
                extensions={"http_version": b"HTTP/1.1"},
            )
        raise httpx.ConnectError("no connection")  # not reached: the second try connects

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
