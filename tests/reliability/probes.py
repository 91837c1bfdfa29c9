"""Instruments shared by the reliability probes (issue 14).

- ``LONG`` / ``scaled``: the quick size of a probe, or its long size under ``ATLAS_RELIABILITY_LONG=1``.
- ``record``: a probe's figures, appended as one JSON line to ``ATLAS_RELIABILITY_FIGURES`` when
  set (docs/reliability.md is filled from them), and printed (``pytest -s`` shows them).
- ``atlas_tasks``: the number of trio tasks of the in-process Atlas server (the subtree under its
  ``serve_atlas`` task), so that a fake provider's or a client's own tasks are never counted.
- ``rss_bytes`` / ``slope``: a subprocess server's resident memory, and a least-squares slope.
- ``RawWebSocket``: a WebSocket client on wsproto with no task of its own, so that thousands can
  be open at once, and that can stop reading, or send frames no well-behaved client library
  would (binary, invalid UTF-8).
- ``raw_http``: one HTTP/1.1 request written byte for byte (any method, path, header bytes),
  the response parsed by h11.
- ``tcp_states``: TCP connections to or from a port, by state, from ``/proc/net/tcp``.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h11
import trio
import wsproto
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Message,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)

LONG = os.environ.get("ATLAS_RELIABILITY_LONG", "") not in ("", "0")
FIGURES = os.environ.get("ATLAS_RELIABILITY_FIGURES")


def scaled(quick: Any, long: Any) -> Any:
    return long if LONG else quick


def record(probe: str, **figures: Any) -> None:
    line = {"probe": probe, "long": LONG, **figures}
    print(f"\nreliability figures: {json.dumps(line)}")
    if FIGURES:
        with open(FIGURES, "a") as out:
            out.write(json.dumps(line) + "\n")


# Trio tasks


def _tree_size(task: trio.lowlevel.Task) -> int:
    return 1 + sum(_tree_size(child) for nursery in task.child_nurseries for child in nursery.child_tasks)


def _find(task: trio.lowlevel.Task, name: str) -> trio.lowlevel.Task | None:
    if task.name == name:
        return task
    for nursery in task.child_nurseries:
        for child in nursery.child_tasks:
            if (found := _find(child, name)) is not None:
                return found
    return None


def all_tasks() -> int:
    return _tree_size(trio.lowlevel.current_root_task())


ATLAS_TASK = "atlas.gateway.server.serve_atlas"
CONNECTION_TASK = "trio._highlevel_serve_listeners._run_handler"  # one per TCP connection


def _atlas_task() -> trio.lowlevel.Task:
    task = _find(trio.lowlevel.current_root_task(), ATLAS_TASK)
    assert task is not None, f"no task named {ATLAS_TASK}"
    return task


def atlas_tasks() -> int:
    """Tasks of the in-process Atlas server (``open_atlas``, exactly one per test)."""
    return _tree_size(_atlas_task())


def atlas_connections() -> int:
    """TCP connections the in-process Atlas server is serving."""
    return task_names(_atlas_task()).count(CONNECTION_TASK)


APP_TASK = "hypercorn.trio.task_group._handle"  # an ASGI app call of a connection
KEEP_ALIVE_WATCH_TASK = "atlas keep-alive timeouts"  # atlas.http_server.KeepAliveTimer's watch


def idle_connections(port: int) -> int:
    """Connections to the in-process server listening on ``port`` that run no app and wait for
    their next request: idle keep-alive connections, whose keep-alive timer
    (``atlas.http_server.KeepAliveTimer``) is armed, i.e. watched by their listener's keep-alive
    watch (a system task; other in-process servers, a fake provider say, have theirs)."""
    total = 0

    def walk(task: trio.lowlevel.Task) -> None:
        nonlocal total
        if task.name == KEEP_ALIVE_WATCH_TASK:
            watch = task.coro.cr_frame.f_locals["self"]
            total += sum(timer.socket.getsockname()[1] == port for timer in list(watch.watched))
        for nursery in task.child_nurseries:
            for child in nursery.child_tasks:
                walk(child)

    walk(trio.lowlevel.current_root_task())
    return total


async def idle_atlas_tasks(timeout: float = 10.0) -> int:
    """The server's task count once it serves no connection (what must not grow)."""
    await wait_for(lambda: atlas_connections() == 0, timeout, "every connection gone")
    return atlas_tasks()


async def wait_for(predicate: Any, timeout: float, what: Any) -> None:
    """Poll ``predicate`` (a cheap check of state outside this process's control, such as a
    server's task count or a socket table) until true, at most ``timeout`` seconds. ``what``
    (a string, or a function giving one) says what was awaited when it fails."""
    with trio.move_on_after(timeout):
        while not predicate():
            await trio.sleep(0.01)
        return
    raise AssertionError(f"not within {timeout} s: {what() if callable(what) else what}")


