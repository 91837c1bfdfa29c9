"""The agent HTTP API (VoltAgent-compatible subset) as a small raw ASGI app.

Raw ASGI rather than a framework because the transport calls this app in-process, passing its
own scope/receive/send through: no lifespan needed, nothing buffered, no response timeout.

    GET  /healthz                 {"ok": true}
    GET  /openapi.json            this API's OpenAPI document (atlas.agent_api.openapi)
    GET  /agents                  {"success": true, "data": [agent...]}
    GET  /agents/{id}             {"success": true, "data": agent}
    POST /agents/{id}/text        {"success": true, "data": {"text", "usage", "finishReason"}}
    POST /agents/{id}/stream      SSE, VoltAgent full stream (atlas.agent_sse.FullStream)
    POST /agents/{id}/chat        SSE, AI SDK UI message stream v1 (atlas.agent_sse.UIMessageStream)

Errors: ``{"success": false, "error": message, "code": code}`` with the AgentError's status.
"""

from __future__ import annotations

import hmac
import logging
import math
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import msgspec
import trio

from atlas import openapi
from atlas.agent import AgentService
from atlas.agent_api.openapi import build_document
from atlas.agent_api.sse import FullStream, UIMessageStream, usage_camel
from atlas.asgi import BadBody, BodyTooLarge, ClientGone, decode_json, read_body
from atlas.config import Settings
from atlas.llm.types import AgentError, ChatMessage, Credentials, Finish, TextDelta, bad_request

log = logging.getLogger("atlas.agent.http")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

JSON_HEADERS = [(b"content-type", b"application/json")]
GENERATE_ROUTES = ("text", "stream", "chat")
# Every route, as its OpenAPI path, with its method: the dispatcher serves only these, and the
# OpenAPI document must describe each of them (tests/test_openapi.py compares the two).
ROUTES = {
    "/healthz": "GET", "/openapi.json": "GET", "/agents": "GET", "/agents/{id}": "GET",
    **{f"/agents/{{id}}/{route}": "POST" for route in GENERATE_ROUTES},
}
PUBLIC_ROUTES = ("/healthz", "/openapi.json")  # no X-Atlas-Agent-Secret needed
BODY_FIELDS = {"input", "options", "messages", "id", "trigger", "messageId", "metadata"}
ROLES = ("system", "user", "assistant")

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode


