"""Several ``atlas serve`` processes on one PostgreSQL database, HAProxy in front, and a client
that reconnects as partysocket does: the pieces of test_scale.py.

    processes = await start_fleet(tmp_path, database_url, 3, env={...})   # on ports chosen here
    proxy = start_proxy(tmp_path, processes)        # deploy/haproxy.cfg, checks every 200 ms
    token = cli_add_user(database_url, "alice")     # `atlas user add --database-url`
    async with open_client(proxy.ws_url("alice", token)) as client:
        ready = await client.connect()              # retries with backoff until `ready`
        await client.write_prefs({"k": 1})          # the prefs once acknowledged, None if cut
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import trio
from haproxy_proc import HAProxy, deploy_config
from servers import SECRETS, AtlasProcess, atlas_command, free_port, new_key, start_atlas_process
from trio_websocket import ConnectionClosed, HandshakeError, WebSocketConnection, wrap_client_stream

from atlas.backoff import backoff_delay

WAIT = 15.0  # seconds any single wait may take before the test fails
HEALTH_CHECK = "inter 200ms fall 1 rise 1"  # in place of deploy/haproxy.cfg's 2 s, fall 2, rise 2


async def start_fleet(
    tmp_path: Path, database_url: str, count: int, *, env: dict[str, str] | None = None,
) -> list[AtlasProcess]:
    """``count`` ``atlas serve`` processes sharing ``database_url``, started side by side, each
    on a port of its own (known before it starts, as the balancer's config needs)."""
    started: list[AtlasProcess | None] = [None] * count
    full_env = {"ATLAS_DATABASE_URL": database_url, **(env or {})}

    async def start(index: int) -> None:
        started[index] = await start_atlas_process(
            tmp_path / f"atlas{index + 1}" / "data", bind=f"127.0.0.1:{free_port()}", env=full_env,
        )

    async with trio.open_nursery() as nursery:
        for index in range(count):
            nursery.start_soon(start, index)
    return [process for process in started if process is not None]


def stop_fleet(processes: list[AtlasProcess]) -> None:
    for process in processes:
        if process.process.poll() is None:
            process.kill()


@dataclass
class Proxy:
    haproxy: HAProxy
    servers: list[str] = field(default_factory=list)  # haproxy's name for each process, in order

    @property
    def url(self) -> str:
        return self.haproxy.url

    def ws_url(self, room: str, token: str) -> str:
        return f"{self.url.replace('http://', 'ws://')}/parties/main/{room}?token={token}"

    def set_state(self, server: str, state: str) -> None:
        """``ready``, ``drain`` or ``maint`` for a server of the rooms' backend (atlas_any tracks it)."""
        answer = self.haproxy.command(f"set server atlas_rooms/{server} state {state}")
        assert answer.strip() == "", answer

    def log(self) -> str:
        return self.haproxy.log()


def start_proxy(tmp_path: Path, processes: list[AtlasProcess]) -> Proxy:
    port = free_port()
    ports = [int(process.url.rsplit(":", 1)[1]) for process in processes]
    socket_path = tmp_path / "haproxy-admin.sock"
    haproxy = HAProxy(deploy_config(port, ports, socket_path, check=HEALTH_CHECK), port)
    haproxy.start()
    # Listening on its port does not mean its runtime API socket is there yet.
    deadline = time.monotonic() + WAIT
    while not socket_path.exists():
        if time.monotonic() > deadline:
            haproxy.close()
            raise AssertionError(f"haproxy made no runtime API socket within {WAIT:g} s:\n{haproxy.log()}")
        time.sleep(0.01)  # polling for the socket file, not a timing guess
    return Proxy(haproxy, [f"atlas{n}" for n in range(1, len(processes) + 1)])


def cli_add_user(database_url: str, user_id: str) -> str:
    """``atlas user add ID --virtual-key KEY --database-url URL``, as an operator runs it: the token."""
    result = subprocess.run(
        atlas_command("user", "add", user_id, "--virtual-key", new_key(user_id), "--database-url", database_url),
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
        env={k: v for k, v in os.environ.items() if not k.startswith("ATLAS_")},
    )
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip().splitlines()[-1]
    SECRETS.add(token)
    return token


async def wait_for(what: str, predicate: Callable[[], Any], timeout: float = WAIT) -> Any:
    """Poll ``predicate`` (sync or async) until it returns something true; fail naming ``what``."""
    with trio.move_on_after(timeout):
        while True:
            value = predicate()
            if hasattr(value, "__await__"):
                value = await value
            if value:
                return value
            await trio.sleep(0.02)  # polling a condition, not a timing guess
    raise AssertionError(f"not within {timeout:g} s: {what}")


async def health(client: httpx.AsyncClient, process: AtlasProcess) -> int:
    try:
        return (await client.get(f"{process.url}/healthz")).status_code
    except httpx.HTTPError:
        return 0


async def owner_of(
    client: httpx.AsyncClient, processes: list[AtlasProcess], room: str, token: str,
) -> AtlasProcess | None:
    """Which process serves ``room`` to a connection now (its room status counts connections
    there; every other process answers from the database, with none)."""
    for process in processes:
        if process.process.poll() is not None:
            continue
        response = await client.get(f"{process.url}/party/{room}", headers={"Authorization": f"Bearer {token}"})
        if response.status_code == 200 and response.json()["connections"] > 0:
            return process
    return None


class Client:
    """A client that connects and reconnects as partysocket does (a backoff between attempts,
    whatever the reason: a refused upgrade, an error frame before ``ready``, a dropped
    connection), and remembers why each attempt failed."""

    def __init__(self, nursery: trio.Nursery, url: str) -> None:
        self.nursery = nursery
        self.url = url
        self.ws: WebSocketConnection | None = None
        self.refusals: list[tuple[str, int | None]] = []  # (error code or exception, close code)
        self.frames: list[dict[str, Any]] = []  # frames that were not what a call waited for
        self._releases: list[trio.Event] = []

    async def connect(self, within: float = WAIT) -> dict[str, Any]:
        """Connect until the server says ``ready``; that frame."""
        attempt = 0
        with trio.fail_after(within):
            while (ready := await self.attempt()) is None:
                await trio.sleep(backoff_delay(attempt, first=0.05, factor=2, cap=0.5))
                attempt += 1
        return ready

    async def attempt(self) -> dict[str, Any] | None:
        """One connection attempt: the ``ready`` frame, or None (the reason is in ``refusals``)."""
        await self.close()
        ws, failure = await self.nursery.start(self._hold)
        if ws is None:
            self.refusals.append((type(failure).__name__, None))
            return None
        try:
            with trio.fail_after(WAIT):
                frame = json.loads(await ws.get_message())
                if frame["type"] == "ready":
                    self.ws = ws
                    return frame
                code = frame["error"]["code"]
                try:
                    while True:
                        await ws.get_message()
                except ConnectionClosed as closed:
                    self.refusals.append((code, closed.reason.code))
        except ConnectionClosed as closed:
            self.refusals.append(("closed", closed.reason.code))
        self._release()
        return None

    async def _hold(self, task_status: trio.TaskStatus[tuple[Any, Any]]) -> None:
        """Own one connection (trio-websocket ties it to a task) until ``close``, on a TCP stream
        of our own that is closed on the way out: trio-websocket's client leaves its socket
        unclosed after a refused handshake or a close the server started (see servers.connect)."""
        parts = urlsplit(self.url)
        resource = parts.path + (f"?{parts.query}" if parts.query else "")
        started = False
        failure: BaseException | None = None
        try:
            stream = await trio.open_tcp_stream(parts.hostname, parts.port)
        except OSError as exc:
            task_status.started((None, exc))
            return
        try:
            async with trio.open_nursery() as nursery:
                with trio.fail_after(WAIT):  # a stalled handshake is a refusal the test sees
                    ws = await wrap_client_stream(nursery, stream, parts.netloc, resource)
                release = trio.Event()
                self._releases.append(release)
                task_status.started((ws, None))
                started = True
                await release.wait()
                with trio.move_on_after(2):
                    await ws.aclose()
                nursery.cancel_scope.cancel()
        except* (HandshakeError, ConnectionClosed, trio.TooSlowError, trio.BrokenResourceError, OSError) as group:
            failure = group.exceptions[0]
        finally:
            await trio.aclose_forcefully(stream)
        if not started:
            task_status.started((None, failure))

    def _release(self) -> None:
        while self._releases:
            self._releases.pop().set()

    @property
    def connected(self) -> bool:
        return self.ws is not None and self.ws.closed is None

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.aclose()
            self.ws = None
        self._release()

    async def send(self, message: dict[str, Any]) -> bool:
        assert self.ws is not None
        try:
            await self.ws.send_message(json.dumps(message))
            return True
        except ConnectionClosed:
            return False

    async def next_frame(self, kinds: tuple[str, ...], request_id: str | None = None) -> dict[str, Any] | None:
        """The next frame of one of ``kinds`` (for ``request_id``, if given); None once the
        connection has ended."""
        assert self.ws is not None
        with trio.fail_after(WAIT):
            while True:
                try:
                    frame = json.loads(await self.ws.get_message())
                except ConnectionClosed:
                    return None
                if frame["type"] in kinds and (request_id is None or frame.get("id") == request_id):
                    return frame
                self.frames.append(frame)

    async def write_prefs(self, patch: dict[str, Any]) -> tuple[str, Any]:
        """Merge ``patch``: ``("ok", prefs)`` once acknowledged (durable), ``("error", code)``,
        or ``("cut", None)`` when the connection ended first (the write may or may not have
        landed)."""
        if not await self.send({"type": "prefs:set", "prefs": patch}):
            return "cut", None
        return await self.prefs_reply()

    async def prefs_reply(self) -> tuple[str, Any]:
        frame = await self.next_frame(("prefs", "error"))
        if frame is None:
            return "cut", None
        if frame["type"] == "prefs":
            return "ok", frame["prefs"]
        return "error", frame["error"]["code"]

    async def ask(self, text: str, request_id: str) -> dict[str, Any] | None:
        """``agent:text``: its ``agent:done`` or ``agent:error``, None when the connection ended."""
        if not await self.send({"type": "agent:text", "id": request_id, "message": text}):
            return None
        return await self.next_frame(("agent:done", "agent:error"), request_id)


@asynccontextmanager
async def open_client(url: str) -> AsyncIterator[Client]:
    async with trio.open_nursery() as nursery:
        client = Client(nursery, url)
        try:
            yield client
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await client.close()
            nursery.cancel_scope.cancel()
