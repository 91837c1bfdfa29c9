"""A real OpenAI-compatible provider for tests, served on 127.0.0.1:0, with switchable behaviour.

    async with open_fake_provider() as provider:
        provider.url                         # http://127.0.0.1:PORT/v1
        provider.behaviour = Reply(deltas=["Hel", "lo"])   # what every request gets...
        provider.script(Status(500), Status(429, retry_after="1"))  # ...after these, in order
        ...
        provider.requests[0].api_key         # the bearer key it saw; .body is the JSON body
        await provider.wait_disconnect()     # a client went away before its reply ended

Behaviours: ``Reply`` (normal stream; ``gate`` holds it after ``hold_after`` deltas, or after the
last one and before the finish), ``Status``
(an error status, optionally with Retry-After), ``Stall`` (never sends another byte),
``Cut`` (the stream stops mid-way, abruptly or cleanly), ``Malformed`` (a bad chunk mid-way),
``Bill`` (bills like a real provider: one token per delta, the output cut at the request's
``max_completion_tokens`` / ``max_tokens``, the prompt counted from the request; what each key was
billed, cut-off replies included, is in ``provider.billed``).

A request with ``"stream": false`` gets one ``chat.completion`` JSON instead of a stream.
``GET .../models`` answers ``provider.models`` (None: 404, a provider without a model list).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import msgspec
import trio

from atlas.config import Bind
from atlas.http_server import serve_asgi

DEFAULT_USAGE = {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}


@dataclass
class Reply:
    deltas: list[str] = field(default_factory=lambda: ["Hello", ", ", "world"])
    usage: dict[str, int] | None = field(default_factory=lambda: dict(DEFAULT_USAGE))
    finish_reason: str | None = "stop"
    done: bool = True  # send "data: [DONE]"
    usage_with_choices: bool = False  # the usage chunk still carries a choices entry
    keepalives: bool = False  # comments and blank lines between chunks
    gate: trio.Event | None = None  # after `hold_after` deltas, wait for this before the rest
    hold_after: int = 1  # len(deltas): after the last delta, before the finish


@dataclass
class Status:
    status: int
    retry_after: str | None = None
    echo_key: bool = False  # quote the bearer key in the error message, as a careless provider might


@dataclass
class Stall:
    after_headers: bool = True  # False: not even the status line
    after_deltas: int = 0


@dataclass
class Cut:
    after: int = 1  # deltas sent before the cut
    abrupt: bool = True  # True: the connection breaks; False: the body ends cleanly, unfinished


@dataclass
class Malformed:
    after: int = 1
    data: bytes = b'{"choices": [{"delta": {"content": '


@dataclass
class Bill:
    tokens: int = 20  # the reply's length when no cap cuts it, one token ("w ") per delta
    gate: trio.Event | None = None  # after `hold_after` deltas, wait for this before the rest
    hold_after: int = 1
    report_usage: bool = True


def prompt_tokens(body: Any) -> int:
    """Like a real tokenizer on English: about 4 bytes per token, plus the chat format's few
    tokens per message. Never more than the UTF-8 bytes plus Atlas's allowances."""
    total = 3
    for message in body.get("messages", ()):
        content = message.get("content")
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        total += 4 + -(-len(str(content or "").encode()) // 4)
    return total


def output_cap(body: Any) -> int | None:
    caps = [body.get(name) for name in ("max_completion_tokens", "max_tokens")]
    caps = [c for c in caps if isinstance(c, int)]
    return min(caps) if caps else None


Behaviour = Reply | Status | Stall | Cut | Malformed | Bill


@dataclass
class RecordedRequest:
    method: str
    path: str
    api_key: str | None  # the bearer token, None without one
    body: Any
    headers: dict[str, str]
    client_port: int | None = None  # tells connections apart: equal ports, same connection
    disconnected: bool = False  # the client went away before the reply ended
    completed: bool = False  # the reply was sent in full
    billed: int = 0  # tokens billed for this request (Bill)


class _Cut(Exception):
    """Raised inside the app to make the server drop the connection mid-body."""


class FakeProvider:
    def __init__(self) -> None:
        self.url = ""
        self.behaviour: Behaviour = Reply()
        self.requests: list[RecordedRequest] = []
        self.models: list[str] | None = None
        self._queue: list[Behaviour] = []
        self._changed = trio.Event()

    def script(self, *behaviours: Behaviour) -> None:
        """The next requests get these, in order; later ones get ``self.behaviour``."""
        self._queue.extend(behaviours)

    def fail_times(self, n: int, failure: Behaviour) -> None:
        self.script(*[failure] * n)

    def billed(self, key: str | None = None) -> int:
        """Tokens billed (to ``key``, or to anyone)."""
        return sum(r.billed for r in self.requests if key is None or r.api_key == key)

    def completions(self, key: str | None = None) -> list[RecordedRequest]:
        """The chat completion requests that reached the provider (``key``'s, or all)."""
        return [r for r in self.requests if r.path.endswith("/chat/completions")
                and (key is None or r.api_key == key)]

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            await self._changed.wait()

    async def wait_requests(self, n: int) -> None:
        await self.wait_until(lambda: len(self.requests) >= n)

    async def wait_disconnect(self) -> RecordedRequest:
        await self.wait_until(lambda: any(r.disconnected for r in self.requests))
        return next(r for r in self.requests if r.disconnected)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                while (await receive())["type"] != "lifespan.shutdown":
                    await send({"type": "lifespan.startup.complete"})
                await send({"type": "lifespan.shutdown.complete"})
            return
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        auth = headers.get("authorization", "")
        record = RecordedRequest(
            method=scope["method"], path=scope["path"],
            api_key=auth[len("Bearer "):] if auth.startswith("Bearer ") else None,
            body=msgspec.json.decode(body) if body else None, headers=headers,
            client_port=(scope.get("client") or (None, None))[1],
        )
        self.requests.append(record)
        self._notify()
        if scope["method"] == "GET" and scope["path"].endswith("/models"):
            await self._models(send)
            return
        behaviour = self._queue.pop(0) if self._queue else self.behaviour
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch, receive, record, nursery.cancel_scope)
                await self._respond(behaviour, self._finishing(send, record), record)
                nursery.cancel_scope.cancel()
        finally:
            self._notify()

    def _finishing(self, send: Any, record: RecordedRequest) -> Any:
        """``send`` that marks the request completed just before the body's last message (the
        server reports a disconnect to the app as soon as the response is over)."""

        async def wrapped(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                record.completed = True
            await send(message)

        return wrapped

    async def _watch(self, receive: Any, record: RecordedRequest, scope: trio.CancelScope) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        if not record.completed:
            record.disconnected = True
            self._notify()
            scope.cancel()

    async def _models(self, send: Any) -> None:
        if self.models is None:
            status, payload = 404, {"error": {"message": "no such route", "code": "not_found"}}
        else:
            status, payload = 200, {"object": "list", "data": [
                {"id": m, "object": "model", "created": 0, "owned_by": "fake"} for m in self.models
            ]}
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": msgspec.json.encode(payload)})

    async def _respond(self, behaviour: Behaviour, send: Any, record: RecordedRequest) -> None:
        body = record.body if isinstance(record.body, dict) else {}
        if not body.get("stream", False) and isinstance(behaviour, (Reply, Bill)):
            await self._complete(behaviour, send, record, body)
            return
        if isinstance(behaviour, Status):
            headers = [(b"content-type", b"application/json")]
            if behaviour.retry_after is not None:
                headers.append((b"retry-after", behaviour.retry_after.encode()))
            await send({"type": "http.response.start", "status": behaviour.status, "headers": headers})
            message = "fake failure"
            if behaviour.echo_key:
                message += f" for key {record.api_key}"
            error = {"error": {"message": message, "code": behaviour.status}}
            await send({"type": "http.response.body", "body": msgspec.json.encode(error)})
            return
        if isinstance(behaviour, Stall) and not behaviour.after_headers:
            await trio.sleep_forever()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})

        async def data(payload: Any) -> None:
            raw = payload if isinstance(payload, bytes) else msgspec.json.encode(payload)
            await send({"type": "http.response.body", "body": b"data: " + raw + b"\n\n",
                        "more_body": True})

        def delta(text: str) -> dict[str, Any]:
            return {"id": "fake", "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}

        if isinstance(behaviour, Reply):
            await self._reply(behaviour, send, data, delta)
            return
        if isinstance(behaviour, Bill):
            await self._bill(behaviour, send, data, delta, record, body)
            return
        sent = 0
        limit = behaviour.after if isinstance(behaviour, (Cut, Malformed)) else behaviour.after_deltas
        while sent < limit:
            await data(delta(f"part{sent} "))
            sent += 1
        if isinstance(behaviour, Stall):
            await trio.sleep_forever()
        if isinstance(behaviour, Malformed):
            await data(behaviour.data)
            await data(b"[DONE]")
        elif behaviour.abrupt:
            raise _Cut("fake provider cuts the connection")
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _complete(self, behaviour: Reply | Bill, send: Any, record: RecordedRequest, body: Any) -> None:
        """A non-streamed answer: one chat.completion."""
        if isinstance(behaviour, Bill):
            if behaviour.gate is not None:
                await behaviour.gate.wait()
            count = behaviour.tokens if output_cap(body) is None else min(behaviour.tokens, output_cap(body))
            text, prompt = "w " * count, prompt_tokens(body)
            usage = {"prompt_tokens": prompt, "completion_tokens": count, "total_tokens": prompt + count}
            record.billed = prompt + count
            finish = "length" if count < behaviour.tokens else "stop"
        else:
            text, usage, finish = "".join(behaviour.deltas), behaviour.usage, behaviour.finish_reason
        payload = {"id": "fake", "object": "chat.completion", "created": 0, "model": body.get("model", "fake"),
                   "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                "finish_reason": finish}]}
        if usage is not None:
            payload["usage"] = usage
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": msgspec.json.encode(payload)})

    async def _bill(self, bill: Bill, send: Any, data: Any, delta: Any, record: RecordedRequest, body: Any) -> None:
        cap = output_cap(body)
        count = bill.tokens if cap is None else min(bill.tokens, cap)
        prompt = prompt_tokens(body)
        record.billed = prompt  # billed as it generates, cut-off replies too
        await data({"id": "fake", "choices": [{"index": 0, "delta": {"role": "assistant"}}]})
        for index in range(count):
            if bill.gate is not None and index == bill.hold_after:
                await bill.gate.wait()
            record.billed += 1
            await data(delta("w "))
        await data({"id": "fake", "choices": [
            {"index": 0, "delta": {}, "finish_reason": "length" if count < bill.tokens else "stop"}]})
        options = body.get("stream_options") or {}
        if bill.report_usage and options.get("include_usage"):
            usage = {"prompt_tokens": prompt, "completion_tokens": count, "total_tokens": prompt + count}
            await data({"id": "fake", "choices": [], "usage": usage})
        await data(b"[DONE]")
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _reply(self, reply: Reply, send: Any, data: Any, delta: Any) -> None:
        await data({"id": "fake", "choices": [{"index": 0, "delta": {"role": "assistant"}}]})
        for index, text in enumerate(reply.deltas):
            if reply.gate is not None and index == reply.hold_after:
                await reply.gate.wait()
            if reply.keepalives:
                await send({"type": "http.response.body", "body": b": keep-alive\n\n\n",
                            "more_body": True})
            await data(delta(text))
        if reply.gate is not None and reply.hold_after >= len(reply.deltas):
            await reply.gate.wait()
        if reply.finish_reason is not None:
            await data({"id": "fake", "choices": [
                {"index": 0, "delta": {}, "finish_reason": reply.finish_reason}]})
        if reply.usage is not None:
            choices = [{"index": 0, "delta": {}, "finish_reason": None}] if reply.usage_with_choices else []
            await data({"id": "fake", "choices": choices, "usage": reply.usage})
        if reply.done:
            await data(b"[DONE]")
        await send({"type": "http.response.body", "body": b"", "more_body": False})


@asynccontextmanager
async def open_fake_provider() -> AsyncIterator[FakeProvider]:
    provider = FakeProvider()
    async with trio.open_nursery() as nursery:
        base_url = await nursery.start(partial(serve_asgi, provider, Bind("127.0.0.1", 0)))
        provider.url = f"{base_url}/v1"
        yield provider
        nursery.cancel_scope.cancel()
