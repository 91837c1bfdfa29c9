"""Admission and settlement for ``?proxy=`` requests that spend the user's key:
``POST /agents/{id}/text``, ``/stream`` and ``/chat`` (and VoltAgent's ``/object`` and
``/stream-object``, which a remote VoltAgent server may serve).

The request body (small JSON) is read, its worst case is admitted like a WebSocket request's, and
the granted output cap goes in as ``options.maxOutputTokens``. The prompt's bound is the whole
body's bytes (input, messages, a schema: whatever the agent may pass on) plus the per-message
allowances and the agent's instructions; the agent checks the body itself. The response streams through untouched, watched on the way: the
agent reports the usage in it (``/text``: ``data.usage``; ``/stream``: the ``finish`` event's
``totalUsage``; ``/chat``: the ``finish`` event's ``messageMetadata.usage``), and the usage is
settled, durably, before the bytes that carry it (or the response's last bytes) are passed on.

What counts as answered: the streaming routes answer 200 only once the provider has, so a 200 is
the mark. ``/text`` and ``/object`` answer only when the reply is complete, so they cost from the
moment they are sent to the agent, unless the agent then refuses them (any status but 200).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from atlas.agent_api.app import Response
from atlas.agent_api.sse import FullStream, UIMessageStream
from atlas.asgi import BadBody, BodyTooLarge, ClientGone, decode_json, read_body, send_json
from atlas.gateway.admission import PER_MESSAGE_TOKENS, PER_REQUEST_TOKENS, Refused, Ticket
from atlas.gateway.relay import requested_output
from atlas.gateway.reply_cap import reply_too_large
from atlas.gateway.services import Services
from atlas.llm.sse import SseDataParser, SseTooLong
from atlas.llm.types import AgentError, Usage, bad_request
from atlas.store import Identity

BILLABLE_PATH = re.compile(r"/agents/([^/]+)/(text|stream|chat|object|stream-object)/?")
WHOLE_ANSWER_ROUTES = ("text", "object")  # one JSON answer at the end, usage in data.usage

Forward = Callable[[bytes, Any, Any], Awaitable[None]]  # (body, receive, send)

_decode = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode


def billable_route(method: str, path: str) -> tuple[str, str] | None:
    """(agent id, route) for a request that calls the provider, else None."""
    match = BILLABLE_PATH.fullmatch(path)
    if method != "POST" or match is None:
        return None
    return match.group(1), match.group(2)


class _CamelUsage(msgspec.Struct, rename="camel"):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class _TotalUsage(msgspec.Struct, rename="camel"):
    input_tokens: int = 0
    output_tokens: int = 0
    total_tokens: int = 0


class _Metadata(msgspec.Struct):
    usage: _CamelUsage | None = None


class _Event(msgspec.Struct, rename="camel"):
    type: str = ""
    total_usage: _TotalUsage | None = None
    message_metadata: _Metadata | None = None


class _TextData(msgspec.Struct):
    usage: _CamelUsage | None = None


class _TextAnswer(msgspec.Struct):
    data: _TextData | None = None


_event = msgspec.json.Decoder(_Event)
_text_answer = msgspec.json.Decoder(_TextAnswer)


def _usage(camel: _CamelUsage | None) -> Usage | None:
    return None if camel is None else Usage(camel.prompt_tokens, camel.completion_tokens, camel.total_tokens)


MAX_ERROR_BODY = 64 * 1024


def error_code_of(body: bytes) -> str:
    """The ``code`` of an agent's error envelope, for the request's record."""
    try:
        code = msgspec.json.decode(body).get("code")
    except (msgspec.DecodeError, AttributeError):
        code = None
    return code if isinstance(code, str) and code else "agent_error"


class Meter:
    """The ``send`` of a proxied billable request: passes everything on, reading the usage.

    A whole answer (``/text``, ``/object``) is held until it is complete: it is one JSON value
    anyway, and holding it lets its usage be read and a too-large one be refused cleanly. A reply
    over ``cap`` bytes is cut (``_cut``): the client gets the error ``too_large`` and the agent's
    next ``send`` raises it, which closes the provider request."""

    def __init__(self, route: str, ticket: Ticket, send: Any, cap: int) -> None:
        self.route = route
        self.ticket = ticket
        self._send = send
        self._cap = cap
        self._parser: SseDataParser | None = SseDataParser()
        self._whole = route in WHOLE_ANSWER_ROUTES
        self._held: dict[str, Any] | None = None  # a whole answer's response start, until its end
        self._text: list[bytes] = []
        self._size = 0
        self._error: bytearray | None = None
        self.started = False
        self.cut = False  # the reply went over the cap and the client has had its end

    async def send(self, message: dict[str, Any]) -> None:
        if self.cut:
            raise reply_too_large(self._cap)  # the agent stops; nothing more reaches the client
        kind = message["type"]
        if kind == "http.response.start":
            ok = message["status"] == 200
            if not self._whole or not ok:
                self.ticket.answered(ok)
            if not ok:
                self._error = bytearray()  # the agent's error envelope names the code
            elif self._whole:
                self._held = message  # not started yet: the request can still fail cleanly
                return
            self.started = True
        elif kind == "http.response.body":
            chunk = message.get("body", b"")
            more = message.get("more_body", False)
            if chunk:
                self.ticket.first_token()
                self._size += len(chunk)
                if self._size > self._cap:
                    await self._cut()
            if self._error is not None:
                self._error += chunk[: MAX_ERROR_BODY - len(self._error)]
                if not more:
                    self.ticket.failed(error_code_of(bytes(self._error)))
            elif self._held is not None:
                self._text.append(chunk)
                if more:
                    return
                await self.ticket.settle(self._text_usage())
                start, self._held = self._held, None
                self.started = True
                await self._send(start)
                await self._send({"type": "http.response.body", "body": b"".join(self._text)})
                self.ticket.delivered()
                return
            elif chunk:
                await self._scan(chunk)
            if not more:
                await self.ticket.settle(None)  # the estimate, unless the usage was settled
                await self._send(message)
                self.ticket.delivered()
                return
        await self._send(message)

    async def _cut(self) -> None:
        """End the response with ``too_large`` in the route's own terms, then stop the agent."""
        self.cut = True
        error = reply_too_large(self._cap)
        await self.ticket.settle(None)  # what the provider reported if settled already, else the estimate
        self.ticket.failed(error.code)
        if self._held is not None:  # nothing sent yet: a plain error answer
            self._held = None
            self.started = True
            await Response(self._send).error(error)
        else:
            if self._error is None:
                event = UIMessageStream().error(error) if self.route == "chat" else FullStream().error(error)
                await self._send({"type": "http.response.body", "body": event, "more_body": True})
            await self._send({"type": "http.response.body", "body": b"", "more_body": False})
        raise error

    def _text_usage(self) -> Usage | None:
        if not self._text:
            return None
        try:
            answer = _text_answer.decode(b"".join(self._text))
        except msgspec.DecodeError:
            return None
        return _usage(answer.data.usage) if answer.data else None

    async def _scan(self, chunk: bytes) -> None:
        if self._parser is None:
            return
        try:
            events = self._parser.feed(chunk)
        except SseTooLong:
            # Not a stream Atlas can read: it passes on untouched, and costs the estimate.
            self._parser = None
            return
        for data in events:
            if b'"finish"' not in data:
                continue
            try:
                event = _event.decode(data)
            except msgspec.DecodeError:
                continue
            if event.type != "finish":
                continue
            if event.total_usage is not None:
                u = event.total_usage
                await self.ticket.settle(Usage(u.input_tokens, u.output_tokens, u.total_tokens))
            elif event.message_metadata is not None:
                await self.ticket.settle(_usage(event.message_metadata.usage))


