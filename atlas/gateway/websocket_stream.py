"""Hypercorn's WebSocket stream, made to end broken connections as RFC 6455 asks.

Two upstream defects of Hypercorn 0.18's ``WSStream`` (``hypercorn/protocol/ws_stream.py``),
both fixed by one subclass installed once in place of the class, in the modules that build it
(``hypercorn.protocol.h11`` and ``.h2`` import it by name), as ``atlas.http_server`` patches
``TCPServer``. The gateway installs it before it serves (it is the one server with WebSockets);
``ATLAS_WS_PING_INTERVAL_SECONDS`` reaches Hypercorn's ``websocket_ping_interval`` through
``atlas.http_server.serve_asgi``.

- **A frame wsproto cannot parse is dropped without a close frame.** On a text frame that is
  not UTF-8 (or any other protocol violation) wsproto's ``events()`` yields a
  ``CloseConnection`` with the code to fail the connection with (1007, or 1002) while its own
  state stays ``OPEN``; Hypercorn answers only a close the peer sent (state
  ``REMOTE_CLOSING``), so it closed the TCP connection with no close frame and the client saw
  1006. RFC 6455 7.1.7 and 8.1 ask for a close frame with that code first. Reproduction: any
  app that accepts a WebSocket; send the masked text frame ``{"type":"ping"}`` followed by the
  byte ``0xff``: the connection ends without a close frame.
- **Pings are sent, their answers never looked at.** ``websocket_ping_interval`` makes Hypercorn
  ping every interval, but a peer that answers none (a half-open connection: the client's
  machine or network is gone, no FIN, no RST) is kept for as long as TCP keeps it, which with
  nothing to send is forever. Here a peer that has not answered a ping by the time the next
  one is due is closed with 1011 (as the ``websockets`` library does on a keep-alive timeout)
  and its TCP connection ended. Any pong counts (RFC 6455 5.5.3 allows unsolicited ones).
  Hypercorn's ping loop also slept on after the stream closed, keeping the connection's tasks
  for up to an interval; it now ends with the stream.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

import trio
from hypercorn.protocol.events import StreamClosed
from hypercorn.protocol.ws_stream import FrameTooLargeError, WSStream
from wsproto.connection import ConnectionState
from wsproto.events import CloseConnection, Message, Ping, Pong
from wsproto.frame_protocol import CloseReason

from atlas.protocol import CLOSE_INTERNAL

log = logging.getLogger("atlas.http")

CLOSE_PING_TIMEOUT = CLOSE_INTERNAL  # as the websockets library closes on a keep-alive timeout
PING_TIMEOUT_REASON = "keepalive ping timeout"


class CheckedWSStream(WSStream):
    atlas_checks_liveness = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ping_unanswered = False
        self.pinger = trio.CancelScope()  # cancelled when the stream closes

    async def handle(self, event: Any) -> None:
        if isinstance(event, StreamClosed):
            self.pinger.cancel()
        await super().handle(event)

    async def _handle_events(self) -> None:
        # Upstream's loop, plus pongs and parse failures.
        for event in self.connection.events():
            if isinstance(event, Message):
                try:
                    self.buffer.extend(event)
                except FrameTooLargeError:
                    await self._send_wsproto_event(CloseConnection(code=CloseReason.MESSAGE_TOO_BIG))
                    break
                if event.message_finished:
                    await self.app_put(self.buffer.to_message())
                    self.buffer.clear()
            elif isinstance(event, Ping):
                await self._send_wsproto_event(event.response())
            elif isinstance(event, Pong):
                self.ping_unanswered = False
            elif isinstance(event, CloseConnection):
                if self.connection.state == ConnectionState.REMOTE_CLOSING:
                    await self._send_wsproto_event(event.response())
                elif self.connection.state == ConnectionState.OPEN:
                    # Not the peer's close (that moves wsproto out of OPEN) but a frame it could
                    # not parse: fail the connection with the code wsproto chose.
                    reason = (event.reason or "")[:120]
                    await self._send_wsproto_event(CloseConnection(code=event.code, reason=reason))
                await self.send(StreamClosed(stream_id=self.stream_id))
                break

    async def _send_pings(self) -> None:
        interval = self.config.websocket_ping_interval
        with self.pinger:
            while True:
                await trio.sleep(interval)
                if self.ping_unanswered:
                    # A pong may be waiting in the socket while this task woke first (after a
                    # stall of the whole process, both become runnable together): let the
                    # connection's reader run a few times before calling the peer gone.
                    for _ in range(3):
                        await trio.lowlevel.checkpoint()
                if self.ping_unanswered:
                    break
                self.ping_unanswered = True
                # Returns once the ping is written: the peer then has a whole interval.
                await self._send_wsproto_event(Ping())
        if self.pinger.cancelled_caught or self.closed:
            return
        # Outside the pinger's scope: closing the stream cancels it, and the close must finish.
        log.info("a WebSocket client at %s answered no ping within %s s; closed with %d",
                 _address(self.client), interval, CLOSE_PING_TIMEOUT)
        await self._send_wsproto_event(CloseConnection(code=CLOSE_PING_TIMEOUT, reason=PING_TIMEOUT_REASON))
        await self.send(StreamClosed(stream_id=self.stream_id))


def close_broken_websockets() -> None:
    """Install ``CheckedWSStream`` where Hypercorn builds its WebSocket streams (once)."""
    for name in ("hypercorn.protocol.h11", "hypercorn.protocol.h2"):
        module = importlib.import_module(name)
        if not getattr(module.WSStream, "atlas_checks_liveness", False):
            module.WSStream = CheckedWSStream


def _address(client: tuple[str, int] | None) -> str:
    return f"{client[0]}:{client[1]}" if client else "an unknown address"
