"""Serving an ASGI app with Hypercorn's trio worker, the one way every Atlas listener starts.

Hypercorn's access log is off: request lines carry ``?token=`` query strings, and a token must
never reach a log. Errors still go to the ``atlas.http`` logger.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.events import Closed, RawData, Updated
from hypercorn.protocol.ws_stream import WSStream
from hypercorn.trio import serve
from hypercorn.trio.tcp_server import MAX_RECV

from atlas.config import Bind
from atlas.deadlines import DeadlineWatch, socket_of

ASGIApp = Callable[[dict[str, Any], Callable[..., Awaitable[Any]], Callable[..., Awaitable[Any]]], Awaitable[None]]

log = logging.getLogger("atlas.http")

CLOSE_LOCK_SECONDS = 1.0


class _NoRunningOnLines(logging.Filter):
    """Hypercorn announces every listener ("Running on ... CTRL + C to quit"), internal ones
    included; Atlas says itself what it listens on, in its own words."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Running on ")


log.addFilter(_NoRunningOnLines())


def decline_permessage_deflate() -> None:
    """Make Hypercorn decline the WebSocket permessage-deflate extension.

    Hypercorn accepts it whenever a client offers it, and every browser does; wsproto then keeps
    a zlib compressor (window 2^15, memLevel 8) per connection from its first frame on: ~95 KiB
    of RSS per idle browser connection on the bench's idle scenario (32 KiB without), and a
    compress call per frame. Atlas's frames are small JSON, where compression saves little, so
    the offer is declined and frames go uncompressed, which every client accepts (RFC 7692).
    Hypercorn has no setting for this: its handshake builds ``PerMessageDeflate()`` from its
    module's global, which is replaced once by a subclass that accepts no offer."""
    ws_stream = importlib.import_module("hypercorn.protocol.ws_stream")
    extension = getattr(ws_stream, "PerMessageDeflate", None)
    if extension is None or getattr(extension, "atlas_declines", False):
        return

    class DeclinedPerMessageDeflate(extension):  # type: ignore[misc, valid-type]
        atlas_declines = True

        def accept(self, offer: str) -> None:
            return None

    ws_stream.PerMessageDeflate = DeclinedPerMessageDeflate


class KeepAliveTimer:
    """Hypercorn's keep-alive timer (its ``TrioSingleTask``), as a deadline the listener's
    ``DeadlineWatch`` keeps. Upstream starts a task for every idle period and cancels it at the
    next request: a ``nursery.start`` and a cancellation per HTTP request, and two per WebSocket
    connection (~6% of a proxied request's CPU). Once the deadline passes, the watch marks the
    timer (``timed_out``: the connection's read loop stops at its next turn) and ends the read it
    is blocked in (``notify_closing``), and the connection closes as upstream's timer closes it.
    A server shutting down ends every idle connection at the watch's next tick, as upstream's
    timer did at once."""

    def __init__(self, server: Any, watch: DeadlineWatch) -> None:
        self._server = server
        self._watch = watch
        self._deadline = math.inf
        self.timed_out = False

    @property
    def socket(self) -> trio.socket.SocketType:
        return socket_of(self._server.stream)

    @property
    def deadline(self) -> float:
        if self._deadline < math.inf and self._server.context.terminated.is_set():
            return -math.inf
        return self._deadline

    async def restart(self, task_group: Any = None, action: Any = None) -> None:
        self._deadline = trio.current_time() + self._server.config.keep_alive_timeout
        self._watch.watch(self)

    async def stop(self) -> None:
        self._deadline = math.inf
        self.timed_out = False  # a request came in time after all: reading goes on
        self._watch.unwatch(self)


