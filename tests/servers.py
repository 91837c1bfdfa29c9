"""Real Atlas servers for the tests: in-process on port 0, or as an ``atlas serve`` subprocess.

Every token and virtual key a test creates is remembered in ``SECRETS``; at the end of the session
``conftest.py`` checks that none of them appears in any log line of the whole suite. Every
in-process server's ``/metrics`` is read once more when its test is done with it: it must parse
with ``prometheus_client.parser`` and hold none of them either.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import trio
from prometheus_client.parser import text_string_to_metric_families
from trio_websocket import ConnectionRejected, WebSocketConnection, open_websocket_url, wrap_client_stream

from atlas.config import Settings, parse_bind
from atlas.gateway.server import serve_atlas
from atlas.store import Store, store_for
from atlas.store.users import create_user

SECRETS: set[str] = set()
PROCESS_LOGS: list[Path] = []
WAIT = 10.0  # seconds any single wait in a test may take before it fails


def free_port() -> int:
    """A port that was free a moment ago (for a server that must come back on the same port)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def new_key(label: str = "user") -> str:
    key = f"sk-test-{label}-{secrets.token_hex(8)}"
    SECRETS.add(key)
    return key


def add_user(
    data_dir: Path, user_id: str, key: str | None = None, provider_url: str | None = None,
    *, database_url: str | None = None,
) -> str:
    """Create a built-in user in the data directory's JSON store, or in the database."""
    store = store_for(Settings(data_dir=data_dir, database_url=database_url))
    try:
        store.prepare()
        token = create_user(store, user_id, key if key is not None else new_key(user_id), provider_url)
    finally:
        store.close()
    SECRETS.add(token)
    return token


@dataclass
class AtlasServer:
    url: str
    settings: Settings
    shutdown: trio.Event
    tokens: dict[str, str] = field(default_factory=dict)

    @property
    def data_dir(self) -> Path:
        return self.settings.data_dir

    def ws_url(self, room: str, token: str | None = None, *, path: str = "/parties/main/") -> str:
        base = self.url.replace("http://", "ws://") + path + room
        return base + (f"?token={token}" if token is not None else "")

    def add_user(self, user_id: str, key: str | None = None, provider_url: str | None = None) -> str:
        token = add_user(self.data_dir, user_id, key, provider_url, database_url=self.settings.database_url)
        self.tokens[user_id] = token
        return token


@asynccontextmanager
async def open_atlas(
    tmp_path: Path, *, users: dict[str, str | None] | None = None, store: Store | None = None,
    **overrides: Any,
) -> AsyncIterator[AtlasServer]:
    """A real ``serve_atlas`` on 127.0.0.1:0, shut down gracefully at the end of the block.
    ``users`` maps user ids to virtual keys (None: a fresh test key) created before start-up, in
    the store the settings name (``database_url=``: PostgreSQL). ``store``: a prepared store for
    the server to use (the caller closes it), else it opens its own from the settings.
    ``clock`` (optional) is the server's wall clock for usage and limits."""
    data_dir = overrides.pop("data_dir", tmp_path / "data")
    extra = {"clock": overrides.pop("clock")} if "clock" in overrides else {}
    tokens = {
        user_id: add_user(data_dir, user_id, key, database_url=overrides.get("database_url"))
        for user_id, key in (users or {}).items()
    }
    settings = Settings(data_dir=data_dir, bind=parse_bind("127.0.0.1:0"), **overrides)
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        url = await nursery.start(partial(serve_atlas, settings, store=store, shutdown=shutdown, **extra))
        server = AtlasServer(url, settings, shutdown, tokens)
        try:
            yield server
            if not shutdown.is_set():  # what the test did, seen by a Prometheus scrape
                await check_metrics(url)
        finally:
            shutdown.set()


async def check_metrics(url: str) -> None:
    """``/metrics`` answers, parses as Prometheus text, and names no token or key."""
    async with httpx.AsyncClient(base_url=url, timeout=WAIT) as client:
        response = await client.get("/metrics")
    assert response.status_code == 200, (response.status_code, response.text[:200])
    families = list(text_string_to_metric_families(response.text))  # raises on a malformed line
    assert any(family.name == "atlas_agent_requests" for family in families), response.text[:500]
    leaked = sorted(secret[:12] + "…" for secret in SECRETS if secret in response.text)
    assert not leaked, f"secrets in /metrics (shown truncated): {leaked}"


