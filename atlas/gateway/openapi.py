"""The gateway's OpenAPI document, served at ``GET /openapi.json`` on its port (docs/clients.md).

It describes the HTTP API a program calls: ``/v1`` (OpenAI's shapes), the room routes
(``/party/{room}`` and ``/parties/main/{room}``: the status, the usage, and ``?proxy=`` to the
agent's generation routes), ``/healthz``, ``/metrics``, ``/api/me`` (built-in auth only) and
this document. Not described: the WebSocket (OpenAPI has no words for it; docs/protocol.md does)
and the web page with its files (``/``, ``/static/...``), which are not an API.

The usage report, the error body and ``/api/me``'s identity come from the msgspec types the code
encodes them with; the agent's bodies and events from the agent API's own document.
"""

from __future__ import annotations

from typing import Any

import msgspec

from atlas import openapi
from atlas.asgi import send_json
from atlas.agent_api.openapi import build_document as agent_document
from atlas.config import Settings
from atlas.openapi import const_object, header, json_response, ref, sse_response
from atlas.protocol import ErrorBody, UsageDay, UsageLimits, UsageRemaining
from atlas.store import Identity

ROOM_ID = {"type": "string", "pattern": r"^[A-Za-z0-9._@-]{1,128}$"}
ROOM_PREFIXES = ("/party", "/parties/main")
# The page and its files: served on this port, not an API (see the module's docstring).
UNDOCUMENTED = ("/", "/static/{filename}")


class UsageReport(msgspec.Struct, rename="camel"):
    """``GET /party/{room}/usage``: ``atlas.store.usage.report``'s object."""

    user_id: str
    days: list[UsageDay]
    limits: UsageLimits
    remaining: UsageRemaining


class RoomError(msgspec.Struct):
    error: ErrorBody


COUNT = {"type": "integer", "minimum": 0}
ROOM_STATUS = const_object({
    "roomId": ROOM_ID,
    "userId": ROOM_ID,
    "credentials": {"type": "boolean", "description": "whether the room has a provider key"},
    "virtualKey": {"type": "string", "description": "masked: its last four characters at most"},
    "providerUrl": {"type": ["string", "null"]},
    "prefs": {"type": "object"},
    "connections": COUNT,
    "usageToday": const_object({
        "requests": COUNT, "promptTokens": COUNT, "completionTokens": COUNT, "totalTokens": COUNT}),
})
HEALTH = {
    "type": "object",
    "required": ["ok", "rooms"],
    "properties": {"ok": {"type": "boolean"}, "rooms": COUNT, "error": ref("ErrorBody")},
}
# OpenAI's error shape; quota_exceeded and rate_limited add the refusal's fields (resetAt...).
# Atlas's own errors have all four fields; a provider's error is passed on as it came, so only
# the envelope is promised.
V1_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {
        "type": "object",
        "properties": {"message": {"type": "string"}, "type": {"type": "string"}, "param": {"type": "null"},
                       "code": {"type": ["string", "integer", "null"]}},
    }},
}
# What /v1/chat/completions checks; everything else goes to the provider as it came.
WHOLE = {"type": ["integer", "null"], "minimum": 1}
CHAT_REQUEST = {
    "type": "object",
    "required": ["model", "messages"],
    "properties": {
        "model": {"type": "string", "minLength": 1},
        "messages": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["role"], "properties": {"role": {"type": "string"}}}},
        "stream": {"type": ["boolean", "null"]},
        "stream_options": {"type": ["object", "null"]},
        "n": WHOLE, "max_tokens": WHOLE, "max_completion_tokens": WHOLE,
    },
}
MODEL_LIST = {
    "type": "object",
    "required": ["object", "data"],
    "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": {
        "type": "object", "required": ["id"], "properties": {"id": {"type": "string"}}}}},
}
RETRY_AFTER = header("seconds to wait", {"type": "integer", "minimum": 1})
WWW_AUTHENTICATE = header("Bearer", {"const": "Bearer"})


