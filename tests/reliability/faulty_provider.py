"""The test provider (tests/fake_provider.py) with two more behaviours and per-message faults.

``FaultyProvider`` picks each request's behaviour from the text of its last message,
``"fault:NAME ..."`` -> ``FAULTS[NAME]`` (anything else gets a normal reply), so that a hundred
concurrent requests each get the fault they asked for, whatever order they arrive in.

Extra behaviours: ``Giant`` (one huge SSE event, on one ``data:`` line or on many), ``Drip`` (a
keep-alive comment every ``every`` seconds, forever: never silent, never done).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import msgspec
import trio
from fake_provider import Behaviour, Cut, FakeProvider, Malformed, Reply, Stall, Status

from atlas.config import Bind
from atlas.http_server import serve_asgi


@dataclass
class Giant:
    size: int  # bytes of text in the one event
    lines: int = 1  # split over this many data: lines (JSON allows a line break between tokens)


@dataclass
class Drip:
    every: float  # seconds between keep-alive comments


FAULTS: dict[str, Any] = {
    "ok": Reply(deltas=["all ", "good"]),
    "auth": Status(401),
    "forbidden": Status(403),
    "rate": Status(429, retry_after="30"),  # longer than Atlas waits: passed on, not retried
    "error500": Status(500),
    "error503": Status(503),
    "stall_first": Stall(after_headers=False),
    "stall_headers": Stall(after_headers=True),
    "stall_mid": Stall(after_deltas=2),
    "cut": Cut(after=2),
    "cut_clean": Cut(after=2, abrupt=False),
    "malformed": Malformed(after=1),
    "giant": Giant(2 * 1024 * 1024),
    "big": Giant(256 * 1024),
    # Not in the storm (EXPECTED): each has a test of its own.
    "giant_lines": Giant(64, lines=40),  # about 2.4 MB in one event
    "drip": Drip(every=0.1),
}

# What each fault must end as on the WebSocket (agent:done, or agent:error with this code).
EXPECTED: dict[str, str] = {
    "ok": "done", "auth": "provider_auth", "forbidden": "provider_auth",
    "rate": "provider_rate_limited", "error500": "provider_error", "error503": "provider_error",
    "stall_first": "provider_timeout", "stall_headers": "provider_timeout",
    "stall_mid": "provider_timeout", "cut": "provider_error", "cut_clean": "provider_error",
    "malformed": "provider_error", "giant": "provider_error", "big": "done",
    "refused": "provider_unreachable",
}


def fault_of(body: Any) -> str:
    try:
        text = body["messages"][-1]["content"]
    except (TypeError, KeyError, IndexError):
        return "ok"
    if isinstance(text, str) and text.startswith("fault:"):
        return text[len("fault:"):].split()[0]
    return "ok"


class FaultyProvider(FakeProvider):
    @property  # type: ignore[override]
    def behaviour(self) -> Behaviour:
        # Read by FakeProvider.__call__ right after it records the request, with no checkpoint
        # in between: the last request is the one being answered.
        return FAULTS[fault_of(self.requests[-1].body)] if self.requests else Reply()

    @behaviour.setter
    def behaviour(self, value: Behaviour) -> None:
        pass  # the message decides

    async def _respond(self, behaviour: Any, send: Any, record: Any) -> None:
        if not isinstance(behaviour, (Giant, Drip)):
            await super()._respond(behaviour, send, record)
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        if isinstance(behaviour, Drip):
            while True:
                await send({"type": "http.response.body", "body": b": still here\n\n", "more_body": True})
                await trio.sleep(behaviour.every)
        chunk = {"id": "fake", "choices": [{"index": 0, "delta": {"content": "g" * behaviour.size}}]}
        raw = msgspec.json.encode(chunk)
        if behaviour.lines > 1:  # break the JSON between its tokens, padded with whitespace lines
            head, _, rest = raw.partition(b":")
            pad = b"\n".join([b" " * 60_000] * (behaviour.lines - 1))
            raw = head + b":\n" + pad + b"\n" + rest
        event = b"".join(b"data: " + line + b"\n" for line in raw.split(b"\n")) + b"\n"
        await send({"type": "http.response.body", "body": event, "more_body": True})
        finish = {"id": "fake", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
        await send({"type": "http.response.body", "more_body": True,
                    "body": b"data: " + msgspec.json.encode(finish) + b"\n\ndata: [DONE]\n\n"})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


@asynccontextmanager
async def open_faulty_provider() -> AsyncIterator[FaultyProvider]:
    provider = FaultyProvider()
    async with trio.open_nursery() as nursery:
        base_url = await nursery.start(partial(serve_asgi, provider, Bind("127.0.0.1", 0)))
        provider.url = f"{base_url}/v1"
        yield provider
        nursery.cancel_scope.cancel()


__all__ = ["Cut", "Drip", "EXPECTED", "FAULTS", "FaultyProvider", "Giant", "Malformed", "open_faulty_provider"]
