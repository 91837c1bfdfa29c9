"""``/party/{roomId}?proxy=/path``: forward an HTTP request to the agent with the room's credentials.

The path must be an agent route (``/agents`` or below, or ``/openapi.json``), judged after
percent-decoding until nothing changes; anything else is refused with 400 before a byte is sent.
Only the client headers an agent request needs go on (an allowlist: a denylist let
``X_Provider_API_Key`` through, which some servers read as ``X-Provider-API-Key``), and the
room's credentials are injected.

In-process, the request is handed to the agent's ASGI app with a rewritten scope and the very same
``receive``/``send``: body and response stream through without a copy or a buffer. With a remote
agent, httpx streams both ways (``aiter_raw``), so an SSE response arrives event by event.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode

import httpx
import msgspec

from atlas.agent_api.remote import secret_mismatch
from atlas.llm.types import Credentials

log = logging.getLogger("atlas.gateway.proxy")

HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te",
    b"trailer", b"trailers", b"transfer-encoding", b"upgrade", b"host",
})
# The client headers forwarded to the agent; every other one (credentials, cookies, hop-by-hop,
# anything spelled to look like Atlas's own) stays behind.
FORWARDED_HEADERS = frozenset({
    b"accept", b"accept-language", b"cache-control", b"content-length", b"content-type",
    b"last-event-id", b"traceparent", b"tracestate", b"user-agent", b"x-request-id",
})
# The agent routes, and the agent API's OpenAPI document (the in-process agent has no port of its own).
AGENT_PATH = re.compile(r"/agents(/[A-Za-z0-9._~!$&'()*+,;=:@-]+)*/?|/openapi\.json")
# Query parameters that belong to the transport and are never forwarded.
TRANSPORT_PARAMS = frozenset({"proxy", "token", "_pk"})


class ProxyRefused(Exception):
    """The requested path may not be proxied; nothing was sent."""


def agent_path(requested: str) -> str:
    """The agent route to forward to, or ProxyRefused naming the problem."""
    decoded = requested
    for _ in range(4):  # percent-decode until stable: %252e%252e must not become ".." later
        again = unquote(decoded)
        if again == decoded:
            break
        decoded = again
    else:
        raise ProxyRefused("the proxy path is encoded too many times")
    if not decoded.startswith("/") or decoded.startswith("//") or "://" in decoded:
        raise ProxyRefused("the proxy path must be an agent route such as /agents, not a URL")
    if "\\" in decoded:
        raise ProxyRefused("the proxy path may not contain a backslash")
    if "//" in decoded:
        raise ProxyRefused("the proxy path may not contain an empty segment (//)")
    segments = decoded.split("/")
    if ".." in segments or "." in segments:
        raise ProxyRefused("the proxy path may not contain . or .. segments")
    if not AGENT_PATH.fullmatch(decoded):
        raise ProxyRefused("only agent routes (/agents and below, /openapi.json) can be proxied")
    return decoded


def forwarded_query(query_string: bytes) -> bytes:
    pairs = parse_qsl(query_string.decode("latin-1"), keep_blank_values=True)
    return urlencode([(k, v) for k, v in pairs if k not in TRANSPORT_PARAMS]).encode("latin-1")


def forwarded_headers(
    headers: list[tuple[bytes, bytes]], credentials: Credentials | None, agent_secret: str | None
) -> list[tuple[bytes, bytes]]:
    connection_listed = {
        token.strip().lower().encode("latin-1")
        for name, value in headers if name == b"connection"
        for token in value.decode("latin-1").split(",")
    }
    kept = [
        (name, value) for name, value in headers
        if name in FORWARDED_HEADERS and name not in connection_listed
    ]
    if credentials is not None:
        kept.append((b"x-provider-api-key", credentials.api_key.encode("latin-1")))
        kept.append((b"x-provider-api-url", credentials.api_url.encode("latin-1")))
        kept.append((b"x-user-id", credentials.user_id.encode("latin-1")))
    if agent_secret:
        kept.append((b"x-atlas-agent-secret", agent_secret.encode("latin-1")))
    return kept


async def proxy_in_process(
    agent_app: Any, scope: dict[str, Any], receive: Any, send: Any, path: str,
    headers: list[tuple[bytes, bytes]],
) -> None:
    inner = dict(scope)
    inner.update(
        path=path, raw_path=path.encode(), root_path="",
        query_string=forwarded_query(scope.get("query_string", b"")), headers=headers,
    )
    await agent_app(inner, receive, send)


async def proxy_remote(
    client: httpx.AsyncClient, base_url: str, scope: dict[str, Any], receive: Any, send: Any,
    path: str, headers: list[tuple[bytes, bytes]],
) -> bool:
    """Forward to a remote agent. Returns False (nothing sent) when the agent cannot be reached."""

    async def request_body() -> AsyncIterator[bytes]:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            if body:
                yield body
            if not message.get("more_body", False):
                return

    query = forwarded_query(scope.get("query_string", b""))
    url = base_url + path + (("?" + query.decode("latin-1")) if query else "")
    has_body = any(name in (b"content-length", b"transfer-encoding") for name, _ in scope["headers"])
    request = client.build_request(
        scope["method"], url,
        headers=[(k, v) for k, v in headers if k != b"content-length"],
        content=request_body() if has_body else None,
    )
    try:
        response = await client.send(request, stream=True)
    except httpx.HTTPError as exc:
        log.warning("remote agent unreachable: %s", type(exc).__name__)
        return False
    try:
        refusal = None
        if response.status_code == 401:
            refusal = b"".join([chunk async for chunk in response.aiter_raw()])  # a small envelope
            if not says_provider_auth(refusal):
                # Not the user's token (the gateway checked it; the agent never sees it): the
                # agent refused the gateway's secret. Passed on, it would look like a bad token.
                raise secret_mismatch(base_url)
        await send({
            "type": "http.response.start", "status": response.status_code,
            "headers": [
                (k, v) for k, v in response.headers.raw
                if k.lower() not in HOP_BY_HOP and k.lower() != b"content-length"
            ],
        })
        try:
            if refusal is not None:
                await send({"type": "http.response.body", "body": refusal, "more_body": True})
            else:
                async for chunk in response.aiter_raw():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except httpx.HTTPError as exc:
            log.warning("remote agent stream broke: %s", type(exc).__name__)
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    finally:
        await response.aclose()
    return True


def says_provider_auth(body: bytes) -> bool:
    """Whether an agent's 401 is the provider refusing the user's key (``provider_auth``)."""
    try:
        return msgspec.json.decode(body).get("code") == "provider_auth"
    except (msgspec.DecodeError, AttributeError):
        return False