def contain_connection_failures() -> None:
    """Make one connection's failure end that connection only, never the server.

    Hypercorn 0.18's trio worker runs every connection as a ``TCPServer`` task in the server's
    own nursery, so an exception escaping one connection ends the whole process. One such
    exception is a race in that class (upstream defect, reported by Atlas's issue 9 and seen as
    Hypercorn #203): ``protocol_send`` writes under ``send_lock``, but ``_close`` calls
    ``send_eof()`` without it. When a client's WebSocket close arrives and the app closes too,
    the reading task answers the client's close with ``send_all`` while the app's task, tearing
    the connection down, sits in ``send_eof``'s checkpoint: trio raises ``BusyResourceError``
    in the reading task, and the server dies.

    Changes installed once by replacing the class in ``hypercorn.trio.run`` (the worker looks it
    up there for every connection), as ``decline_permessage_deflate`` does:
    ``_close`` takes the send lock like every other write (so the race cannot happen), ``run``
    logs and contains any ``Exception`` of its connection (so whatever else Hypercorn or the app
    raises costs that connection only; cancellation still propagates), a write that a client
    leaves unread for ``write_timeout`` seconds ends that connection (Hypercorn shields its writes
    from cancellation, so a client that stopped reading held its socket, its task and every
    frame queued for it for as long as TCP kept the connection up; the listener's
    ``DeadlineWatch`` ends it, rather than a timed cancel scope per frame, which cost ~7 us a
    frame), and the keep-alive timer stops once reading has ended and is restarted after a reply
    even when the app cancelled its work (both upstream defects too: ``_read_data`` and
    ``_update_keep_alive_timer``, below). For speed: a WebSocket frame the socket takes whole
    is written with one system call (``protocol_send``), and the keep-alive timer is a deadline
    (``KeepAliveTimer``), not a task per idle period."""
    run_module = importlib.import_module("hypercorn.trio.run")
    base = getattr(run_module, "TCPServer")
    if getattr(base, "atlas_contains_failures", False):
        return

    class ContainedTCPServer(base):  # type: ignore[misc, valid-type]
        atlas_contains_failures = True
        atlas_reading_ended = False  # set per connection by _read_data
        deadline = math.inf  # of the write in progress (the listener's ``DeadlineWatch``)
        timed_out = False  # set by that watch when it ended a write
        atlas_socket: Any = None  # a plain TCP socket, for the direct write of ``protocol_send``

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            # The config is ``hypercorn_config``'s, which installs this class.
            self.idle_task = KeepAliveTimer(self, self.config.atlas_idle_watch)

        @property
        def socket(self) -> trio.socket.SocketType:
            return socket_of(self.stream)

        async def run(self) -> None:
            # A plain TCP socket is written to directly (``protocol_send``); TLS goes through
            # its stream as upstream does.
            self.atlas_socket = self.stream.socket if isinstance(self.stream, trio.SocketStream) else None
            watch: DeadlineWatch | None = self.config.atlas_write_watch  # None: no write timeout
            if watch is not None:
                watch.watch(self)
            try:
                await super().run()
            except* Exception as failures:
                peer = _peer_of(self.stream)
                log.error(
                    "connection from %s failed and was dropped; the server goes on", peer,
                    exc_info=failures,
                )
            finally:
                if watch is not None:
                    watch.unwatch(self)
                await self.idle_task.stop()

        async def _read_data(self) -> None:
            # Upstream defect (Hypercorn 0.18, trio worker): the keep-alive timer task
            # (``_idle_timeout``) runs in the connection's task group, which ``run`` waits for
            # before it closes the socket, and nothing stops it once the client is gone. A
            # connection the client closed while idle between requests (any keep-alive client
            # that hangs up), or whose request h11 refused (the timer started with the
            # connection and no request stopped it), kept its socket (in CLOSE_WAIT) and two
            # tasks for ``keep_alive_timeout``. Reproduction, with any app on
            # ``hypercorn -k trio --keep-alive 75 -b 127.0.0.1:8000 app:app``:
            #   python3 -c "import socket, time; s = socket.create_connection(('127.0.0.1', 8000));
            #     s.sendall(b'GET / HTTP/1.1\r\nHost: x\r\n\r\n'); time.sleep(0.2); s.recv(9999); s.close()"
            #   ss -tn state close-wait '( sport = :8000 )'   # the server's socket, for 75 s
            # Once reading has ended there is nothing left to time out: stop the timer, and
            # never restart it (a reply that ends after the client's EOF asks to).
            await self._read_until_done()
            self.atlas_reading_ended = True
            await self.idle_task.stop()

        async def _read_until_done(self) -> None:
            # Upstream's loop, with two changes: its ``fail_after(read_timeout or inf)`` is
            # entered only when a read timeout is set (Atlas sets none: a cancel scope per read
            # that bounds nothing costs every frame and request a client sends), and the loop
            # ends once the keep-alive timer has expired (``KeepAliveTimer``: its watch ends a
            # read it finds blocked; this ends one it did not).
            timer: KeepAliveTimer = self.idle_task
            read_timeout = self.config.read_timeout
            while not timer.timed_out:
                try:
                    if read_timeout:
                        with trio.fail_after(read_timeout):
                            data = await self.stream.receive_some(MAX_RECV)
                    else:
                        data = await self.stream.receive_some(MAX_RECV)
                except (trio.ClosedResourceError, trio.BrokenResourceError, trio.TooSlowError):
                    break
                await self.protocol.handle(RawData(data))
                if not data:
                    break
            await self.protocol.handle(Closed())

        async def protocol_send(self, event: Any) -> None:
            if isinstance(event, Updated):
                await self._update_keep_alive_timer(event)
                return
            if not isinstance(event, RawData):
                await super().protocol_send(event)
                return
            data = event.data
            lock: trio.Lock = self.send_lock
            if self.atlas_socket is not None and not lock.locked() and self._websocket():
                # The lock is taken first, without waiting (no checkpoint since it was seen
                # free), so writes keep the order they were asked in, as upstream's do; then one
                # turn of the scheduler, as upstream's write takes: the frames of every request
                # that read its provider in one turn leave together, and a client process woken
                # by the first finds the rest already there. Written at once instead, each frame
                # woke its client afresh: ~0.5 s more kernel time per 50,000 deltas on this
                # machine than the turn costs.
                lock.acquire_nowait()
                try:
                    await trio.lowlevel.cancel_shielded_checkpoint()
                    # Asked of the socket at each write: -1 once closed, never a number reused.
                    fd = self.atlas_socket.fileno()
                    # The usual WebSocket write: the socket takes the whole frame at once,
                    # with one system call, without upstream's cancel scope and ``send_all``.
                    # Only the rest of a frame the socket did not take at once (or all of it,
                    # when the socket is closed or broken: ``send_all`` says so as upstream
                    # does) waits, shielded and timed, as upstream writes.
                    try:
                        sent = os.write(fd, data) if fd >= 0 else 0
                    except OSError:  # BlockingIOError, or the peer is gone
                        sent = 0
                    if sent < len(data):
                        await self._send_rest(data[sent:])
                finally:
                    lock.release()
                return
            async with lock:
                await self._send_rest(data)

        def _websocket(self) -> bool:
            """Whether this connection is a WebSocket now: only its frames are written directly.
            HTTP replies keep upstream's write, whose turns through the scheduler let the
            connection's reading task take a request body the client sends after its head: a
            reply written with no turn at all ended before that, and Hypercorn, seeing a request
            not read to its end, closed the connection without ``Connection: close``, so the
            client's next request on it failed (found with a 401 answered before the body was
            read; ``tests/test_keep_alive.py``)."""
            protocol = getattr(self.protocol, "protocol", None)
            return isinstance(getattr(protocol, "stream", None), WSStream)

        async def _send_rest(self, data: bytes) -> None:
            """Upstream's write (callers hold the send lock): shielded, so a frame is never cut
            short by a cancellation, and timed by the listener's ``DeadlineWatch``."""
            self.deadline = trio.current_time() + self.config.atlas_write_timeout
            try:
                with trio.CancelScope(shield=True):  # shielded as upstream
                    await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                if self.timed_out:
                    log.info("a client left %s unread too long; its connection is closed",
                             _peer_of(self.stream))
                await self.protocol.handle(Closed())
            finally:
                self.deadline = math.inf

        async def _update_keep_alive_timer(self, event: Updated) -> None:
            if event.idle and self.atlas_reading_ended:
                return
            # No checkpoint, so a cancellation cannot lose the restart. Upstream's timer is a
            # task started under a lock: the end of a reply restarts it from within the app's
            # last send, after Hypercorn has already told the app ``http.disconnect``, and an
            # app that cancels its work on that message (the agent API does) cancelled the
            # restart, leaving the idle connection with no timer at all (an upstream defect:
            # under ``hypercorn -k trio --keep-alive 2``, an app that cancels its reply's nursery
            # on ``http.disconnect``; a client that sends one request and stays silent is still
            # connected 8 s later).
            await (self.idle_task.restart() if event.idle else self.idle_task.stop())

        async def _close(self) -> None:
            # Upstream's _close, with send_eof under the send lock. The wait for the lock is
            # bounded: a writer stuck on a client that stopped reading holds it (Hypercorn
            # shields its writes), and then aclose() is what ends that write.
            lock: trio.Lock = self.send_lock
            with trio.CancelScope(shield=True):
                if lock.statistics().owner is trio.lowlevel.current_task():
                    await _send_eof_quietly(self.stream)
                else:
                    with trio.move_on_after(CLOSE_LOCK_SECONDS):
                        async with lock:
                            await _send_eof_quietly(self.stream)
                await self.stream.aclose()

    run_module.TCPServer = ContainedTCPServer