# Memory of a subprocess


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def slope(samples: Sequence[tuple[float, float]]) -> float:
    """Least-squares slope of (x, y) samples."""
    n = len(samples)
    mean_x = sum(x for x, _ in samples) / n
    mean_y = sum(y for _, y in samples) / n
    var = sum((x - mean_x) ** 2 for x, _ in samples)
    return sum((x - mean_x) * (y - mean_y) for x, y in samples) / var if var else 0.0


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# TCP connections


TCP_STATES = {"01": "ESTABLISHED", "06": "TIME_WAIT", "08": "CLOSE_WAIT", "04": "FIN_WAIT1",
              "05": "FIN_WAIT2", "09": "LAST_ACK", "0A": "LISTEN", "07": "CLOSE", "0B": "CLOSING"}


def tcp_states(port: int, *, remote: bool = True) -> dict[str, int]:
    """Counts by state of the TCP connections on this machine whose remote (or, with
    ``remote=False``, local) port is ``port``: with ``remote=True``, the client sides."""
    counts: dict[str, int] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            parts = line.split()
            local, peer, state = parts[1], parts[2], parts[3]
            address = peer if remote else local
            if int(address.rsplit(":", 1)[1], 16) == port:
                name = TCP_STATES.get(state, state)
                counts[name] = counts.get(name, 0) + 1
    return counts


# A WebSocket client without tasks


class Closed(Exception):
    def __init__(self, code: int | None, reason: str = "") -> None:
        super().__init__(f"closed with {code} {reason!r}")
        self.code = code
        self.reason = reason


class Rejected(Exception):
    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"handshake rejected with HTTP {status}")
        self.status = status
        self.body = body


