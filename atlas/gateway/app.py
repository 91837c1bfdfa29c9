"""The transport's ASGI app: a small dispatcher in front of the routes.

    /party/{roomId}, /parties/main/{roomId}   WebSocket: ws.websocket_endpoint (raw ASGI)
                                              HTTP: room status, or ?proxy= to the agent
    /party/{roomId}/usage (and /parties/main/) HTTP: the user's usage ledger and limits
    /v1/chat/completions, /v1/models          the OpenAI-compatible endpoint (v1.py)
    /api/me                                   built-in auth (only without ATLAS_AUTH_URL)
    /openapi.json                             the OpenAPI document of these routes (openapi.py)
    everything else                           Quart: the web page, /static, /healthz

CORS (``ATLAS_CORS_ORIGINS``) applies to the HTTP routes under ``/party``, ``/parties`` and
``/v1`` (cors.py); a preflight is answered before any token is asked for.

The hot paths (WebSocket frames, proxied streams) are raw ASGI: Quart's per-message overhead and
its response timeout are measured costs there (see STYLE.md), and the in-process proxy hands the
request straight to the agent's ASGI app. Quart serves the pages, where its conveniences pay.
The agent's own routes are never served on this port.
"""

from __future__ import annotations

import logging
import math
from importlib import resources
from typing import Any

import msgspec
from quart import Response
from quart_trio import QuartTrio

from atlas.asgi import query_param, send_json
from atlas.gateway.auth import STORE_UNAVAILABLE, AccessDenied, admit, builtin_me_app, store_denial
from atlas.gateway.metrics import CONTENT_TYPE
from atlas.gateway.cors import Cors
from atlas.gateway.files import PageResponse
from atlas.gateway.metered import billable_route, proxy_billable
from atlas.gateway.openapi import encode_document, serve_document
from atlas.gateway.proxy import (
    ProxyRefused,
    agent_path,
    forwarded_headers,
    proxy_in_process,
    proxy_remote,
)
from atlas.gateway.services import Services
from atlas.gateway.v1 import v1_endpoint
from atlas.gateway.ws import websocket_endpoint
from atlas.llm.types import AgentError
from atlas.store import StoreError, mask_key
from atlas.store.usage import parse_day

log = logging.getLogger("atlas.gateway.app")

_encoder = msgspec.json.Encoder()
ROOM_PREFIXES = ("/party/", "/parties/main/")
ALLOW_GET = [(b"allow", b"GET, HEAD")]  # a 405 says what the route takes (RFC 9110)


async def send_error(send: Any, status: int, code: str, message: str, headers: Any = ()) -> None:
    await send_json(send, status, {"error": {"code": code, "message": message}}, headers)


def room_id_of(path: str) -> str | None:
    for prefix in ROOM_PREFIXES:
        if path.startswith(prefix):
            return path[len(prefix):]
    return None


async def send_denied(send: Any, denied: AccessDenied) -> None:
    headers = [(b"www-authenticate", b"Bearer")] if denied.status == 401 else []
    if denied.retry_after is not None:
        headers.append((b"retry-after", str(max(1, math.ceil(denied.retry_after))).encode()))
    await send_json(send, denied.status, {"error": {"code": denied.code, "message": denied.message}}, headers)