async def _send_eof_quietly(stream: Any) -> None:
    try:
        await stream.send_eof()
    except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError, AttributeError):
        pass  # the peer is gone already, or a TLS stream (which has no half-close)


def _peer_of(stream: Any) -> str:
    try:
        socket = getattr(stream, "socket", None) or stream.transport_stream.socket
        host, port = socket.getpeername()[:2]
        return f"{host}:{port}"
    except (AttributeError, OSError, ValueError):
        return "an unknown peer"


def hypercorn_config(
    bind: Bind, *, max_message_bytes: int = 1024 * 1024, graceful_seconds: float = 5.0, backlog: int = 1024,
    write_timeout: float = math.inf, ws_ping_interval: float = 0.0,
) -> Config:
    decline_permessage_deflate()
    contain_connection_failures()
    config = Config()
    config.bind = [str(bind)]
    config.accesslog = None
    config.errorlog = log
    config.graceful_timeout = graceful_seconds
    # Hypercorn itself closes an oversized message with 1009, before it is buffered whole.
    config.websocket_max_message_size = max_message_bytes
    config.keep_alive_timeout = 75
    config.include_server_header = False
    # Hypercorn's default (100) dropped connections of a 2,000-client reconnect wave (SYN
    # retransmits); the kernel caps it at net.core.somaxconn in any case.
    config.backlog = backlog
    config.atlas_write_timeout = write_timeout  # read by ContainedTCPServer.protocol_send
    # Ends writes past it: checked every quarter of it, or every second.
    config.atlas_write_watch = (
        DeadlineWatch(min(1.0, write_timeout / 4), "atlas write timeouts")
        if math.isfinite(write_timeout) else None
    )
    # The keep-alive timer of every connection (``KeepAliveTimer``).
    config.atlas_idle_watch = DeadlineWatch(0.25, "atlas keep-alive timeouts")
    # Hypercorn only sends the pings; atlas.gateway.websocket_stream closes a peer that answers
    # none (the gateway, which serves the WebSockets, installs it).
    config.websocket_ping_interval = ws_ping_interval or None
    return config


