"""The agent API's OpenAPI document, served at ``GET /openapi.json`` (docs/agent.md).

The options and the agents' budgets come from the msgspec types the code decodes and encodes
with (``AgentOptions``, ``AgentBudget``, the ``AgentId`` pattern). The request body's ``input``
and the responses are written by hand, as ``parse_input`` and the SSE dialects are: the fuzz
tests (tests/reliability/test_schemathesis.py) hold every response to these schemas.
"""

from __future__ import annotations

from typing import Any

from atlas import openapi
from atlas.agent import AgentOptions
from atlas.llm.agents import AgentId
from atlas.llm.types import AgentBudget
from atlas.openapi import const_object, header, json_response, ref, sse_response

ROLE = {"type": "string", "enum": ["system", "user", "assistant"]}
# What parse_input takes as text: a string with something other than white space in it.
TEXT = {"type": "string", "pattern": r"\S"}
TEXT_PART = const_object({"type": {"const": "text"}, "text": {"type": "string"}})
# Parts of another type (images, files, tool calls...) are accepted and skipped.
OTHER_PART = {"type": "object", "properties": {"type": {"not": {"const": "text"}}}}
PARTS = {"type": "array", "items": {"anyOf": [TEXT_PART, OTHER_PART]}}
NONEMPTY_TEXT_PART = const_object({"type": {"const": "text"}, "text": {"type": "string", "minLength": 1}})


def _message(parts: dict[str, Any], content: dict[str, Any]) -> dict[str, Any]:
    """A message with ``parts`` (a UIMessage; ``content`` is then ignored) or ``content`` (a
    ModelMessage: a string or parts)."""
    return {
        "type": "object",
        "required": ["role"],
        "properties": {"role": ROLE},
        "anyOf": [
            {"required": ["parts"], "properties": {"parts": parts}},
            {"required": ["content"], "not": {"required": ["parts"]}, "properties": {"content": content}},
        ],
    }


MESSAGE = _message(PARTS, {"anyOf": [{"type": "string"}, PARTS]})
# parse_input refuses a list in which no message has any text.
MESSAGE_WITH_TEXT = _message(
    {**PARTS, "contains": NONEMPTY_TEXT_PART},
    {"anyOf": [{"type": "string", "minLength": 1}, {**PARTS, "contains": NONEMPTY_TEXT_PART}]},
)
MESSAGES = {"type": "array", "minItems": 1, "items": ref("Message"), "contains": ref("MessageWithText")}
INPUT = {"anyOf": [TEXT, MESSAGES]}

GENERATE_BODY = {
    "description": "VoltAgent's {input, options}, or AI SDK useChat's {id, messages, trigger}. "
                   "With both, input is used.",
    "type": "object",
    "properties": {
        "input": INPUT,
        "messages": {},  # looked at only without input: below
        "options": {"anyOf": [ref("AgentOptions"), {"type": "null"}]},
        # Sent by useChat; accepted and not used.
        "id": {}, "trigger": {}, "messageId": {}, "metadata": {},
    },
    "anyOf": [
        {"required": ["input"]},
        # parse_input reads messages as it reads input: a string is taken too.
        {"required": ["messages"], "not": {"required": ["input"]}, "properties": {"messages": INPUT}},
    ],
    "additionalProperties": False,
}

COUNT = {"type": "integer", "minimum": 0}
CAMEL_USAGE = const_object({"promptTokens": COUNT, "completionTokens": COUNT, "totalTokens": COUNT})
FINISH_REASON = {"type": "string", "description": "the provider's, or unknown when it sent none"}


def _agent_info(agent_id: dict[str, Any]) -> dict[str, Any]:
    return const_object({
        "id": agent_id,
        "name": {"type": "string"},
        "description": {"type": "string"},
        "status": {"const": "idle"},
        "model": {"type": "string"},
        "tools": {"type": "array", "maxItems": 0},
        "subAgents": {"type": "array", "maxItems": 0},
        "memory": {"type": "null"},
        "isTelemetryEnabled": {"const": False},
        "budget": ref("AgentBudget"),
    })


TEXT_RESULT = const_object({
    "text": {"type": "string"},
    "usage": CAMEL_USAGE,
    "finishReason": FINISH_REASON,
    "toolCalls": {"type": "array", "maxItems": 0},
    "toolResults": {"type": "array", "maxItems": 0},
})
ERROR = const_object({"code": {"type": "string"}, "message": {"type": "string"}})


def _event(kind: str, **fields: Any) -> dict[str, Any]:
    return const_object({"type": {"const": kind}, **fields})


TEXT_ID = {"type": "string"}
FULL_STREAM_EVENT = {"oneOf": [
    _event("start"),
    _event("text-start", id=TEXT_ID),
    _event("text-delta", id=TEXT_ID, text={"type": "string"}),
    _event("text-end", id=TEXT_ID),
    _event("finish", finishReason=FINISH_REASON, totalUsage=const_object(
        {"inputTokens": COUNT, "outputTokens": COUNT, "totalTokens": COUNT})),
    _event("error", error=ERROR),
]}
UI_STREAM_EVENT = {"oneOf": [
    _event("start", messageId={"type": "string"}),
    _event("start-step"),
    _event("text-start", id=TEXT_ID),
    _event("text-delta", id=TEXT_ID, delta={"type": "string"}),
    _event("text-end", id=TEXT_ID),
    _event("finish-step"),
    _event("finish", messageMetadata=const_object({"finishReason": FINISH_REASON, "usage": CAMEL_USAGE})),
    _event("error", errorText={"type": "string"}),
]}