async def party_http(services: Services, room_id: str, scope: dict[str, Any], receive: Any, send: Any) -> None:
    room_id, slash, sub = room_id.partition("/")
    if slash:
        if sub != "usage":
            await send_error(send, 404, "not_found", "no such route: rooms have /party/{id} and /party/{id}/usage")
            return
        await party_usage(services, room_id, scope, send)
        return
    requested = query_param(scope, "proxy")
    if requested is None and scope["method"] not in ("GET", "HEAD"):
        await send_error(send, 405, "method_not_allowed", "use GET for the room status, or ?proxy=/agents/...",
                         ALLOW_GET)
        return
    try:
        identity = await admit(services.verifier, room_id, scope, shutting_down=services.shutting_down)
    except AccessDenied as denied:
        await send_denied(send, denied)
        return
    path = None
    if requested is not None:
        try:
            path = agent_path(requested)
        except ProxyRefused as exc:
            await send_error(send, 400, "bad_proxy_path", str(exc))
            return
    try:
        # Reads the room, changes nothing: any process may answer, the room's owner or not. The
        # proxy needs only the user's credentials (the identity): no read of the stored room.
        async with services.rooms.visit_room(room_id, identity, read=path is None) as room:
            if path is None:
                await send_json(send, 200, {
                    "roomId": room.id, "userId": identity.id, "credentials": room.has_credentials,
                    "virtualKey": mask_key(identity.virtual_key or ""),
                    "providerUrl": identity.provider_url or services.default_provider_url or None,
                    "prefs": room.prefs, "connections": len(room.connections),
                    "usageToday": await services.admission.usage_today(identity.id),
                })
                return
            if not await services.rooms.leases.healthy():
                # A process that cannot reach the database serves no billable work.
                await send_denied(send, STORE_UNAVAILABLE)
                return
            headers = forwarded_headers(
                scope["headers"], services.relay.credentials(room), services.settings.agent_secret
            )

            async def forward(body: bytes | None, receive: Any, send: Any) -> None:
                forwarded = headers
                if body is not None:  # the body was read (and maybe changed): its own length
                    forwarded = [(k, v) for k, v in headers if k != b"content-length"]
                    forwarded.append((b"content-length", str(len(body)).encode()))
                if services.agent_app is not None:
                    await proxy_in_process(services.agent_app, scope, receive, send, path, forwarded)
                    return
                assert services.agent_client is not None and services.settings.agent_url
                try:
                    sent = await proxy_remote(
                        services.agent_client, services.settings.agent_url, scope, receive, send, path,
                        forwarded,
                    )
                except AgentError as exc:  # raised before anything was sent
                    await send_error(send, exc.status, exc.code, exc.message)
                    return
                if not sent:
                    await send_error(send, 502, "agent_unavailable", "the agent cannot be reached")

            billable = billable_route(scope["method"], path)
            if billable is None or services.relay.credentials(room) is None:
                # Not a provider call (or no key: the agent refuses it before any provider call).
                await forward(None, receive, send)
            else:
                agent_id, route = billable
                await proxy_billable(services, identity, agent_id, route, receive, send, forward)
    except StoreError as exc:
        await send_denied(send, store_denial(exc))


async def party_usage(services: Services, room_id: str, scope: dict[str, Any], send: Any) -> None:
    """``GET /party/{roomId}/usage[?since=YYYY-MM-DD]``: the user's ledger, limits and what is left."""
    if scope["method"] not in ("GET", "HEAD"):
        await send_error(send, 405, "method_not_allowed", "use GET for the usage", ALLOW_GET)
        return
    try:
        identity = await admit(services.verifier, room_id, scope, shutting_down=services.shutting_down)
    except AccessDenied as denied:
        await send_denied(send, denied)
        return
    since = query_param(scope, "since")
    if since is not None:
        try:
            since = parse_day(since)
        except ValueError as exc:
            await send_error(send, 400, "bad_request", f"since: {exc}")
            return
    admission = services.admission
    try:
        body = await admission.report(identity.id, admission.limits_for(identity), since)
    except StoreError as exc:
        await send_denied(send, store_denial(exc))
        return
    await send_json(send, 200, body)


# The page runs only its own files: even if a reply ever reached the page as HTML, no script of
# its own could run and nothing could be sent or loaded elsewhere. The icon is a data: URL.
PAGE_POLICY = (
    "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'"
)