def _errors(schema: dict[str, Any], **described: str) -> dict[str, Any]:
    """Error responses by status (``s401="..."``), with their headers."""
    responses = {}
    for key, description in described.items():
        status = key.removeprefix("s")
        response = json_response(description, schema)
        if status == "401":
            response["headers"] = {"WWW-Authenticate": WWW_AUTHENTICATE}
        elif status == "429":
            response["headers"] = {"Retry-After": RETRY_AFTER}
        responses[status] = response
    return responses


ROOM_DENIALS = {
    "s400": "bad_room_id", "s401": "unauthorized: no token, or not a valid one",
    "s403": "forbidden: the token belongs to another user's room",
    "s429": "too_many_failures: this address sent too many bad tokens",
    "s503": "shutting_down, auth_unavailable, store_unavailable",
}


def _room_paths(prefix: str, name: str) -> dict[str, Any]:
    room = {"name": "room", "in": "path", "required": True, "schema": ROOM_ID,
            "description": "the room: its user's id"}
    proxy = {"name": "proxy", "in": "query", "required": True,
             "schema": {"type": "string", "pattern": r"^/agents/[A-Za-z0-9._-]{1,64}/(text|stream|chat)$"},
             "description": "the agent route to call; any agent route can be given (GET ones with GET)"}
    agent_error = {"anyOf": [ref("RoomError"), ref("Error")]}
    return {
        f"{prefix}/{{room}}": {
            "get": {
                "operationId": f"{name}Status", "summary": "The room's status (with ?proxy=, the agent's "
                "GET routes, which the agent's own document describes)",
                "parameters": [room],
                "responses": {"200": json_response("the room", ref("RoomStatus")),
                              **_errors(ref("RoomError"), **ROOM_DENIALS)},
            },
            "post": {
                "operationId": f"{name}Proxy",
                "summary": "A request to the agent, with the room's credentials, billed to its user",
                "parameters": [room, proxy],
                "requestBody": {"required": True, "content": {openapi.JSON: {"schema": ref("GenerateBody")}}},
                "responses": {
                    "200": {"description": "the agent's answer (text: JSON; stream and chat: events)", "content": {
                        openapi.JSON: {"schema": ref("AgentText")},
                        **sse_response("", {"anyOf": [ref("StreamEvent"), ref("UIMessageChunk")]},
                                       done=True)["content"],
                    }},
                    **_errors(agent_error, **{
                        **ROOM_DENIALS, "s400": "bad_room_id, bad_proxy_path, or the agent's bad_request",
                        "s402": "quota_exceeded: the user's token limit is spent (resetAt, limit)",
                        "s404": "the agent's unknown_agent",
                        "s413": "too_large",
                        "s429": "rate_limited (the user's limits), too_many_failures, provider_rate_limited",
                        "s502": "provider_error, provider_unreachable, agent_unavailable",
                        "s504": "provider_timeout",
                    }),
                },
            },
        },
        f"{prefix}/{{room}}/usage": {"get": {
            "operationId": f"{name}Usage", "summary": "The user's usage ledger, limits and what is left",
            "parameters": [room, {
                "name": "since", "in": "query", "required": False,
                "schema": {"type": "string", "format": "date"},
                "description": "the first day (UTC) to list; default: the last 31 days"}],
            "responses": {"200": json_response("the usage", ref("UsageReport")),
                          **_errors(ref("RoomError"),
                                    **{**ROOM_DENIALS, "s400": "bad_room_id, bad_request (since)"})},
        }},
    }


