"""The OpenAI-compatible endpoint: ``POST /v1/chat/completions`` and ``GET /v1/models``.

The API key is the user's Atlas token, checked through the same door as every other path
(``auth.authenticate``). The body goes to the user's provider as it came (unknown fields kept),
with the user's virtual key, after three changes: ``stream_options.include_usage`` is turned on for
streamed requests (Atlas needs the usage; the usage chunk reaches the client only if it asked for
it), and when a token limit applies, the output cap (``max_completion_tokens`` if the client sent
it, ``max_tokens`` otherwise) is set to what admission granted; and a whole number sent as a
float (``"n": 2.0``) is sent as that number. The stream comes back event by
event through the provider transport the agent uses; a client that goes away closes the provider
request at once.

Errors are OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``: 400 bad body, 401
bad token, 402 ``quota_exceeded`` (with ``resetAt``), 429 ``rate_limited`` (with ``Retry-After``),
and a provider's own status and error otherwise (with the virtual key blanked out, should a
provider quote it).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import httpx
import msgspec
import trio

from atlas.asgi import JSON_HEADERS, BadBody, BodyTooLarge, ClientGone, decode_json, read_body, send_json
from atlas.config import normalize_url
from atlas.gateway.admission import (
    NON_TEXT_PART_TOKENS,
    PER_MESSAGE_TOKENS,
    PER_REQUEST_TOKENS,
    TOOL_TOKENS,
    Refused,
    Ticket,
)
from atlas.gateway.auth import AccessDenied, authenticate
from atlas.gateway.reply_cap import reply_too_large
from atlas.gateway.services import Services
from atlas.llm.provider import DRAIN_SECONDS, provider_error, status_error, transport_error
from atlas.llm.sse import SseDataParser, SseTooLong
from atlas.llm.types import AgentError, Usage
from atlas.store import Identity, StoreError, StoreUnavailable, is_valid_user_id

log = logging.getLogger("atlas.gateway.v1")

MAX_RESPONSE_BYTES = 16 * 1024 * 1024  # a model list (a completion: ATLAS_MAX_REPLY_BYTES)
MAX_ERROR_BYTES = 64 * 1024
ERROR_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 402: "insufficient_quota",
    403: "permission_error", 404: "not_found_error", 405: "invalid_request_error",
    413: "invalid_request_error", 429: "rate_limit_error",
}
SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
DONE = b"data: [DONE]\n\n"
# The routes, with their method (the OpenAPI document must describe each: tests/test_openapi.py).
ROUTES = {"/v1/chat/completions": "POST", "/v1/models": "GET"}

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode


class V1Error(Exception):
    def __init__(self, status: int, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.extra = extra
        self.headers: list[tuple[bytes, bytes]] = []


STORE_UNAVAILABLE = V1Error(503, "store_unavailable", "the store (database) is unavailable; try again shortly")


def error_body(status: int, code: str, message: str, **extra: Any) -> dict[str, Any]:
    kind = ERROR_TYPES.get(status, "api_error")
    return {"error": {"message": message, "type": kind, "param": None, "code": code, **extra}}


async def send_error(send: Any, error: V1Error) -> None:
    body = error_body(error.status, error.code, error.message, **error.extra)
    headers = list(error.headers)
    if error.status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send_json(send, error.status, body, headers)


async def send_raw_json(send: Any, data: bytes) -> None:
    """A provider's JSON answer, passed on as it came."""
    await send({"type": "http.response.start", "status": 200, "headers": [
        *JSON_HEADERS, (b"content-length", str(len(data)).encode()),
    ]})
    await send({"type": "http.response.body", "body": data})


def refused(exc: Refused) -> V1Error:
    extra = {k: v for k, v in exc.to_json().items() if k not in ("code", "message")}
    error = V1Error(exc.status, exc.code, exc.message, **extra)
    error.headers = exc.headers()
    return error


def from_agent_error(exc: AgentError) -> V1Error:
    error = V1Error(exc.status, exc.code, exc.message)
    if exc.retry_after is not None:
        error.headers = [(b"retry-after", str(max(1, round(exc.retry_after))).encode())]
    return error


