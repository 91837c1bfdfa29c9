"""Baselines for the WebSocket side: the bare stack Atlas is built on, and nothing else.

A raw-ASGI WebSocket app served by Hypercorn's trio worker with Atlas's Hypercorn settings (or,
with ``--impl trio-websocket``, the same behaviour on plain trio-websocket). It accepts, sends
``{"type":"ready"}``, answers ``{"type":"ping"}`` with ``{"type":"pong"}``, and answers an
``agent:stream`` whose message reads ``bench deltas=N rate=R`` by producing the deltas itself,
stamped like the bench provider's (``@<CLOCK_MONOTONIC>;``), then ``agent:done``: the frames
Atlas would write, without reading a provider. What Atlas costs on top of this is what Atlas
itself adds.

Run: ``python -m bench.echo [--impl hypercorn|trio-websocket]``; prints ``ECHO http://127.0.0.1:PORT``.
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import trio

READY = '{"type":"ready"}'
PONG = '{"type":"pong"}'
SPEC = re.compile(r"(deltas|rate)=([0-9.]+)")


async def answer(text: str, send: Callable[[str], Awaitable[None]], nursery: trio.Nursery) -> None:
    if '"ping"' in text:
        await send(PONG)
    elif '"agent:stream"' in text:
        nursery.start_soon(stream, json.loads(text), send)
    else:
        await send(text)


async def stream(request: dict[str, Any], send: Callable[[str], Awaitable[None]]) -> None:
    values = dict(SPEC.findall(request.get("message", "")))
    deltas, rate = int(values.get("deltas", 8)), float(values.get("rate", 0))
    request_id = request.get("id", "r")
    await send(json.dumps({"type": "agent:start", "id": request_id, "agentId": "echo"}))
    start = trio.current_time()
    for index in range(deltas):
        if rate > 0:
            await trio.sleep_until(start + index / rate)
        await send('{"type":"agent:delta","id":%s,"text":"@%.6f;"}' % (json.dumps(request_id), time.monotonic()))
    await send(json.dumps({"type": "agent:done", "id": request_id, "text": "", "finishReason": "stop",
                           "usage": {"promptTokens": 0, "completionTokens": deltas, "totalTokens": deltas}}))


Answer = Callable[[str, Callable[[str], Awaitable[None]], trio.Nursery], Awaitable[None]]


def websocket_app(answer: Answer) -> Callable[..., Awaitable[None]]:
    """A raw-ASGI app: accepts every WebSocket, sends ``ready``, then hands each text frame to
    ``answer`` (with a send function and the connection's nursery) until the client leaves."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "websocket":
            await send({"type": "http.response.start", "status": 404, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})

        async def send_text(text: str) -> None:
            await send({"type": "websocket.send", "text": text})

        await send_text(READY)
        async with trio.open_nursery() as nursery:
            while True:
                event = await receive()
                if event["type"] != "websocket.receive":
                    nursery.cancel_scope.cancel()
                    return
                await answer(event.get("text") or "", send_text, nursery)

    return app


app = websocket_app(answer)


async def serve_hypercorn(asgi_app: Callable[..., Awaitable[None]] = app, banner: str = "ECHO") -> None:
    """Serve ``asgi_app`` on Hypercorn's trio worker with Atlas's settings; print ``BANNER url``."""
    from hypercorn.config import Config
    from hypercorn.trio import serve

    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.keep_alive_timeout = 75
    config.include_server_header = False
    config.websocket_max_message_size = 1024 * 1024
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(partial(serve, asgi_app, config))
        print(f"{banner} {binds[0]}", flush=True)


async def serve_trio_websocket() -> None:
    from trio_websocket import ConnectionClosed, WebSocketRequest, serve_websocket

    async def handler(request: WebSocketRequest) -> None:
        ws = await request.accept()
        await ws.send_message(READY)
        try:
            async with trio.open_nursery() as nursery:
                while True:
                    await answer(await ws.get_message(), ws.send_message, nursery)
        except ConnectionClosed:
            pass

    async with trio.open_nursery() as nursery:
        server = await nursery.start(partial(serve_websocket, handler, "127.0.0.1", 0, None))
        print(f"ECHO http://127.0.0.1:{server.port}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--impl", choices=("hypercorn", "trio-websocket"), default="hypercorn")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    trio.run(serve_hypercorn if args.impl == "hypercorn" else serve_trio_websocket)


if __name__ == "__main__":
    main()