def with_lifespan(app: ASGIApp) -> ASGIApp:
    """Answer the ASGI lifespan protocol for an app that has nothing to start or stop."""

    async def wrapped(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            await app(scope, receive, send)
            return
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    return wrapped


def local_url(bound: str) -> str:
    """The URL a process on this machine uses to reach a listener bound to ``bound``."""
    return bound.replace("://0.0.0.0:", "://127.0.0.1:").replace("://[::]:", "://[::1]:")


async def serve_asgi(
    app: ASGIApp,
    bind: Bind,
    *,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    max_message_bytes: int = 1024 * 1024,
    graceful_seconds: float = 5.0,
    app_handles_lifespan: bool = False,
    backlog: int = 1024,
    write_timeout: float = math.inf,
    ws_ping_interval: float = 0.0,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` until ``shutdown_trigger`` returns or the caller is cancelled. Reports the
    local base URL (``http://host:port``, the real port when ``bind.port`` is 0) once listening.
    Unless ``app_handles_lifespan``, the lifespan protocol is answered for the app."""
    if not app_handles_lifespan:
        app = with_lifespan(app)
    config = hypercorn_config(
        bind, max_message_bytes=max_message_bytes, graceful_seconds=graceful_seconds, backlog=backlog,
        write_timeout=write_timeout, ws_ping_interval=ws_ping_interval,
    )

    async def run_hypercorn(*, task_status: trio.TaskStatus[list[str]]) -> None:
        await serve(app, config, shutdown_trigger=shutdown_trigger, task_status=task_status)

    try:
        async with trio.open_nursery() as nursery:
            binds: list[str] = await nursery.start(run_hypercorn)
            task_status.started(local_url(binds[0]))
    finally:
        if config.atlas_write_watch is not None:
            config.atlas_write_watch.close()
        config.atlas_idle_watch.close()