async def proxy_billable(
    services: Services, identity: Identity, agent_id: str, route: str, receive: Any, send: Any,
    forward: Forward,
) -> None:
    """Admit, forward (``forward(body, receive, send)``) and settle one billable request."""
    try:
        try:
            body = await read_body(receive, services.settings.max_message_bytes)
        except BodyTooLarge as exc:
            raise AgentError("too_large", str(exc), 413) from None
        except ClientGone:
            raise bad_request("body: the client went away before sending it") from None
        payload, messages, options = parse_request(body)
    except AgentError as error:  # refused as the agent itself would refuse it
        await Response(send).error(error)
        return
    try:
        budget = await services.relay.agent.budget(agent_id)
    except AgentError as error:  # the gateway could not use the agent: the transport's own error
        await send_json(send, error.status, {"error": {"code": error.code, "message": error.message}})
        return
    replaceable, wanted = requested_output(options)
    prompt = len(body) + PER_MESSAGE_TOKENS * messages + PER_REQUEST_TOKENS
    if budget.instructions_bytes:
        prompt += budget.instructions_bytes + PER_MESSAGE_TOKENS
    admission = services.admission
    meter: Meter | None = None
    try:
        async with admission.admit(
            identity.id, admission.limits_for(identity), prompt=prompt,
            output=wanted or budget.max_output_tokens, path="proxy", agent=agent_id,
        ) as ticket:
            if ticket.cap is not None and replaceable:
                payload["options"] = {**options, "maxOutputTokens": ticket.cap}
                body = _encode(payload)
            if route in WHOLE_ANSWER_ROUTES:
                ticket.answered()  # see the module's docstring
            meter = Meter(route, ticket, send, services.settings.max_reply_bytes)
            await forward(body, replay(body, receive), meter.send)
    except Refused as refusal:
        await send_refusal(send, refusal)
    except AgentError as error:  # past the request's deadline, or a reply cut at the cap
        if meter is not None and meter.cut:
            pass  # the client has had the error and the end of the response
        elif meter is None or not meter.started:
            await send_json(send, error.status, {"error": {"code": error.code, "message": error.message}})
        else:
            await send({"type": "http.response.body", "body": b"", "more_body": False})


async def send_refusal(send: Any, refusal: Refused) -> None:
    await send_json(send, refusal.status, {"error": refusal.to_json()}, refusal.headers())


def replay(body: bytes, receive: Any) -> Any:
    """A ``receive`` that gives ``body`` first, then what the client sends (its disconnect)."""
    given = False

    async def receive_again() -> dict[str, Any]:
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return receive_again


def parse_request(body: bytes) -> tuple[dict[str, Any], int, dict[str, Any]]:
    """(payload, number of messages, options): just what admission needs."""
    try:
        payload = decode_json(body)
    except BadBody as exc:
        raise bad_request(str(exc)) from None
    if not isinstance(payload, dict):
        raise bad_request("body: expected a JSON object")
    options = payload.get("options")
    if options is not None and not isinstance(options, dict):
        raise bad_request("options: expected an object")
    given = payload.get("input", payload.get("messages"))
    return payload, len(given) if isinstance(given, list) else 1, options or {}