@asynccontextmanager
async def connect(url: str, **kwargs: Any) -> AsyncIterator[WebSocketConnection]:
    """A trio-websocket client connection (``open_websocket_url``) whose socket is closed on exit.

    trio-websocket's client never closes its TCP stream once the server has closed the
    WebSocket first (it waits for the server's TCP close, then drops the stream unclosed): each
    such connection would leave an unclosed socket for the garbage collector (a
    ``ResourceWarning``), and a test would not see a leak of its own among them."""
    ws = None
    try:
        async with open_websocket_url(url, **kwargs) as ws:
            yield ws
    finally:
        if ws is not None:
            await trio.aclose_forcefully(ws._stream)  # closing twice is harmless


async def refused_handshake(url: str) -> ConnectionRejected:
    """The ``ConnectionRejected`` for a WebSocket handshake that ``url``'s server refuses.

    On a TCP stream of our own, closed on return: after a refused handshake trio-websocket's
    client drops its socket unclosed (``open_websocket_url`` has no stream to close then)."""
    parts = urlsplit(url)
    resource = parts.path + (f"?{parts.query}" if parts.query else "")
    rejected: list[ConnectionRejected] = []
    async with await trio.open_tcp_stream(parts.hostname, parts.port) as stream:
        with trio.fail_after(WAIT):
            try:
                async with trio.open_nursery() as nursery:
                    await wrap_client_stream(nursery, stream, parts.netloc, resource)
                    raise AssertionError(f"the handshake to {url} was accepted")
            except* ConnectionRejected as group:
                rejected.extend(group.exceptions)  # type: ignore[arg-type]
    return rejected[0]


async def receive_json(ws: WebSocketConnection, timeout: float = WAIT) -> dict[str, Any]:
    with trio.fail_after(timeout):
        return json.loads(await ws.get_message())


async def receive_until(ws: WebSocketConnection, kind: str, timeout: float = WAIT) -> list[dict[str, Any]]:
    """Frames up to and including the first of type ``kind``."""
    frames = []
    with trio.fail_after(timeout):
        while True:
            frame = json.loads(await ws.get_message())
            frames.append(frame)
            if frame["type"] == kind:
                return frames


async def send_json(ws: WebSocketConnection, message: dict[str, Any]) -> None:
    await ws.send_message(json.dumps(message))


async def ready(ws: WebSocketConnection) -> dict[str, Any]:
    frame = await receive_json(ws)
    assert frame["type"] == "ready", frame
    return frame


@dataclass
class AtlasProcess:
    process: subprocess.Popen
    url: str
    log_path: Path  # standard error: the log, checked for secrets at the end of the session
    out_path: Path  # standard output: what the command prints for its user (the first-run token)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace")

    def terminate(self, timeout: float = WAIT) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(WAIT)


def atlas_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "atlas", *args]


async def start_atlas_process(
    data_dir: Path, *args: str, env: dict[str, str] | None = None, bind: str = "127.0.0.1:0",
    command: str = "serve",
) -> AtlasProcess:
    """``atlas serve`` (or ``atlas agent``) as a subprocess; returns once it says it is listening."""
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    name = f"atlas-{command}-{secrets.token_hex(4)}"
    log_path, out_path = data_dir.parent / f"{name}.log", data_dir.parent / f"{name}.out"
    PROCESS_LOGS.append(log_path)
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with open(log_path, "wb") as log_file, open(out_path, "wb") as out_file:
        process = subprocess.Popen(
            atlas_command(command, "--data-dir", str(data_dir), "--bind", bind, *args),
            stdout=out_file, stderr=log_file, env=full_env, stdin=subprocess.DEVNULL,
        )
    marker = "listening on "
    try:
        with trio.move_on_after(WAIT * 2):
            while True:
                text = log_path.read_text(errors="replace")
                for line in text.splitlines():
                    if line.startswith("Atlas") and marker in line:
                        url = line.split(marker, 1)[1].split()[0]
                        return AtlasProcess(process, url, log_path, out_path)
                if process.poll() is not None:
                    raise RuntimeError(f"atlas {command} exited with {process.returncode}:\n{text}")
                await trio.sleep(0.02)  # polling the log for the start-up line, not a timing guess
        raise RuntimeError(f"atlas {command} did not start:\n{log_path.read_text(errors='replace')}")
    except BaseException:  # not started, or the caller gave up waiting (cancelled): none left behind
        process.kill()
        process.wait(WAIT)
        raise