async def v1_endpoint(services: Services, scope: dict[str, Any], receive: Any, send: Any) -> None:
    path, method = scope["path"].rstrip("/"), scope["method"]
    try:
        allowed = ROUTES.get(path)
        if allowed is None:
            raise V1Error(404, "not_found", f"no route {path}: Atlas serves /v1/chat/completions and /v1/models")
        if method != allowed:
            error = V1Error(405, "method_not_allowed", f"use {allowed} {path}")
            error.headers = [(b"allow", allowed.encode())]
            raise error
        try:
            identity = await authenticate(services.verifier, scope, shutting_down=services.shutting_down)
        except AccessDenied as denied:
            error = V1Error(denied.status, denied.code, denied.message)
            if denied.retry_after is not None:
                error.headers = [(b"retry-after", str(max(1, math.ceil(denied.retry_after))).encode())]
            raise error from None
        if not is_valid_user_id(identity.id):
            log.warning("the auth API named a user id that is not a valid room id")
            raise V1Error(403, "forbidden", "this user's id is not usable here (1-128 of A-Z a-z 0-9 . _ @ -)")
        async with services.rooms.visit_room(identity.id, identity, read=False):
            # Counted for the request's length: shutdown waits for it as for a proxied request.
            # /v1 changes no room, so any process may answer it without taking the room's lease.
            if allowed == "GET":
                await list_models(services, identity, send)
            else:
                await chat_completions(services, identity, scope, receive, send)
    except V1Error as error:
        await send_error(send, error)
    except StoreUnavailable:
        await send_error(send, STORE_UNAVAILABLE)
    except StoreError:
        await send_error(send, V1Error(500, "internal", "this user's stored state is unreadable; the server log names the file"))


def provider_url_for(services: Services, identity: Identity) -> str:
    """The user's provider URL, else the default one; either must be in the allowed list."""
    default = services.default_provider_url  # empty with a remote agent and no provider URL
    url = normalize_url(identity.provider_url) if identity.provider_url else default
    if not url:
        raise V1Error(503, "no_provider", "this Atlas has no provider URL for /v1: set ATLAS_PROVIDER_URL")
    allowed = services.settings.provider_urls or ((normalize_url(default),) if default else ())
    if normalize_url(url) not in allowed:
        raise V1Error(400, "provider_not_allowed", f"provider URL {url!r} is not allowed here")
    return normalize_url(url)


def virtual_key(identity: Identity) -> str:
    key = (identity.virtual_key or "").strip()
    if not key:
        raise V1Error(400, "no_credentials", "this user has no virtual key; ask the operator to set one")
    if not key.isascii() or not key.isprintable() or " " in key:
        raise V1Error(400, "no_credentials", "this user's virtual key has characters a key cannot have")
    return key


def bad(message: str) -> V1Error:
    return V1Error(400, "bad_request", message)


