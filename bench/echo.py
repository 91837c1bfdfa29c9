"""The idle scenario's baseline: the bare stack Atlas is built on, and nothing else.

A raw-ASGI WebSocket app served by Hypercorn's trio worker with Atlas's Hypercorn settings: it
accepts, sends ``{"type":"ready"}``, and answers ``{"type":"ping"}`` with ``{"type":"pong"}``.
What Atlas costs on top of this is what Atlas itself adds per connection.

Run: ``python -m bench.echo``; prints ``ECHO http://127.0.0.1:PORT``.
"""

from __future__ import annotations

import resource
from functools import partial
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

READY = '{"type":"ready"}'
PONG = '{"type":"pong"}'


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
    await send({"type": "websocket.send", "text": READY})
    while True:
        event = await receive()
        if event["type"] != "websocket.receive":
            return
        text = event.get("text") or ""
        await send({"type": "websocket.send", "text": PONG if '"ping"' in text else text})


async def main_async() -> None:
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.keep_alive_timeout = 75
    config.include_server_header = False
    config.websocket_max_message_size = 1024 * 1024
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(partial(serve, app, config))
        print(f"ECHO {binds[0]}", flush=True)


def main() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    trio.run(main_async)


if __name__ == "__main__":
    main()
