"""Pieces of the OpenAPI documents Atlas publishes (``GET /openapi.json`` on the agent API and on
the gateway): schemas from the msgspec types the code decodes and encodes with, so that a
document cannot drift from its decoder, and the few shapes every document repeats.

OpenAPI 3.2 because it is the first version that describes an event stream: a
``text/event-stream`` response has an ``itemSchema`` for one event, whose ``data`` is a string
holding JSON (``contentMediaType``/``contentSchema``). Its schemas are JSON Schema 2020-12, which
is what ``msgspec.json.schema_components`` writes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

import msgspec

Send = Callable[[dict[str, Any]], Awaitable[None]]

VERSION = "3.2.0"
JSON = "application/json"
SSE = "text/event-stream"
CONTENT_TYPE = b"application/json"

_REF = "#/components/schemas/{name}"


def ref(name: str) -> dict[str, str]:
    return {"$ref": _REF.format(name=name)}


def schemas_of(types: Iterable[Any]) -> dict[str, Any]:
    """The component schemas of msgspec types (and of every type they refer to), by name."""
    _, components = msgspec.json.schema_components(tuple(types), ref_template=_REF)
    return components


def schema_of(type_: Any) -> dict[str, Any]:
    """The inline schema of a small msgspec type (an ``Annotated`` string, say)."""
    return msgspec.json.schema(type_)


def json_response(description: str, schema: Mapping[str, Any], **headers: Mapping[str, Any]) -> dict[str, Any]:
    response: dict[str, Any] = {"description": description, "content": {JSON: {"schema": schema}}}
    if headers:
        response["headers"] = dict(headers)
    return response


def sse_response(
    description: str, event: Mapping[str, Any], *, done: bool = False, **headers: Mapping[str, Any]
) -> dict[str, Any]:
    """An event stream of ``data: {json}`` events (``event`` is one JSON payload's schema);
    ``done``: the stream ends with the literal ``data: [DONE]``, as OpenAI's and the AI SDK's do."""
    data: dict[str, Any] = {"type": "string", "contentMediaType": JSON, "contentSchema": event}
    if done:
        data = {"anyOf": [{"const": "[DONE]"}, data]}
    item = {"type": "object", "required": ["data"], "properties": {"data": data}}
    response: dict[str, Any] = {"description": description, "content": {SSE: {"itemSchema": item}}}
    if headers:
        response["headers"] = dict(headers)
    return response


def header(description: str, schema: Mapping[str, Any] | None = None, *, required: bool = False) -> dict[str, Any]:
    return {"description": description, "required": required, "schema": dict(schema or {"type": "string"})}


def const_object(required: Mapping[str, Any], **optional: Any) -> dict[str, Any]:
    """An object with exactly these properties (``required`` ones, then ``optional`` ones)."""
    return {
        "type": "object",
        "required": list(required),
        "properties": {**required, **optional},
        "additionalProperties": False,
    }


def encode(document: Mapping[str, Any]) -> bytes:
    return msgspec.json.encode(document)


async def send_document(send: Send, data: bytes) -> None:
    """The encoded document as a whole JSON response."""
    await send({"type": "http.response.start", "status": 200, "headers": [
        (b"content-type", CONTENT_TYPE), (b"content-length", str(len(data)).encode()),
        (b"cache-control", b"no-cache"),
    ]})
    await send({"type": "http.response.body", "body": data})
