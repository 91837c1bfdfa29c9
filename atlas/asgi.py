"""The few raw-ASGI pieces every Atlas HTTP app shares: a JSON response, a bounded body reader,
and the query string. (The apps are raw ASGI on their hot paths; see docs/architecture.md.)"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any
from urllib.parse import parse_qsl

import msgspec

Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Headers = Sequence[tuple[bytes, bytes]]

JSON_HEADERS: Headers = ((b"content-type", b"application/json"), (b"cache-control", b"no-store"))

_encode = msgspec.json.Encoder().encode


class BodyTooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"request body over {limit} bytes")
        self.limit = limit


class ClientGone(Exception):
    """The client disconnected before its request body was complete."""


async def send_json(send: Send, status: int, body: Any, headers: Headers = ()) -> None:
    """A whole JSON response, never cached."""
    data = _encode(body)
    await send({
        "type": "http.response.start", "status": status,
        "headers": [*JSON_HEADERS, (b"content-length", str(len(data)).encode()), *headers],
    })
    await send({"type": "http.response.body", "body": data})


async def read_body(receive: Receive, limit: int) -> bytes:
    """The request body, refused (``BodyTooLarge``) as soon as it grows past ``limit`` bytes."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


class BadBody(ValueError):
    """A request body that is not usable JSON; the message names the problem (``body: ...``)."""


_decode = msgspec.json.Decoder().decode


def decode_json(body: bytes) -> Any:
    """The body's JSON value, or ``BadBody`` saying what is wrong with it."""
    try:
        return _decode(body)
    except msgspec.DecodeError as exc:
        raise BadBody(f"body: not valid JSON ({exc})") from None
    except RecursionError:
        raise BadBody("body: nested too deeply") from None


def query_pairs(scope: dict[str, Any]) -> list[tuple[str, str]]:
    """The query string's pairs in order, blank values kept (bytes read as latin-1, as ASGI says)."""
    return parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)


def query_param(scope: dict[str, Any], name: str) -> str | None:
    """The first value of ``name`` in the query string, or None."""
    for key, value in query_pairs(scope):
        if key == name:
            return value
    return None