RETRY_AFTER = header("seconds to wait, when the provider said so", {"type": "integer", "minimum": 0})
ERRORS = {
    "400": "bad_request (the message starts with the field), no_credentials, provider_not_allowed",
    "401": "agent_secret_mismatch (X-Atlas-Agent-Secret), provider_auth (the provider refused the key)",
    "404": "not_found, unknown_agent",
    "413": "too_large: the body is over ATLAS_MAX_MESSAGE_BYTES",
    "429": "provider_rate_limited",
    "502": "provider_error, provider_unreachable",
    "504": "provider_timeout",
}


def _errors(*statuses: str) -> dict[str, Any]:
    responses = {}
    for status in statuses:
        response = json_response(ERRORS[status], ref("Error"))
        if status == "429":
            response["headers"] = {"Retry-After": RETRY_AFTER}
        responses[status] = response
    return responses


def _ok(data: dict[str, Any]) -> dict[str, Any]:
    return const_object({"success": {"const": True}, "data": data})


def build_document(*, secret_required: bool) -> dict[str, Any]:
    """The document of an agent API; ``secret_required``: ATLAS_AGENT_SECRET is set."""
    agent_id = openapi.schema_of(AgentId)
    secured = [{"agentSecret": []}] if secret_required else []
    guarded = ("401",) if secret_required else ()
    id_param = {"name": "id", "in": "path", "required": True, "schema": agent_id}
    credentials = [
        {"name": "X-Provider-API-Key", "in": "header", "required": True,
         "description": "the provider key, sent on as Authorization: Bearer; never logged or returned",
         "schema": {"type": "string", "pattern": r"^[!-~]+$"}},
        {"name": "X-Provider-API-URL", "in": "header", "required": False,
         "description": "the provider's base URL ending in /v1; must be in ATLAS_PROVIDER_URLS "
                        "(default: the configured provider)",
         "schema": {"type": "string", "format": "uri"}},
        {"name": "X-User-ID", "in": "header", "required": False,
         "description": "the user the request is for (logged; not a secret)", "schema": {"type": "string"}},
    ]

    def generate(route: str, summary: str, ok: dict[str, Any]) -> dict[str, Any]:
        return {"post": {
            "operationId": route, "summary": summary, "security": secured, "parameters": [id_param, *credentials],
            "requestBody": {"required": True, "content": {openapi.JSON: {"schema": ref("GenerateBody")}}},
            "responses": {"200": ok, **_errors("400", "401", "404", "413", "429", "502", "504")},
        }}

    schemas = openapi.schemas_of([AgentOptions, AgentBudget])
    schemas.update({
        "GenerateBody": GENERATE_BODY, "Message": MESSAGE, "MessageWithText": MESSAGE_WITH_TEXT,
        "Agent": _agent_info(agent_id), "TextResult": TEXT_RESULT, "Usage": CAMEL_USAGE,
        "Error": const_object(
            {"success": {"const": False}, "error": {"type": "string"}, "code": {"type": "string"}}),
        "StreamEvent": FULL_STREAM_EVENT, "UIMessageChunk": UI_STREAM_EVENT,
    })
    document: dict[str, Any] = {
        "openapi": openapi.VERSION,
        "info": {
            "title": "Atlas agent API",
            "version": "1",
            "description": "A VoltAgent-compatible subset: one streamed reply from an OpenAI-compatible "
                           "provider per request, with the provider key that comes with the request.",
        },
        "paths": {
            "/healthz": {"get": {
                "operationId": "healthz", "summary": "Liveness", "security": [],
                "responses": {"200": json_response("alive", const_object({"ok": {"const": True}}))},
            }},
            "/openapi.json": {"get": {
                "operationId": "openapi", "summary": "This document", "security": [],
                "responses": {"200": json_response("the OpenAPI document", {"type": "object"})},
            }},
            "/agents": {"get": {
                "operationId": "listAgents", "summary": "The agents", "security": secured,
                "responses": {"200": json_response("the agents", _ok({"type": "array", "items": ref("Agent")})),
                              **_errors(*guarded)},
            }},
            "/agents/{id}": {"get": {
                "operationId": "getAgent", "summary": "One agent", "security": secured, "parameters": [id_param],
                "responses": {"200": json_response("the agent", _ok(ref("Agent"))), **_errors(*guarded, "404")},
            }},
            "/agents/{id}/text": generate(
                "generateText", "One whole reply",
                json_response("the reply", _ok(ref("TextResult"))),
            ),
            "/agents/{id}/stream": generate(
                "streamText", "The reply as VoltAgent's event stream",
                sse_response("start, text-start, text-delta..., text-end, finish; a failure once the "
                             "stream has started is an error event", ref("StreamEvent")),
            ),
            "/agents/{id}/chat": generate(
                "chat", "The reply as an AI SDK UI message stream (useChat)",
                sse_response("start, start-step, text-start, text-delta..., text-end, finish-step, "
                             "finish, then [DONE]; a failure once started is an error event, then [DONE]",
                             ref("UIMessageChunk"), done=True,
                             **{"x-vercel-ai-ui-message-stream": header("the stream's protocol", {"const": "v1"},
                                                                        required=True)}),
            ),
        },
        "components": {"schemas": schemas},
    }
    if secret_required:
        document["components"]["securitySchemes"] = {"agentSecret": {
            "type": "apiKey", "in": "header", "name": "X-Atlas-Agent-Secret",
            "description": "ATLAS_AGENT_SECRET, shared with the gateway in front of this agent",
        }}
    return document
