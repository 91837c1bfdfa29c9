"""CORS for the HTTP routes browsers call from other origins: ``/v1/*`` and ``/party/*``.

``ATLAS_CORS_ORIGINS`` lists the allowed origins (``*``: any). A preflight (``OPTIONS`` with
``Origin`` and ``Access-Control-Request-Method``) is answered here, without a token: 204 with
``Access-Control-Allow-Origin`` set to the origin when it is allowed, 403 without it otherwise.
Other requests from an allowed origin get ``Access-Control-Allow-Origin`` on their response; any
other origin gets none, so the browser keeps the response from the page. Credentials are bearer
tokens, never cookies, so ``Access-Control-Allow-Credentials`` is not sent.
"""

from __future__ import annotations

from typing import Any

import msgspec

ALLOW_METHODS = b"GET, POST, OPTIONS"
ALWAYS_ALLOWED_HEADERS = "authorization, content-type"
EXPOSE_HEADERS = b"retry-after"
MAX_AGE = b"600"


def header(scope: dict[str, Any], name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value
    return None


class Cors:
    def __init__(self, origins: tuple[str, ...]) -> None:
        self.any = "*" in origins
        self.origins = frozenset(o.encode() for o in origins if o != "*")

    def allows(self, origin: bytes | None) -> bool:
        return origin is not None and (self.any or origin.lower().rstrip(b"/") in self.origins)

    @staticmethod
    def is_preflight(scope: dict[str, Any]) -> bool:
        return scope["method"] == "OPTIONS" and header(scope, b"origin") is not None \
            and header(scope, b"access-control-request-method") is not None

    async def preflight(self, scope: dict[str, Any], send: Any) -> None:
        origin = header(scope, b"origin")
        if not self.allows(origin):
            body = msgspec.json.encode({"error": {
                "code": "forbidden_origin", "message": "this origin may not call Atlas from a browser",
            }})
            await send({"type": "http.response.start", "status": 403, "headers": [
                (b"content-type", b"application/json"), (b"vary", b"origin"),
            ]})
            await send({"type": "http.response.body", "body": body})
            return
        requested = (header(scope, b"access-control-request-headers") or b"").decode("latin-1")
        names = [ALWAYS_ALLOWED_HEADERS] + [n.strip().lower() for n in requested.split(",") if n.strip()]
        await send({"type": "http.response.start", "status": 204, "headers": [
            (b"access-control-allow-origin", origin),
            (b"access-control-allow-methods", ALLOW_METHODS),
            (b"access-control-allow-headers", ", ".join(dict.fromkeys(names)).encode("latin-1")),
            (b"access-control-max-age", MAX_AGE),
            (b"vary", b"origin"),
        ]})
        await send({"type": "http.response.body", "body": b""})

    def wrap(self, scope: dict[str, Any], send: Any) -> Any:
        """``send`` that adds the CORS headers to the response of an allowed origin."""
        origin = header(scope, b"origin")
        if not self.allows(origin):
            return send

        async def send_with_cors(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [
                    *message.get("headers", ()),
                    (b"access-control-allow-origin", origin),
                    (b"access-control-expose-headers", EXPOSE_HEADERS),
                    (b"vary", b"origin"),
                ]}
            await send(message)

        return send_with_cors