def build_pages_app(services: Services) -> QuartTrio:
    # The page's files live in the package's top folder (atlas/web), not beside this module.
    pages = QuartTrio(
        __name__, static_folder="web", static_url_path="/static", root_path=str(resources.files("atlas"))
    )
    pages.response_class = PageResponse  # static files closed even when the client hangs up early
    # Quart's default 60 s response timeout would cut long responses; none are streamed here,
    # but nothing should be cut silently either.
    pages.config["RESPONSE_TIMEOUT"] = None

    @pages.get("/")
    async def index() -> Response:
        page = resources.files("atlas").joinpath("web/index.html")
        if not page.is_file():
            return Response("Atlas is running. The web page is not installed.", mimetype="text/plain")
        response = Response(page.read_text(encoding="utf-8"), mimetype="text/html")
        response.headers["Content-Security-Policy"] = PAGE_POLICY
        return response

    @pages.get("/healthz")
    async def healthz() -> tuple[dict[str, Any], int]:
        # 503 takes the process out of a load balancer's rotation: while it shuts down, and
        # while it cannot reach the database (the room leases' heartbeat says; no query here).
        rooms = len(services.rooms.rooms)
        if services.shutting_down:
            return _unhealthy(rooms, "shutting_down", "the server is shutting down"), 503
        if not await services.rooms.leases.healthy():
            return _unhealthy(rooms, "store_unavailable", "the store (database) is unavailable"), 503
        return {"ok": True, "rooms": rooms}, 200

    @pages.errorhandler(404)
    async def not_found(_: Exception) -> tuple[dict[str, Any], int]:
        return {"error": {"code": "not_found", "message": "no such route"}}, 404

    @pages.errorhandler(405)
    async def method_not_allowed(error: Any) -> tuple[dict[str, Any], int, dict[str, str]]:
        # Errors on the transport are JSON, Quart's own pages too (its default is an HTML page).
        allowed = ", ".join(sorted(getattr(error, "valid_methods", None) or ()))  # werkzeug's name
        message = f"this route takes {allowed}" if allowed else "method not allowed here"
        headers = {"Allow": allowed} if allowed else {}
        return {"error": {"code": "method_not_allowed", "message": message}}, 405, headers

    return pages


async def send_metrics(services: Services, scope: dict[str, Any], send: Any) -> None:
    if scope["method"] not in ("GET", "HEAD"):
        await send_error(send, 405, "method_not_allowed", "use GET /metrics", ALLOW_GET)
        return
    body = services.metrics.exposition()
    await send({"type": "http.response.start", "status": 200, "headers": [
        (b"content-type", CONTENT_TYPE.encode()), (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
    ]})
    await send({"type": "http.response.body", "body": body})


def _unhealthy(rooms: int, code: str, message: str) -> dict[str, Any]:
    return {"ok": False, "rooms": rooms, "error": {"code": code, "message": message}}


def build_app(services: Services):
    pages = build_pages_app(services)
    builtin_me = None if services.settings.auth_url else builtin_me_app(services.store)
    cors = Cors(services.settings.cors_origins) if services.settings.cors_origins else None
    document = encode_document(services.settings)

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await pages(scope, receive, send)
            return
        path = scope["path"]
        room_id = room_id_of(path)
        is_v1 = path == "/v1" or path.startswith("/v1/")
        if kind == "http" and (room_id is not None or is_v1):
            if cors is not None:
                if cors.is_preflight(scope):
                    await cors.preflight(scope, send)
                    return
                send = cors.wrap(scope, send)
            if is_v1:
                await v1_endpoint(services, scope, receive, send)
            else:
                await party_http(services, room_id, scope, receive, send)
            return
        if room_id is not None:
            await websocket_endpoint(services, room_id, scope, receive, send)
            return
        if kind == "websocket":
            # Refused before the upgrade: the client sees HTTP 403 for an unknown WebSocket path.
            await send({"type": "websocket.close", "code": 1008})
            return
        if path == "/api/me" and builtin_me is not None:
            await builtin_me(scope, receive, send)
            return
        if path == "/metrics" and kind == "http":
            await send_metrics(services, scope, send)
            return
        if path == "/openapi.json" and kind == "http":
            await serve_document(scope, send, document)
            return
        await pages(scope, receive, send)

    return app
