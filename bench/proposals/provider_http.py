"""PROPOSAL (not used by Atlas): a lean HTTP/1.1 client for provider calls, a drop-in for the
subset of ``httpx.AsyncClient`` that ``atlas.provider.ProviderClient`` uses.

Why: reading a provider's SSE stream through httpx/httpcore costs ~115 µs of CPU per delta on the
bench machine (6 async-generator layers, h11 events and a ``fail_after`` per read); this reader
costs ~50 µs (a bare trio ``receive_some`` loop alone costs ~38 µs). Measured with
``bench/proposals/read_path.py`` and end to end with ``python -m bench`` (see docs/benchmarks.md).

What it keeps: keep-alive connections per (scheme, host, port), a bounded idle pool, TLS for
https (the system trust store, hostname checked), ``content-length``, ``chunked`` and
close-delimited bodies, and httpx's exception types, so ``atlas.provider``'s error mapping
(``transport_error``) works unchanged: connect failures are ``httpx.ConnectError``, no byte for
``read_timeout`` seconds is ``httpx.ReadTimeout``, a broken connection is ``httpx.ReadError``.
No proxies, redirects, cookies or environment (``open_http_client`` turns them off anyway).

Use: in ``atlas/provider.py``, ``open_http_client`` returns
``LeanClient(connect_timeout=5.0, read_timeout=settings.provider_timeout)``.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import trio

MAX_HEAD = 64 * 1024
READ_SIZE = 65536


class _Url:
    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.scheme = parts.scheme
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        default = (self.scheme == "https" and self.port == 443) or (self.scheme == "http" and self.port == 80)
        self.authority = self.host if default else f"{self.host}:{self.port}"


class LeanRequest:
    def __init__(self, method: str, url: str, content: bytes, headers: dict[str, str]) -> None:
        self.method = method
        self.url = _Url(url)
        self.content = content
        self.headers = headers


class _Headers(dict):  # lower-case names
    def get(self, name: str, default: Any = None) -> Any:  # type: ignore[override]
        return super().get(name.lower(), default)


class _Connection:
    def __init__(self, stream: trio.abc.Stream, key: tuple[str, str, int]) -> None:
        self.stream = stream
        self.key = key
        self.buffer = bytearray()

    async def receive(self, timeout: float) -> bytes:
        with trio.move_on_after(timeout) as scope:
            try:
                data = await self.stream.receive_some(READ_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise httpx.ReadError(str(exc) or type(exc).__name__) from exc
        if scope.cancelled_caught:
            raise httpx.ReadTimeout("no byte from the provider in time")
        return data

    async def read_head(self, timeout: float) -> bytes:
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


class LeanResponse:
    def __init__(self, client: LeanClient, connection: _Connection, status: int, headers: _Headers,
                 method: str) -> None:
        self._client = client
        self._connection: _Connection | None = connection
        self.status_code = status
        self.headers = headers
        self._complete = False
        self._keep_alive = headers.get("connection", "").lower() != "close"
        self._chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        length = headers.get("content-length")
        self._length = int(length) if length is not None and not self._chunked else None
        if method == "HEAD" or status in (204, 304) or self._length == 0:
            self._complete = True
            self._length = 0

    async def aiter_bytes(self) -> AsyncIterator[bytes]:
        connection = self._connection
        if connection is None or self._complete:
            return
        timeout = self._client.read_timeout
        buffer = connection.buffer
        if self._chunked:
            while True:
                line_end = buffer.find(b"\r\n")
                if line_end < 0:
                    data = await connection.receive(timeout)
                    if not data:
                        raise httpx.RemoteProtocolError("connection closed inside a chunked body")
                    buffer += data
                    continue
                size = int(bytes(buffer[:line_end]).split(b";", 1)[0], 16)
                if size == 0:
                    # Trailers (none expected) end with an empty line.
                    while buffer.find(b"\r\n", line_end + 2) < 0 and not buffer.endswith(b"\r\n\r\n"):
                        data = await connection.receive(timeout)
                        if not data:
                            break
                        buffer += data
                    del buffer[:]
                    self._complete = True
                    return
                need = line_end + 2 + size + 2
                while len(buffer) < need:
                    data = await connection.receive(timeout)
                    if not data:
                        raise httpx.RemoteProtocolError("connection closed inside a chunk")
                    buffer += data
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
            while True:
                data = await connection.receive(timeout)
                if not data:
                    break
                yield data
            self._complete = True

    async def aread(self) -> bytes:
        return b"".join([chunk async for chunk in self.aiter_bytes()])

    async def aclose(self) -> None:
        connection, self._connection = self._connection, None
        if connection is None:
            return
        reusable = self._complete and self._keep_alive and not connection.buffer
        if not (reusable and self._client._release(connection)):
            await self._client._discard(connection)


class LeanClient:
    def __init__(self, *, connect_timeout: float = 5.0, read_timeout: float = 60.0,
                 max_idle_per_host: int = 100) -> None:
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.max_idle_per_host = max_idle_per_host
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self._ssl = ssl.create_default_context()

    async def __aenter__(self) -> LeanClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        idle, self._idle = self._idle, {}
        with trio.CancelScope(shield=True):
            for connections in idle.values():
                for connection in connections:
                    await trio.aclose_forcefully(connection.stream)

    def build_request(self, method: str, url: str, *, content: bytes = b"",
                      headers: dict[str, str] | None = None) -> LeanRequest:
        return LeanRequest(method, url, content, dict(headers or {}))

    async def send(self, request: LeanRequest, *, stream: bool = True) -> LeanResponse:
        url = request.url
        head = [f"{request.method} {url.target} HTTP/1.1", f"Host: {url.authority}"]
        head += [f"{name}: {value}" for name, value in request.headers.items()]
        head.append(f"Content-Length: {len(request.content)}")
        data = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + request.content
        key = (url.scheme, url.host, url.port)
        # A pooled connection may have been closed by the server meanwhile: one retry on a new one.
        for reused in (True, False):
            connection = self._take(key) if reused else await self._connect(key)
            if connection is None:
                continue
            try:
                await connection.stream.send_all(data)
                raw_head = await connection.read_head(self.read_timeout)
            except (httpx.ReadError, httpx.RemoteProtocolError, trio.BrokenResourceError,
                    trio.ClosedResourceError, OSError) as exc:
                await self._discard(connection)
                if reused:
                    continue
                raise httpx.ReadError(str(exc) or type(exc).__name__) from exc
            except BaseException:
                await self._discard(connection)
                raise
            lines = raw_head.decode("latin-1").split("\r\n")
            try:
                status = int(lines[0].split(" ", 2)[1])
            except (IndexError, ValueError):
                await self._discard(connection)
                raise httpx.RemoteProtocolError("malformed status line") from None
            headers = _Headers()
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            return LeanResponse(self, connection, status, headers, request.method)
        raise httpx.ConnectError("no connection")  # not reached

    def _take(self, key: tuple[str, str, int]) -> _Connection | None:
        idle = self._idle.get(key)
        return idle.pop() if idle else None

    def _release(self, connection: _Connection) -> bool:
        """Back to the idle pool; False when the pool is full (the caller closes it)."""
        idle = self._idle.setdefault(connection.key, [])
        if len(idle) >= self.max_idle_per_host:
            return False
        idle.append(connection)
        return True

    async def _discard(self, connection: _Connection) -> None:
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(connection.stream)

    async def _connect(self, key: tuple[str, str, int]) -> _Connection:
        scheme, host, port = key
        try:
            with trio.fail_after(self.connect_timeout):
                if scheme == "https":
                    stream: trio.abc.Stream = await trio.open_ssl_over_tcp_stream(
                        host, port, ssl_context=self._ssl, https_compatible=True
                    )
                    await stream.do_handshake()  # type: ignore[attr-defined]
                else:
                    stream = await trio.open_tcp_stream(host, port)
        except trio.TooSlowError as exc:
            raise httpx.ConnectTimeout("connecting to the provider timed out") from exc
        except (OSError, trio.BrokenResourceError, ssl.SSLError) as exc:
            raise httpx.ConnectError(str(exc) or type(exc).__name__) from exc
        return _Connection(stream, key)
