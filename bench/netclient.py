"""Minimal, cheap asyncio clients for the load processes: WebSocket and HTTP/1.1.

The load clients share two cores with Atlas, so they avoid every cost they can: frames are parsed
by hand from the socket's buffer (one clock read per ``data_received``, applied to every frame in
it), and client frames use the all-zero masking key (valid per RFC 6455, and masking becomes a
copy). Only what the bench needs is here: text frames, ping/pong/close, and HTTP responses with
``content-length`` or ``chunked`` bodies.
"""

from __future__ import annotations

import asyncio
import base64
import os
import time
import zlib
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import msgspec

_decode = msgspec.json.decode
ZERO_MASK = b"\x00\x00\x00\x00"


class HandshakeError(Exception):
    pass


def frame(payload: bytes, opcode: int = 1) -> bytes:
    n = len(payload)
    if n < 126:
        header = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        header = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        header = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    return header + ZERO_MASK + payload


class WebSocket(asyncio.Protocol):
    """A WebSocket client connection. Incoming text frames go to ``on_message(msg, t_recv)``
    (decoded JSON, receive time from ``time.monotonic()``), or to ``self.queue`` when no callback
    is set."""

    def __init__(self, path: str, host: str, on_message: Callable[[Any, float], None] | None = None,
                 deflate: bool = False) -> None:
        self.path = path
        self.host = host
        self.on_message = on_message
        # Offer permessage-deflate the way browsers do; server frames with RSV1 are inflated.
        self.deflate = deflate
        self.inflater: Any = None
        self.queue: asyncio.Queue[tuple[Any, float]] = asyncio.Queue()
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.handshaken = asyncio.get_running_loop().create_future()
        self.closed = asyncio.get_running_loop().create_future()
        self.close_code: int | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        key = base64.b64encode(os.urandom(16)).decode()
        extensions = "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n" if self.deflate else ""
        transport.write((  # type: ignore[attr-defined]
            f"GET {self.path} HTTP/1.1\r\nHost: {self.host}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            f"{extensions}\r\n"
        ).encode())

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.handshaken.done():
            self.handshaken.set_exception(HandshakeError("connection lost during the handshake"))
        if not self.closed.done():
            self.closed.set_result(self.close_code)

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        buffer = self.buffer
        buffer += data
        if not self.handshaken.done():
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            status = bytes(buffer[:12])
            if b"permessage-deflate" in bytes(buffer[:end]).lower():
                self.inflater = zlib.decompressobj(-15)
            del buffer[:end + 4]
            if not status.startswith(b"HTTP/1.1 101"):
                self.handshaken.set_exception(HandshakeError(status.decode("latin-1")))
                self.transport.close()  # type: ignore[union-attr]
                return
            self.handshaken.set_result(None)
        pos, size = 0, len(buffer)
        while size - pos >= 2:
            b0, b1 = buffer[pos], buffer[pos + 1]
            length = b1 & 0x7F
            start = pos + 2
            if length == 126:
                if size - pos < 4:
                    break
                length = int.from_bytes(buffer[pos + 2:pos + 4], "big")
                start = pos + 4
            elif length == 127:
                if size - pos < 10:
                    break
                length = int.from_bytes(buffer[pos + 2:pos + 10], "big")
                start = pos + 10
            end = start + length
            if end > size:
                break
            opcode = b0 & 0x0F
            payload = bytes(buffer[start:end])
            if b0 & 0x40 and self.inflater is not None:
                payload = self.inflater.decompress(payload + b"\x00\x00\xff\xff")
            pos = end
            if opcode == 1:
                message = _decode(payload)
                if self.on_message is not None:
                    self.on_message(message, now)
                else:
                    self.queue.put_nowait((message, now))
            elif opcode == 9:
                self.transport.write(frame(payload, 0xA))  # type: ignore[union-attr]
            elif opcode == 8:
                self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                self.transport.close()  # type: ignore[union-attr]
                break
        del buffer[:pos]

    def send(self, payload: bytes) -> None:
        self.transport.write(frame(payload))  # type: ignore[union-attr]

    async def receive(self, timeout: float = 10.0) -> tuple[Any, float]:
        return await asyncio.wait_for(self.queue.get(), timeout)

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(frame(b"\x03\xe8", 8))
            self.transport.close()


async def open_websocket(
    url: str, on_message: Callable[[Any, float], None] | None = None, timeout: float = 10.0,
    deflate: bool = False,
) -> WebSocket:
    """Connect to ``ws://host:port/path?query`` and finish the handshake."""
    parts = urlsplit(url)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    loop = asyncio.get_running_loop()
    _, ws = await asyncio.wait_for(
        loop.create_connection(lambda: WebSocket(path, parts.netloc, on_message, deflate), parts.hostname, parts.port),
        timeout,
    )
    await asyncio.wait_for(ws.handshaken, timeout)
    return ws


class HttpConnection:
    """One keep-alive HTTP/1.1 connection, one request at a time."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    async def request(
        self, method: str, target: str, body: bytes, headers: dict[str, str] | None = None,
        on_first_body: Callable[[float], None] | None = None,
    ) -> tuple[int, bytes]:
        """Send a request and read the whole response. ``on_first_body(t)`` is called with the
        receive time of the first body bytes (the first SSE event of a stream)."""
        if self.writer is None:
            await self.connect()
        assert self.reader is not None and self.writer is not None
        head = f"{method} {target} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
        for name, value in (headers or {}).items():
            head += f"{name}: {value}\r\n"
        head += f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
        self.writer.write(head.encode() + body)
        status_line = await self.reader.readline()
        status = int(status_line.split()[1])
        length, chunked_body, keep_alive = None, False, True
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b""):
                break
            name, _, value = line.decode("latin-1").partition(":")
            name, value = name.strip().lower(), value.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "transfer-encoding" and "chunked" in value:
                chunked_body = True
            elif name == "connection" and value == "close":
                keep_alive = False
        parts: list[bytes] = []
        if chunked_body:
            first = True
            while True:
                size = int((await self.reader.readline()).split(b";")[0], 16)
                if size == 0:
                    await self.reader.readline()
                    break
                data = await self.reader.readexactly(size)
                if first and on_first_body is not None:
                    on_first_body(time.monotonic())
                first = False
                parts.append(data)
                await self.reader.readexactly(2)
        elif length is not None:
            if length:
                data = await self.reader.readexactly(length)
                if on_first_body is not None:
                    on_first_body(time.monotonic())
                parts.append(data)
        else:
            data = await self.reader.read()
            parts.append(data)
            keep_alive = False
        if not keep_alive:
            self.close()
        return status, b"".join(parts)


class SseStream(asyncio.Protocol):
    """A raw streaming POST straight to the provider, for the capacity baseline: the response is
    scanned for delta stamps (``@seconds;``) as it arrives, like the WebSocket path does."""

    def __init__(self, request: bytes, on_stamps: Callable[[bytes, float], None], done: asyncio.Future) -> None:
        self.request = request
        self.on_stamps = on_stamps
        self.done = done
        self.transport: asyncio.Transport | None = None
        self.tail = b""
        self.partial = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def start(self) -> None:
        self.transport.write(self.request)  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        data_ = self.partial + data
        cut = data_.rfind(b";") + 1
        self.partial = data_[cut:]
        if cut:
            self.on_stamps(data_[:cut], now)
        self.tail = (self.tail + data)[-16:]
        if self.tail.endswith(b"0\r\n\r\n") and not self.done.done():
            self.done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)
