"""Serving an ASGI app with Hypercorn's trio worker, the one way every Atlas listener starts.

Hypercorn's access log is off: request lines carry ``?token=`` query strings, and a token must
never reach a log. Errors still go to the ``atlas.http`` logger.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from atlas.config import Bind

ASGIApp = Callable[[dict[str, Any], Callable[..., Awaitable[Any]], Callable[..., Awaitable[Any]]], Awaitable[None]]

log = logging.getLogger("atlas.http")


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


def hypercorn_config(
    bind: Bind, *, max_message_bytes: int = 1024 * 1024, graceful_seconds: float = 5.0
) -> Config:
    decline_permessage_deflate()
    config = Config()
    config.bind = [str(bind)]
    config.accesslog = None
    config.errorlog = log
    config.graceful_timeout = graceful_seconds
    # Hypercorn itself closes an oversized message with 1009, before it is buffered whole.
    config.websocket_max_message_size = max_message_bytes
    config.keep_alive_timeout = 75
    config.include_server_header = False
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
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` until ``shutdown_trigger`` returns or the caller is cancelled. Reports the
    local base URL (``http://host:port``, the real port when ``bind.port`` is 0) once listening.
    Unless ``app_handles_lifespan``, the lifespan protocol is answered for the app."""
    if not app_handles_lifespan:
        app = with_lifespan(app)
    config = hypercorn_config(
        bind, max_message_bytes=max_message_bytes, graceful_seconds=graceful_seconds
    )

    async def run_hypercorn(*, task_status: trio.TaskStatus[list[str]]) -> None:
        await serve(app, config, shutdown_trigger=shutdown_trigger, task_status=task_status)

    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(run_hypercorn)
        task_status.started(local_url(binds[0]))