def frame(opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    """One client frame, masked as RFC 6455 requires, built by hand: to send what wsproto
    refuses to (a text frame that is not UTF-8)."""
    head = bytes([(0x80 if fin else 0) | opcode])
    n = len(payload)
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 1 << 16:
        head += bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", n)
    mask = os.urandom(4)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


@dataclass
class RawWebSocket:
    stream: trio.SocketStream
    ws: wsproto.WSConnection
    _pending: list[Any] = field(default_factory=list)
    _text: list[str] = field(default_factory=list)
    _bytes: list[bytes] = field(default_factory=list)
    closed: Closed | None = None
    pings_answered: int = 0  # by receive(), which answers the server's pings
    _send_lock: trio.Lock = field(default_factory=trio.Lock)  # a reader answers pings and closes

    @classmethod
    async def open(
        cls, port: int, target: str, *, headers: Sequence[tuple[bytes, bytes]] = (),
        host: str = "127.0.0.1",
    ) -> RawWebSocket:
        stream = await trio.open_tcp_stream(host, port)
        client = cls(stream, wsproto.WSConnection(wsproto.ConnectionType.CLIENT))
        try:
            await client._write(Request(host=f"{host}:{port}", target=target, extra_headers=list(headers)))
            status, body = None, b""
            while True:
                event = await client._next_event()
                if isinstance(event, AcceptConnection):
                    return client
                if isinstance(event, RejectConnection):
                    status = event.status_code
                    if not event.has_body:
                        raise Rejected(status, body)
                elif isinstance(event, RejectData):
                    body += event.data
                    if event.body_finished:
                        raise Rejected(status or 0, body)
        except BaseException:
            await client.abort()
            raise

    async def _write(self, event: Any) -> None:
        async with self._send_lock:
            await self.stream.send_all(self.ws.send(event))

    async def _next_event(self) -> Any:
        while not self._pending:
            data = await self.stream.receive_some(65536)
            self.ws.receive_data(data or None)
            self._pending.extend(self.ws.events())
            if not data and not self._pending:
                raise Closed(None, "connection ended without a close frame")
        return self._pending.pop(0)

    async def send_text(self, text: str) -> None:
        await self._write(TextMessage(data=text))

    async def send_json(self, value: Any) -> None:
        await self.send_text(json.dumps(value))

    async def send_bytes(self, data: bytes) -> None:
        await self._write(BytesMessage(data=data))

    async def send_raw(self, data: bytes) -> None:
        async with self._send_lock:
            await self.stream.send_all(data)

    async def receive(self) -> str | bytes:
        """The next whole message; ``Closed`` once the server closed."""
        if self.closed is not None:
            raise self.closed
        while True:
            event = await self._next_event()
            if isinstance(event, Ping):
                await self._write(event.response())
                self.pings_answered += 1
            elif isinstance(event, CloseConnection):
                self.closed = Closed(event.code, event.reason or "")
                try:
                    await self._write(event.response())
                except (trio.BrokenResourceError, trio.ClosedResourceError, wsproto.utilities.LocalProtocolError):
                    pass
                raise self.closed
            elif isinstance(event, Message):
                if isinstance(event, TextMessage):
                    self._text.append(event.data)
                else:
                    self._bytes.append(event.data)
                if event.message_finished:
                    if self._text:
                        text, self._text = "".join(self._text), []
                        return text
                    data, self._bytes = b"".join(self._bytes), []
                    return data

    async def receive_json(self, timeout: float = 10.0) -> dict[str, Any]:
        with trio.fail_after(timeout):
            message = await self.receive()
        assert isinstance(message, str), message
        return json.loads(message)

    async def receive_until(self, kind: str, timeout: float = 10.0) -> list[dict[str, Any]]:
        frames = []
        with trio.fail_after(timeout):
            while True:
                frames.append(await self.receive_json(timeout))
                if frames[-1]["type"] == kind:
                    return frames

    async def wait_closed(self, timeout: float = 10.0) -> int | None:
        """Read what the server sent, answering nothing (not even a ping), until its close frame
        (its code) or the end of the connection (None)."""
        with trio.fail_after(timeout):
            while True:
                try:
                    event = await self._next_event()
                except Closed:
                    return None
                if isinstance(event, CloseConnection):
                    return event.code

    async def send_close(self, code: int = 1000) -> None:
        """Start the closing handshake (for a client whose reading is done by another task)."""
        try:
            await self._write(CloseConnection(code=code))
        except (trio.BrokenResourceError, trio.ClosedResourceError, wsproto.utilities.LocalProtocolError):
            pass

    async def close(self, code: int = 1000) -> None:
        """Close politely (bounded), then drop the socket."""
        with trio.move_on_after(2):
            try:
                if self.closed is None:
                    await self._write(CloseConnection(code=code))
                    while True:
                        await self.receive()
            except (Closed, trio.BrokenResourceError, trio.ClosedResourceError,
                    wsproto.utilities.LocalProtocolError):
                pass
        await self.abort()

    async def abort(self) -> None:
        with trio.CancelScope(shield=True):
            await self.stream.aclose()


# Raw HTTP


@dataclass
class HttpReply:
    status: int
    headers: dict[bytes, bytes]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def raw_http(
    port: int, method: bytes, target: bytes, headers: Sequence[tuple[bytes, bytes]] = (),
    body: bytes = b"", *, timeout: float = 10.0,
) -> HttpReply | None:
    """Write one request exactly as given (no validation), read the response with h11. None when
    the server closed the connection without a response."""
    lines = [method + b" " + target + b" HTTP/1.1", b"host: 127.0.0.1"]
    lines += [name + b": " + value for name, value in headers]
    if body or method not in (b"GET", b"HEAD"):
        lines.append(b"content-length: " + str(len(body)).encode())
    lines.append(b"connection: close")
    raw = b"\r\n".join(lines) + b"\r\n\r\n" + body
    parser = h11.Connection(h11.CLIENT)
    # h11 must believe it sent a request before it parses a response; the bytes on the wire are
    # ours, this is only its state.
    parser.send(h11.Request(method="HEAD" if method == b"HEAD" else "GET", target="/", headers=[("host", "x")]))
    parser.send(h11.EndOfMessage())
    with trio.fail_after(timeout):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            try:
                await stream.send_all(raw)
            except trio.BrokenResourceError:
                pass  # the server answered and closed before reading everything
            status, reply_headers, chunks = 0, {}, []
            while True:
                event = parser.next_event()
                if event is h11.NEED_DATA:
                    try:
                        data = await stream.receive_some(65536)
                    except trio.BrokenResourceError:
                        data = b""
                    if not data and not status:
                        return None
                    parser.receive_data(data)
                elif isinstance(event, h11.Response):
                    status = event.status_code
                    reply_headers = {k: v for k, v in event.headers}
                elif isinstance(event, h11.Data):
                    chunks.append(event.data)
                elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                    return HttpReply(status, reply_headers, b"".join(chunks))


def task_names(task: trio.lowlevel.Task | None = None) -> list[str]:
    task = task or trio.lowlevel.current_root_task()
    names = [task.name]
    for nursery in task.child_nurseries:
        for child in nursery.child_tasks:
            names += task_names(child)
    return names


def task_stacks(task: trio.lowlevel.Task | None = None) -> list[str]:
    """Where each task of a tree is waiting (for a report of what is stuck)."""
    task = task or trio.lowlevel.current_root_task()
    where = [f"{frame_.f_code.co_name}:{lineno}" for frame_, lineno in task.iter_await_frames()]
    lines = [f"{task.name}: {' > '.join(where)}"]
    for nursery in task.child_nurseries:
        for child in nursery.child_tasks:
            lines += task_stacks(child)
    return lines


REQUEST_TASK = "atlas.rooms.Room.start_request.<locals>.run_and_release"  # one per agent request


def atlas_requests() -> int:
    """Agent requests in flight in the in-process Atlas server."""
    return task_names(_atlas_task()).count(REQUEST_TASK)
