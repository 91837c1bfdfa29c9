"""A real external auth API for tests: ``GET /api/me`` on 127.0.0.1:0.

    async with open_fake_auth() as auth:
        auth.url                          # base URL, for ATLAS_AUTH_URL
        auth.users["token"] = {"id": "alice", "virtualKey": "sk-..."}
        auth.mode = "down"                # answer 500; "stall": never answer; "ok": normal
        auth.calls                        # how many /api/me requests it has answered
        auth.gate = trio.Event()          # calls wait for it (auth.max_in_flight: most at once)
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import msgspec
import trio

from atlas.config import Bind
from atlas.gateway.auth import token_from_scope
from atlas.http_server import serve_asgi


@dataclass
class FakeAuth:
    url: str = ""
    users: dict[str, dict[str, Any]] = field(default_factory=dict)
    mode: str = "ok"
    calls: int = 0
    gate: trio.Event | None = None
    in_flight: int = 0
    max_in_flight: int = 0

    async def app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        self.calls += 1
        if self.mode == "stall":
            await trio.sleep_forever()
        if self.gate is not None:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                await self.gate.wait()
            finally:
                self.in_flight -= 1
        if scope["path"] != "/api/me":
            status, body = 404, {"error": "not found"}
        elif self.mode == "down":
            status, body = 500, {"error": "auth database unavailable"}
        elif (user := self.users.get(token_from_scope(scope) or "")) is None:
            status, body = 401, {"error": "invalid token"}
        else:
            status, body = 200, {**user, "email": f"{user['id']}@example.test"}
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": msgspec.json.encode(body)})


@asynccontextmanager
async def open_fake_auth() -> AsyncIterator[FakeAuth]:
    auth = FakeAuth()
    async with trio.open_nursery() as nursery:
        auth.url = await nursery.start(partial(serve_asgi, auth.app, Bind("127.0.0.1", 0)))
        yield auth
        nursery.cancel_scope.cancel()
