"""Helpers for the usage and limits tests: a settable clock, an agents file with a known output
cap, and a WebSocket client that runs many requests at once on one connection."""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import trio
from servers import WAIT, connect, ready
from trio_websocket import ConnectionClosed, WebSocketConnection

AGENT_CAP = 16  # the test agent's maxOutputTokens
INSTRUCTIONS = "You are a test agent. Answer briefly."


class Clock:
    """The server's wall clock, set by the test."""

    def __init__(self, iso: str = "2025-01-15T12:00:00+00:00") -> None:
        self.now = datetime.fromisoformat(iso).timestamp()

    def __call__(self) -> float:
        return self.now

    def set(self, iso: str) -> None:
        self.now = datetime.fromisoformat(iso).timestamp()

    def advance(self, seconds: float) -> None:
        self.now += seconds


def write_agents(data_dir: Path, cap: int = AGENT_CAP) -> Path:
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / "agents.toml"
    path.write_text(
        "[[agents]]\n"
        'id = "atlas-assistant"\n'
        'model = "test-model"\n'
        f'instructions = "{INSTRUCTIONS}"\n'
        f"maxOutputTokens = {cap}\n"
    )
    return path


class Requests:
    """One WebSocket connection that sends agent requests and collects each one's final frame
    (``agent:done`` or ``agent:error``) by id, whatever the order they end in."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        self.finals: dict[str, dict[str, Any]] = {}
        self.frames: list[dict[str, Any]] = []
        self.closed = False
        self._changed = trio.Event()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def read(self) -> None:
        try:
            while True:
                frame = json.loads(await self.ws.get_message())
                self.frames.append(frame)
                if frame["type"] in ("agent:done", "agent:error", "usage"):
                    self.finals[frame.get("id", frame["type"])] = frame
                self._notify()
        except ConnectionClosed:
            self.closed = True
            self._notify()

    async def _changes(self) -> None:
        if self.closed:
            raise ConnectionError("the server closed the connection")
        await self._changed.wait()

    async def send(self, message: str = "hello", *, kind: str = "agent:stream", **fields: Any) -> str:
        request_id = fields.pop("id", None) or secrets.token_hex(5)
        await self.ws.send_message(json.dumps({"type": kind, "id": request_id, "message": message, **fields}))
        return request_id

    async def wait(self, request_id: str) -> dict[str, Any]:
        with trio.fail_after(WAIT):
            while request_id not in self.finals:
                await self._changes()
        return self.finals[request_id]

    async def wait_frame(self, predicate: Any) -> dict[str, Any]:
        with trio.fail_after(WAIT):
            while True:
                for frame in self.frames:
                    if predicate(frame):
                        return frame
                await self._changes()

    async def ask(self, message: str = "hello", **fields: Any) -> dict[str, Any]:
        return await self.wait(await self.send(message, **fields))

    async def usage(self, **fields: Any) -> dict[str, Any]:
        self.finals.pop("usage", None)
        await self.ws.send_message(json.dumps({"type": "usage:get", **fields}))
        return await self.wait("usage")


@asynccontextmanager
async def open_requests(url: str) -> AsyncIterator[Requests]:
    """A connection with ``ready`` read and its reader running."""
    async with connect(url) as ws:
        await ready(ws)
        client = Requests(ws)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.read)
            yield client
            nursery.cancel_scope.cancel()


async def proxy_text(client: httpx.AsyncClient, base: str, user: str, token: str, message: str = "hello",
                     **options: Any) -> httpx.Response:
    body: dict[str, Any] = {"input": message}
    if options:
        body["options"] = options
    return await client.post(
        f"{base}/party/{user}?proxy=/agents/atlas-assistant/text", json=body,
        headers={"Authorization": f"Bearer {token}"},
    )


def ledger_file(data_dir: Path, user: str) -> dict[str, Any]:
    """What a new process reading the data directory finds in the user's ledger."""
    from atlas.store import JsonStore

    record = JsonStore(data_dir).load_usage(user)
    return {"days": [
        {"date": d.date, "requests": d.requests, "promptTokens": d.prompt_tokens,
         "completionTokens": d.completion_tokens, "totalTokens": d.total_tokens}
        for d in record.days
    ]}


def usage_files(data_dir: Path, user: str) -> list[str]:
    directory = data_dir / "usage"
    return sorted(p.name for p in directory.iterdir() if p.name.split("+")[0].removesuffix(".json") == user) \
        if directory.is_dir() else []