def build_document(settings: Settings) -> dict[str, Any]:
    agent = agent_document(secret_required=False)
    schemas = {
        name: agent["components"]["schemas"][name]
        for name in ("GenerateBody", "Message", "MessageWithText", "AgentOptions", "MemoryOptions",
                     "Usage", "Error", "StreamEvent", "UIMessageChunk", "TextResult")
    }
    schemas.update(openapi.schemas_of([UsageReport, RoomError, Identity]))
    schemas.update({
        "RoomStatus": ROOM_STATUS, "Health": HEALTH, "V1Error": V1_ERROR, "ChatRequest": CHAT_REQUEST,
        "ModelList": MODEL_LIST,
        "AgentText": const_object({"success": {"const": True}, "data": ref("TextResult")}),
    })
    v1_errors = _errors(ref("V1Error"), **{
        "s400": "bad_request, no_credentials, provider_not_allowed",
        "s401": "unauthorized: no token, or not a valid one",
        "s403": "forbidden", "s413": "too_large",
        "s429": "rate_limited, too_many_failures, or the provider's",
        "s503": "shutting_down, auth_unavailable, store_unavailable, no_provider",
        "s4XX": "the provider's own error, passed on (a key it quotes is blanked)",
        "s5XX": "the provider's own error, or provider_error, provider_unreachable, provider_timeout",
    })
    paths: dict[str, Any] = {
        "/healthz": {"get": {
            "operationId": "healthz", "summary": "Whether this process takes work", "security": [],
            "responses": {"200": json_response("ok", ref("Health")),
                          "503": json_response("shutting down, or the store is unreachable", ref("Health"))},
        }},
        "/openapi.json": {"get": {
            "operationId": "openapi", "summary": "This document", "security": [],
            "responses": {"200": json_response("the OpenAPI document", {"type": "object"})},
        }},
        "/metrics": {"get": {
            "operationId": "metrics", "summary": "Prometheus metrics", "security": [],
            "responses": {"200": {"description": "the text exposition format",
                                  "content": {"text/plain": {"schema": {"type": "string"}}}}},
        }},
        "/v1/chat/completions": {"post": {
            "operationId": "createChatCompletion",
            "summary": "OpenAI's chat completions, billed to the token's user, with the user's provider key",
            "requestBody": {"required": True, "content": {openapi.JSON: {"schema": ref("ChatRequest")}}},
            "responses": {
                "200": {"description": "the provider's chat.completion, or its chunks (stream: true)", "content": {
                    openapi.JSON: {"schema": {"type": "object"}},
                    **sse_response("", {"type": "object"}, done=True)["content"],
                }},
                **v1_errors,
                "402": json_response("quota_exceeded (resetAt, limit)", ref("V1Error")),
            },
        }},
        "/v1/models": {"get": {
            "operationId": "listModels", "summary": "The provider's models (else the agents' models)",
            "responses": {"200": json_response("the models", ref("ModelList")), **v1_errors},
        }},
    }
    for prefix, name in zip(ROOM_PREFIXES, ("party", "parties"), strict=True):
        paths.update(_room_paths(prefix, name))
    if not settings.auth_url:  # the built-in auth API
        paths["/api/me"] = {"get": {
            "operationId": "me", "summary": "The token's user (built-in auth)", "security": [{"bearer": []}],
            "responses": {"200": json_response("the user", ref("Identity")),
                          **_errors(ref("RoomError"), s401="unauthorized", s503="store_unavailable")},
        }}
    return {
        "openapi": openapi.VERSION,
        "info": {"title": "Atlas gateway", "version": "1",
                 "description": "The gateway's HTTP API. The WebSocket protocol (/party/{room}, "
                                "/parties/main/{room}) is in docs/protocol.md."},
        "security": [{"bearer": []}, {"token": []}],
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "the user's Atlas token"},
                "token": {"type": "apiKey", "in": "query", "name": "token",
                          "description": "the user's Atlas token in the query (prefer the header)"},
            },
        },
    }


def encode_document(settings: Settings) -> bytes:
    return openapi.encode(build_document(settings))


async def serve_document(scope: dict[str, Any], send: Any, data: bytes) -> None:
    """``/openapi.json``: the document to a GET (or HEAD), a JSON 405 to any other method."""
    if scope["method"] in ("GET", "HEAD"):
        await openapi.send_document(send, data)
        return
    await send_json(send, 405, {"error": {"code": "method_not_allowed", "message": "use GET /openapi.json"}},
                    [(b"allow", b"GET, HEAD")])