class Request:
    """A checked ``/v1/chat/completions`` body: only what Atlas needs is looked at."""

    def __init__(self, body: bytes) -> None:
        try:
            payload = decode_json(body)
        except BadBody as exc:
            raise bad(str(exc)) from None
        if not isinstance(payload, dict):
            raise bad("body: expected a JSON object")
        model = payload.get("model")
        if not isinstance(model, str) or not model:
            raise bad("model: required, a string")
        messages = payload.get("messages")
        if not isinstance(messages, list) or not messages:
            raise bad("messages: required, a non-empty list")
        non_text = 0
        for index, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise bad(f"messages[{index}]: expected an object with a role")
            content = message.get("content")
            if isinstance(content, list):
                non_text += sum(1 for part in content
                                if not (isinstance(part, dict) and part.get("type") == "text"))
        stream = payload.get("stream", False)
        if stream is not None and not isinstance(stream, bool):
            raise bad("stream: expected true or false")
        options = payload.get("stream_options")
        if options is not None and not isinstance(options, dict):
            raise bad("stream_options: expected an object")
        # JSON's 3 and 3.0 are one number (JSON Schema's integer takes both); the provider is
        # sent 3, which every provider takes.
        self.whole_floats = False
        for name in ("n", "max_completion_tokens", "max_tokens"):
            value = payload.get(name)
            if isinstance(value, float) and value.is_integer():
                payload[name] = int(value)
                self.whole_floats = True
        self.choices = _count(payload, "n") or 1
        self.max_completion_tokens = _count(payload, "max_completion_tokens")
        self.max_tokens = _count(payload, "max_tokens")
        tools = payload.get("tools")
        self.payload = payload
        self.body = body
        self.model = model
        self.stream = bool(stream)
        self.wants_usage = bool(options and options.get("include_usage") is True)
        self.prompt_bound = (
            len(body) + PER_MESSAGE_TOKENS * len(messages) + PER_REQUEST_TOKENS
            + NON_TEXT_PART_TOKENS * non_text + TOOL_TOKENS * (len(tools) if isinstance(tools, list) else 0)
        )

    @property
    def output_cap(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def provider_body(self, cap: int | None) -> bytes:
        """The body for the provider: as it came, plus include_usage, the granted cap and
        whole numbers written as such."""
        payload = self.payload
        changed = self.whole_floats
        if self.stream and not self.wants_usage:
            payload["stream_options"] = {**(payload.get("stream_options") or {}), "include_usage": True}
            changed = True
        if cap is not None:
            if self.max_completion_tokens is not None:
                payload["max_completion_tokens"] = cap
            if self.max_tokens is not None or self.max_completion_tokens is None:
                payload["max_tokens"] = cap
            changed = True
        return _encode(payload) if changed else self.body


def _count(payload: dict[str, Any], name: str) -> int | None:
    value = payload.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise bad(f"{name}: expected a whole number of at least 1")
    return value


class _UsageChunk(msgspec.Struct):
    choices: list[msgspec.Raw] | None = None
    usage: Usage | None = None


class _Completion(msgspec.Struct):
    usage: Usage | None = None


_usage_chunk = msgspec.json.Decoder(_UsageChunk)
_completion = msgspec.json.Decoder(_Completion)
_check_json = msgspec.json.Decoder(msgspec.Raw).decode  # validates without building (0.3 µs an event)


async def chat_completions(
    services: Services, identity: Identity, scope: dict[str, Any], receive: Any, send: Any
) -> None:
    try:
        body = await read_body(receive, services.settings.max_message_bytes)
    except BodyTooLarge as exc:
        raise V1Error(413, "too_large", str(exc)) from None
    except ClientGone:
        raise V1Error(400, "bad_request", "the client went away before sending the body") from None
    request = Request(body)
    key = virtual_key(identity)
    url = f"{provider_url_for(services, identity)}/chat/completions"
    started = trio.current_time()
    failure: V1Error | None = None
    response_started = False

    async def tracked_send(message: dict[str, Any]) -> None:
        nonlocal response_started
        response_started = response_started or message["type"] == "http.response.start"
        await send(message)

    async with trio.open_nursery() as nursery:
        # A client that goes away cancels the request, which closes the provider's response.
        nursery.start_soon(_cancel_on_disconnect, receive, nursery.cancel_scope)
        outcome = "client_gone"
        try:
            outcome = await complete(services, identity, request, key, url, tracked_send)
        except V1Error as exc:  # raised after the nursery, not wrapped in a group
            outcome = exc.code
            if not response_started:
                failure = exc
            else:  # mid-stream (past the request's deadline, say): an error event ends the stream
                event = b"data: " + _encode(error_body(exc.status, exc.code, exc.message)) + b"\n\n"
                await send({"type": "http.response.body", "body": event, "more_body": False})
        except Exception as exc:  # the request's boundary: a bug, a store that cannot be read
            outcome = "store_unavailable" if isinstance(exc, StoreUnavailable) else "internal"
            if isinstance(exc, StoreError):
                log.error("v1 request of %r: %s", identity.id, exc)
            else:
                log.exception("v1 request of %r failed", identity.id)
            if not response_started:
                failure = (
                    STORE_UNAVAILABLE if isinstance(exc, StoreUnavailable)
                    else V1Error(500, "internal", "internal error; see the server log")
                )
            else:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            nursery.cancel_scope.cancel()
    log.info("v1 %s user=%r: %s in %.0f ms", request.model[:64], identity.id, outcome,
             (trio.current_time() - started) * 1000)
    if failure is not None:
        raise failure


async def complete(
    services: Services, identity: Identity, request: Request, key: str, url: str, send: Any
) -> str:
    """Admit, call and relay; returns the outcome for the log line."""
    admission = services.admission
    try:
        async with admission.admit(
            identity.id, admission.limits_for(identity), prompt=request.prompt_bound,
            output=request.output_cap, choices=request.choices, path="v1", agent=request.model[:64],
        ) as ticket:
            body = request.provider_body(ticket.cap)
            async with services.provider.open_response("POST", url, key, body, stream=request.stream) as response:
                if response.status_code != 200:
                    await pass_provider_error(response, key, send)
                    ticket.failed(status_error(response.status_code, None).code)
                    return f"provider_status_{response.status_code}"
                ticket.answered()
                cap = services.settings.max_reply_bytes
                if request.stream:
                    await relay_stream(response, request, ticket, send, key.encode(), cap)
                else:
                    await relay_completion(response, ticket, send, key.encode(), cap)
                return "ok"
    except Refused as exc:
        raise refused(exc) from None
    except AgentError as exc:
        raise from_agent_error(exc) from None


async def _cancel_on_disconnect(receive: Any, scope: trio.CancelScope) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    scope.cancel()


async def relay_stream(
    response: httpx.Response, request: Request, ticket: Ticket, send: Any, key: bytes, cap: int
) -> None:
    """The provider's events to the client as they come. The usage is settled (durably) as
    soon as it is known, before the event that carries it or ``[DONE]`` is passed on. The
    virtual key never reaches the client, even inside an event a provider got wrong; an event
    that is not JSON never reaches it either (no OpenAI client could read it): the stream ends
    there with a ``provider_error`` event, as the agent's does. A stream longer than ``cap``
    bytes ends with an error event ``too_large``."""
    await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
    parser = SseDataParser()
    usage: Usage | None = None
    finished = False
    size = 0

    async def fail(error: AgentError) -> None:
        await ticket.settle(usage)
        ticket.failed(error.code)
        event = error_body(502, error.code, error.message)
        await send({"type": "http.response.body", "body": b"data: " + _encode(event) + b"\n\n",
                    "more_body": True})

    try:
        async for chunk in response.stream:
            ticket.first_token()
            size += len(chunk)
            if size > cap:
                await fail(reply_too_large(cap))
                break
            out: list[bytes] = []
            not_json = False
            for data in parser.feed(chunk):
                if data == b"[DONE]":
                    await ticket.settle(usage)
                    out.append(DONE)
                    finished = True
                    break
                try:
                    _check_json(data)
                except msgspec.DecodeError:
                    not_json = True
                    break
                if b'"usage"' in data:
                    try:
                        parsed = _usage_chunk.decode(data)
                    except msgspec.DecodeError:
                        parsed = _UsageChunk()
                    if parsed.usage is not None:
                        usage = parsed.usage
                        if not parsed.choices:  # the final usage chunk (some send it on every chunk)
                            await ticket.settle(usage)
                            if not request.wants_usage:
                                continue  # Atlas asked for it, not the client
                if key in data:
                    data = data.replace(key, b"***")
                out.append(b"data: " + data + b"\n\n")
            if out:
                await send({"type": "http.response.body", "body": b"".join(out), "more_body": True})
            if not_json:
                await fail(provider_error("the provider sent a stream event that is not JSON"))
                break
            if finished:
                break
    except (httpx.TransportError, SseTooLong) as exc:
        await fail(transport_error(exc, streaming=True) if isinstance(exc, httpx.TransportError)
                   else provider_error("the provider sent an over-long stream event"))
    await ticket.settle(usage)
    if finished:
        ticket.delivered()
        # The client has had [DONE]. Read the provider's body to its end (it follows at once)
        # before ending ours, so that the connection is back in the pool before the client's next
        # request can need it, as the agent does.
        with trio.move_on_after(DRAIN_SECONDS):
            try:
                async for _ in response.stream:
                    pass
            except httpx.TransportError:
                pass
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def relay_completion(
    response: httpx.Response, ticket: Ticket, send: Any, key: bytes, cap: int
) -> None:
    try:
        data = await _read(response, cap)
    except httpx.TransportError as exc:
        raise from_agent_error(transport_error(exc, streaming=True)) from None
    except V1Error:  # over the cap: settled by admission (the usage is in the part not read)
        raise from_agent_error(reply_too_large(cap)) from None
    try:
        _check_json(data)
    except msgspec.DecodeError:  # no OpenAI client could read it: the provider failed
        await ticket.settle(None)
        ticket.failed("provider_error")
        raise V1Error(502, "provider_error", "the provider's answer is not JSON") from None
    try:
        usage = _completion.decode(data).usage
    except msgspec.DecodeError:
        usage = None
    await ticket.settle(usage)
    if key in data:
        data = data.replace(key, b"***")
    headers = [(k, v) for k, v in response.headers.raw if k.lower() == b"content-type"]
    await send({"type": "http.response.start", "status": 200, "headers": [
        *(headers or [(b"content-type", b"application/json")]),
        (b"content-length", str(len(data)).encode()),
    ]})
    # Hypercorn reports the client's disconnect as soon as the response is complete, inside this
    # very send: the answer is out by then, so that disconnect must not count as a cancel.
    with trio.CancelScope(shield=True):
        await send({"type": "http.response.body", "body": data})
    ticket.delivered()


async def _read(response: httpx.Response, limit: int) -> bytes:
    chunks, size = [], 0
    async for chunk in response.stream:
        size += len(chunk)
        if size > limit:
            raise V1Error(502, "provider_error", "the provider's answer is too large")
        chunks.append(chunk)
    return b"".join(chunks)


async def pass_provider_error(response: httpx.Response, key: str, send: Any) -> None:
    """The provider's own status and error, with the virtual key blanked out if it is quoted."""
    status = response.status_code
    try:
        data = await _read(response, MAX_ERROR_BYTES)
    except (httpx.TransportError, V1Error):
        data = b""
    try:
        payload = _decode(data.replace(key.encode(), b"***")) if data else None
    except msgspec.DecodeError:
        payload = None
    if not (isinstance(payload, dict) and isinstance(payload.get("error"), dict)):
        payload = error_body(status, "provider_error", f"the provider failed (HTTP {status})")
    headers = [(b"retry-after", v) for k, v in response.headers.raw if k.lower() == b"retry-after"]
    await send_json(send, status if 400 <= status < 600 else 502, payload, headers)


async def list_models(services: Services, identity: Identity, send: Any) -> None:
    """The provider's model list for this user; the configured agents' models when the
    provider has no ``/models``."""
    key = virtual_key(identity)
    url = f"{provider_url_for(services, identity)}/models"
    try:
        async with services.provider.open_response("GET", url, key) as response:
            if response.status_code == 200:
                data = await _read(response, MAX_RESPONSE_BYTES)
                await send_raw_json(send, data)
                return
            if response.status_code not in (404, 405):
                await pass_provider_error(response, key, send)
                return
    except AgentError as exc:
        raise from_agent_error(exc) from None
    except httpx.TransportError as exc:
        raise from_agent_error(transport_error(exc, streaming=True)) from None
    models = sorted(set(await services.agent_models()))
    await send_json(send, 200, {"object": "list", "data": [
        {"id": model, "object": "model", "created": 0, "owned_by": "atlas"} for model in models
    ]})
