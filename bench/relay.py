"""The minimal relay: the least a relay on Atlas's stack does, as the floor Atlas is measured against.

The raw-ASGI WebSocket app of ``bench.echo`` on Hypercorn's trio worker with Atlas's Hypercorn
settings. For each ``agent:stream`` frame it opens the provider's stream with ``h11`` over a raw
trio socket (``POST .../chat/completions`` with the body Atlas sends for its default agent), and
writes every delta of the SSE stream as its own ``agent:delta`` frame, framed like Atlas's, then
``agent:start``/``agent:done`` around them like Atlas. Provider connections are kept alive and
reused, as Atlas's transport does. It also answers ``ping``. Nothing else: no auth, rooms, store,
outbox, timeouts or retries. What Atlas costs on top of this is what Atlas itself adds to a relay.

Run: ``python -m bench.relay --provider http://127.0.0.1:PORT/v1``; prints ``RELAY http://127.0.0.1:PORT``.
"""

from __future__ import annotations

import argparse
import resource
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

import h11
import msgspec
import trio

from bench.echo import PONG, serve_hypercorn, websocket_app

# The provider body of Atlas's default agent (atlas.llm.agents), so the provider does the same work.
MODEL = "gpt-4o-mini"
INSTRUCTIONS = "You are Atlas, a helpful assistant. Answer clearly and concisely."
READ_SIZE = 65536
SendText = Callable[[str], Awaitable[None]]


class ClientFrame(msgspec.Struct):
    type: str
    id: str = "r"
    message: str = ""


class _Delta(msgspec.Struct):
    content: str | None = None


class _Choice(msgspec.Struct):
    delta: _Delta | None = None
    finish_reason: str | None = None


class Usage(msgspec.Struct, rename="camel"):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class _Usage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class _Chunk(msgspec.Struct):
    choices: list[_Choice] = []
    usage: _Usage | None = None


class _Frame(msgspec.Struct, tag_field="type", rename="camel"):
    pass


class AgentStart(_Frame, tag="agent:start"):
    id: str
    agent_id: str


class AgentDelta(_Frame, tag="agent:delta"):
    id: str
    text: str


class AgentDone(_Frame, tag="agent:done"):
    id: str
    text: str
    usage: Usage
    finish_reason: str


class AgentError(_Frame, tag="agent:error"):
    id: str
    error: dict[str, str]


_client_decoder = msgspec.json.Decoder(ClientFrame)
_chunk_decoder = msgspec.json.Decoder(_Chunk)
_encoder = msgspec.json.Encoder()


def encode(frame: _Frame) -> str:
    return _encoder.encode(frame).decode()


class ProviderError(Exception):
    pass


class Relay:
    """Per-process state: the provider's address and its idle keep-alive connections."""

    def __init__(self, provider_url: str) -> None:
        parts = urlsplit(provider_url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.target = (parts.path.rstrip("/") + "/chat/completions").encode()
        self.headers = [
            (b"host", f"{self.host}:{self.port}".encode()),
            (b"authorization", b"Bearer bench"),
            (b"content-type", b"application/json"),
            (b"accept", b"text/event-stream"),
            (b"user-agent", b"atlas-bench-relay"),
        ]
        self.idle: list[tuple[trio.SocketStream, h11.Connection]] = []

    async def answer(self, text: str, send: SendText, nursery: trio.Nursery) -> None:
        if '"ping"' in text:
            await send(PONG)
        elif '"agent:stream"' in text:
            nursery.start_soon(self.relay, _client_decoder.decode(text), send)

    async def relay(self, frame: ClientFrame, send: SendText) -> None:
        try:
            await send(encode(AgentStart(frame.id, "atlas-assistant")))
            body = _encoder.encode({
                "model": MODEL,
                "messages": [{"role": "system", "content": INSTRUCTIONS},
                             {"role": "user", "content": frame.message}],
                "stream": True,
                "stream_options": {"include_usage": True},
            })
            await self.stream(frame.id, body, send)
        except (ProviderError, OSError, h11.ProtocolError, trio.BrokenResourceError, msgspec.DecodeError) as exc:
            await send(encode(AgentError(frame.id, {"code": "provider_error", "message": str(exc)})))

    async def stream(self, request_id: str, body: bytes, send: SendText) -> None:
        if self.idle:
            sock, conn = self.idle.pop()
        else:
            sock, conn = await trio.open_tcp_stream(self.host, self.port), h11.Connection(h11.CLIENT)
        reusable = False
        try:
            headers = [*self.headers, (b"content-length", b"%d" % len(body))]
            await sock.send_all(
                conn.send(h11.Request(method=b"POST", target=self.target, headers=headers))
                + conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage())
            )
            parts: list[str] = []
            usage, finish = Usage(), "unknown"
            pending = b""
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await sock.receive_some(READ_SIZE))
                elif isinstance(event, h11.Data):
                    # One SSE event per blank line; the bench provider sends one per chunk.
                    *events, pending = (pending + event.data).split(b"\n\n")
                    for sse in events:
                        if not sse.startswith(b"data:") or sse.endswith(b"[DONE]"):
                            continue
                        chunk = _chunk_decoder.decode(sse[5:])
                        for choice in chunk.choices:
                            if choice.delta is not None and choice.delta.content:
                                parts.append(choice.delta.content)
                                await send(encode(AgentDelta(request_id, choice.delta.content)))
                            if choice.finish_reason:
                                finish = choice.finish_reason
                        if chunk.usage is not None:
                            u = chunk.usage
                            usage = Usage(u.prompt_tokens, u.completion_tokens, u.total_tokens)
                elif isinstance(event, h11.Response):
                    if event.status_code != 200:
                        raise ProviderError(f"provider answered {event.status_code}")
                elif isinstance(event, h11.EndOfMessage):
                    break
                else:  # ConnectionClosed
                    raise ProviderError("provider closed the connection mid-reply")
            conn.start_next_cycle()
            reusable = True
        finally:
            if reusable:
                self.idle.append((sock, conn))
            else:
                await sock.aclose()
        await send(encode(AgentDone(request_id, "".join(parts), usage, finish)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--provider", required=True, help="the provider's base URL, e.g. http://127.0.0.1:PORT/v1")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    relay = Relay(args.provider)
    trio.run(serve_hypercorn, websocket_app(relay.answer), "RELAY")


if __name__ == "__main__":
    main()