class Response:
    """The ``send`` side of one request, remembering whether the response has started."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self.started = False
        self.finished = False

    async def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.started = True
        await self._send({"type": "http.response.start", "status": status, "headers": headers})

    async def body(self, data: bytes, *, more: bool = True) -> None:
        self.finished = not more
        await self._send({"type": "http.response.body", "body": data, "more_body": more})

    async def json(self, status: int, payload: Any, headers: list[tuple[bytes, bytes]] = ()) -> None:
        data = _encode(payload)
        await self.start(status, [*JSON_HEADERS, (b"content-length", str(len(data)).encode()), *headers])
        await self.body(data, more=False)

    async def document(self, data: bytes) -> None:
        self.started = True
        self.finished = True
        await openapi.send_document(self._send, data)

    async def error(self, error: AgentError) -> None:
        headers = []
        if error.retry_after is not None:
            headers.append((b"retry-after", str(math.ceil(error.retry_after)).encode()))
        if isinstance(error, MethodNotAllowed):
            headers.append((b"allow", error.allow.encode()))
        payload = {"success": False, "error": error.message, "code": error.code}
        await self.json(error.status, payload, headers)


class AgentApp:
    def __init__(self, service: AgentService, settings: Settings) -> None:
        self.service = service
        self.secret = settings.agent_secret.encode() if settings.agent_secret else None
        self.max_body = settings.max_message_bytes
        self.document = openapi.encode(build_document(secret_required=self.secret is not None))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan is answered by serve_asgi
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1000})
            return
        response = Response(send)
        try:
            await self._handle(scope, receive, response)
        except AgentError as error:
            if not response.started:
                await response.error(error)
        except Exception:
            log.exception("agent request %s %s failed", scope.get("method"), scope.get("path"))
            if not response.started:
                await response.error(AgentError("internal", "internal error", 500))

    async def _handle(self, scope: Scope, receive: Receive, response: Response) -> None:
        method, path = scope["method"], scope["path"]
        headers = _headers(scope)
        if path in PUBLIC_ROUTES:
            _allow(method, ROUTES[path])
            if path == "/healthz":
                await response.json(200, {"ok": True})
            else:
                await response.document(self.document)
            return
        self._check_secret(headers)
        route, agent_id = match_route(path)
        if agent_id is None:
            _allow(method, ROUTES[route])
            data = [agent.describe() for agent in self.service.agents.values()]
            await response.json(200, {"success": True, "data": data})
            return
        agent = self.service.get(agent_id)
        _allow(method, ROUTES[route])
        if route == "/agents/{id}":
            await response.json(200, {"success": True, "data": agent.describe()})
            return
        body = await _read_json(receive, self.max_body)
        input, options = parse_body(body)
        credentials = Credentials(
            api_key=headers.get("x-provider-api-key", ""),
            api_url=headers.get("x-provider-api-url", ""),
            user_id=headers.get("x-user-id", ""),
        )
        await self._generate(route.rpartition("/")[2], agent.id, input, options, credentials, receive, response)

    def _check_secret(self, headers: Mapping[str, str]) -> None:
        if self.secret is None:
            return
        given = headers.get("x-atlas-agent-secret", "").encode("latin-1")
        if not hmac.compare_digest(given, self.secret):
            log.warning(
                "refused a request without the right X-Atlas-Agent-Secret: the gateway in front "
                "of this agent must set the same ATLAS_AGENT_SECRET"
            )
            raise AgentError(
                "agent_secret_mismatch",
                "missing or wrong X-Atlas-Agent-Secret: the gateway and this agent must share ATLAS_AGENT_SECRET",
                401,
            )

    async def _generate(
        self,
        route: str,
        agent_id: str,
        input: str | list[ChatMessage],
        options: dict[str, Any] | None,
        credentials: Credentials,
        receive: Receive,
        response: Response,
    ) -> None:
        """Run one generation; a client disconnect cancels it, closing the provider request."""
        error: AgentError | None = None
        midstream: AgentError | None = None
        gone = trio.Event()
        started = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cancel_on_disconnect, receive, nursery.cancel_scope, gone)
            try:
                stream = self.service.open_stream(agent_id, input, options, credentials)
                if route == "text":
                    await _text(stream, response)
                else:
                    dialect = FullStream() if route == "stream" else UIMessageStream()
                    midstream = await _sse(stream, response, dialect)
            except AgentError as exc:  # raised after the nursery, not wrapped in a group
                error = exc
            finally:
                nursery.cancel_scope.cancel()
        failure = error or midstream
        outcome = (failure.code if failure is not None
                   else "client_gone" if gone.is_set() and not response.finished else "ok")
        log.info("agent %s /%s user=%r: %s in %.0f ms", agent_id, route, credentials.user_id,
                 outcome, (trio.current_time() - started) * 1000)
        if error is not None:
            raise error


async def _text(stream: Any, response: Response) -> None:
    parts: list[str] = []
    async with stream as events:
        async for event in events:
            if isinstance(event, TextDelta):
                parts.append(event.text)
            else:
                finish: Finish = event
    await response.json(200, {"success": True, "data": {
        "text": "".join(parts),
        "usage": usage_camel(finish.usage),
        "finishReason": finish.finish_reason,
        "toolCalls": [],
        "toolResults": [],
    }})


async def _sse(
    stream: Any, response: Response, dialect: FullStream | UIMessageStream
) -> AgentError | None:
    """Errors before the provider's first byte are plain JSON errors with their status; after
    that the stream is committed (200) and an error becomes the dialect's error event."""
    try:
        async with stream as events:
            await response.start(200, dialect.headers)
            await response.body(dialect.start())
            async for event in events:
                if isinstance(event, TextDelta):
                    await response.body(dialect.delta(event.text))
                else:
                    await response.body(dialect.finish(event))
    except AgentError as error:
        if not response.started:
            raise
        await response.body(dialect.error(error))
        await response.body(b"", more=False)
        return error  # reported in the stream; returned for the log line
    await response.body(b"", more=False)
    return None


