"""The bench's own OpenAI-compatible provider: ``POST /v1/chat/completions``, streaming or not.

A separate process, plain asyncio and hand-written HTTP/1.1 (keep-alive, chunked responses), so
that it costs as little CPU as possible on a 2-core machine shared with Atlas and the clients.

The last user message steers the reply, so one provider serves every scenario::

    "bench deltas=200 rate=30"   200 deltas, 30 per second (rate=0: all at once)

Every delta's text is ``@<CLOCK_MONOTONIC seconds>;``, stamped just before the write. Clients on
the same machine read the same clock, so receive time minus stamp is the delivery delay of that
delta, whichever way it came (straight from here, or coalesced by Atlas into one frame).

Run: ``python -m bench.provider [--port 0]``; prints ``PROVIDER http://127.0.0.1:PORT/v1``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time

SPEC = re.compile(r"(deltas|rate)=([0-9.]+)")
DEFAULT_DELTAS = 8

HEAD_STREAM = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
    b"transfer-encoding: chunked\r\n\r\n"
)
CHUNK_PREFIX = b'data: {"object":"chat.completion.chunk","model":"bench","choices":[{"index":0,"delta":{"content":"'
CHUNK_SUFFIX = b'"},"finish_reason":null}]}\n\n'
FINISH = b'data: {"object":"chat.completion.chunk","model":"bench","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
DONE = b"data: [DONE]\n\n"


def chunked(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def usage_event(deltas: int) -> bytes:
    return (
        b'data: {"object":"chat.completion.chunk","model":"bench","choices":[],"usage":'
        b'{"prompt_tokens":3,"completion_tokens":%d,"total_tokens":%d}}\n\n' % (deltas, deltas + 3)
    )


def parse_spec(text: str) -> tuple[int, float]:
    values = dict(SPEC.findall(text))
    return int(values.get("deltas", DEFAULT_DELTAS)), float(values.get("rate", 0))


def last_user_text(body: bytes) -> tuple[str, bool]:
    request = json.loads(body)
    text = ""
    for message in request.get("messages", ()):
        if message.get("role") == "user" and isinstance(message.get("content"), str):
            text = message["content"]
    return text, bool(request.get("stream"))


class ProviderProtocol(asyncio.Protocol):
    """One client connection: requests one after another (no pipelining), keep-alive."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.busy = False
        self.closed = False
        self.loop = asyncio.get_running_loop()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self.maybe_request()

    def maybe_request(self) -> None:
        if self.busy:
            return
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = self.buffer[:end].decode("latin-1")
        length = 0
        for line in head.split("\r\n")[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        if len(self.buffer) < end + 4 + length:
            return
        body = self.buffer[end + 4:end + 4 + length]
        self.buffer = self.buffer[end + 4 + length:]
        request_line = head.split("\r\n", 1)[0]
        if not request_line.startswith("POST ") or "/chat/completions" not in request_line:
            self.respond_json(404, b'{"error":{"message":"not found","code":"not_found"}}')
            return
        try:
            text, stream = last_user_text(body)
        except ValueError:
            self.respond_json(400, b'{"error":{"message":"bad json","code":"invalid_request_error"}}')
            return
        deltas, rate = parse_spec(text)
        if not stream:
            content = "".join(f"@{time.monotonic():.6f};" for _ in range(deltas))
            payload = json.dumps({
                "object": "chat.completion", "model": "bench",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 3, "completion_tokens": deltas, "total_tokens": deltas + 3},
            }).encode()
            self.respond_json(200, payload)
            return
        self.busy = True
        assert self.transport is not None
        self.transport.write(HEAD_STREAM)
        if rate <= 0:
            for _ in range(deltas):
                self.write_delta()
            self.finish(deltas)
        else:
            self.loop.call_soon(self.tick, deltas, 1.0 / rate, self.loop.time(), 0)

    def write_delta(self) -> None:
        stamp = b"@%.6f;" % time.monotonic()
        self.transport.write(chunked(CHUNK_PREFIX + stamp + CHUNK_SUFFIX))  # type: ignore[union-attr]

    def tick(self, deltas: int, period: float, start: float, index: int) -> None:
        if self.closed:
            return
        self.write_delta()
        index += 1
        if index >= deltas:
            self.finish(deltas)
            return
        self.loop.call_at(start + index * period, self.tick, deltas, period, start, index)

    def finish(self, deltas: int) -> None:
        assert self.transport is not None
        self.transport.write(
            chunked(FINISH) + chunked(usage_event(deltas)) + chunked(DONE) + b"0\r\n\r\n"
        )
        self.busy = False
        if self.buffer:
            self.maybe_request()

    def respond_json(self, status: int, payload: bytes) -> None:
        assert self.transport is not None
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found"}.get(status, "Error")
        self.transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
            % (status, reason.encode(), len(payload), payload)
        )


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(ProviderProtocol, "127.0.0.1", port, backlog=4096)
    bound = server.sockets[0].getsockname()[1]
    print(f"PROVIDER http://127.0.0.1:{bound}/v1", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    try:
        asyncio.run(serve(args.port))
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