async def _cancel_on_disconnect(receive: Receive, scope: trio.CancelScope, gone: trio.Event) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            gone.set()
            scope.cancel()
            return


def match_route(path: str) -> tuple[str, str | None]:
    """The route (a key of ``ROUTES``) of an ``/agents`` path and its agent id, or 404."""
    parts = path.rstrip("/").split("/")[1:] if path != "/" else []
    if not parts or parts[0] != "agents" or len(parts) > 3 or "" in parts:
        raise AgentError("not_found", f"no route for {path}", 404)
    if len(parts) == 1:
        return "/agents", None
    if len(parts) == 2:
        return "/agents/{id}", parts[1]
    if parts[2] not in GENERATE_ROUTES:
        raise AgentError("not_found", f"no route for {path}", 404)
    return f"/agents/{{id}}/{parts[2]}", parts[1]


def _headers(scope: Scope) -> dict[str, str]:
    return {name.decode("latin-1").lower(): value.decode("latin-1").strip()
            for name, value in scope.get("headers", ())}


class MethodNotAllowed(AgentError):
    def __init__(self, method: str, allow: str) -> None:
        super().__init__("method_not_allowed", f"method {method} not allowed here, use {allow}", 405)
        self.allow = allow


def _allow(method: str, allowed: str) -> None:
    if method != allowed:
        raise MethodNotAllowed(method, allowed)


async def _read_json(receive: Receive, limit: int) -> Any:
    try:
        body = await read_body(receive, limit)
    except ClientGone:
        raise bad_request("body: the client went away before sending it") from None
    except BodyTooLarge as exc:
        raise AgentError("too_large", str(exc), 413) from None
    try:
        return decode_json(body)
    except BadBody as exc:
        raise bad_request(str(exc)) from None


def parse_body(body: Any) -> tuple[str | list[ChatMessage], dict[str, Any] | None]:
    """VoltAgent's ``{input, options}`` or AI SDK useChat's ``{messages: [UIMessage]}``."""
    if not isinstance(body, dict):
        raise bad_request("body: expected a JSON object")
    for field in body:
        if field not in BODY_FIELDS:
            raise bad_request(f"{field}: unknown field")
    options = body.get("options")
    if options is not None and not isinstance(options, dict):
        raise bad_request("options: expected an object")
    if "input" in body:
        return parse_input(body["input"], "input"), options
    if "messages" in body:
        return parse_input(body["messages"], "messages"), options
    raise bad_request("input: required")


def parse_input(value: Any, where: str) -> str | list[ChatMessage]:
    """A string, or messages as ModelMessage (``role``, ``content``: string or parts) or
    UIMessage (``role``, ``parts``). Only text parts count; other parts are skipped."""
    if isinstance(value, str):
        if not value.strip():
            raise bad_request(f"{where}: must not be empty")
        return value
    if not isinstance(value, list) or not value:
        raise bad_request(f"{where}: expected a string or a non-empty list of messages")
    messages: list[ChatMessage] = []
    for index, item in enumerate(value):
        at = f"{where}[{index}]"
        if not isinstance(item, dict):
            raise bad_request(f"{at}: expected an object")
        role = item.get("role")
        if role not in ROLES:
            raise bad_request(f"{at}.role: expected one of {', '.join(ROLES)}")
        if "parts" in item:
            text = _text_parts(item["parts"], f"{at}.parts")
        elif "content" in item:
            content = item["content"]
            text = content if isinstance(content, str) else _text_parts(content, f"{at}.content")
        else:
            raise bad_request(f"{at}.content: required")
        if text:
            messages.append(ChatMessage(role, text))
    if not messages:
        raise bad_request(f"{where}: no text in any message")
    return messages


def _text_parts(parts: Any, where: str) -> str:
    if not isinstance(parts, list):
        raise bad_request(f"{where}: expected a list of parts")
    texts = []
    for index, part in enumerate(parts):
        if not isinstance(part, dict):
            raise bad_request(f"{where}[{index}]: expected an object")
        if part.get("type") == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise bad_request(f"{where}[{index}].text: expected a string")
            texts.append(text)
    return "".join(texts)
