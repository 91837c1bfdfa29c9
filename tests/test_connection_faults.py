"""One connection's failure never ends the server (issue 9).

The reproduction: clients with a bad token read the ``error`` frame and close at once, so their
close crosses the server's 4001 close. In Hypercorn 0.18's trio worker that interleaving raised
``BusyResourceError`` in the connection's reading task, which escaped to the server's nursery and
ended ``atlas serve`` within a few hundred connections. Then: faults injected into one
connection, from the app and from the transport layer, cost that connection only.
"""

from __future__ import annotations

import hypercorn.protocol.h11
import pytest
import trio
from servers import (
    WAIT,
    connect,
    ready,
    receive_json,
    receive_until,
    refused_handshake,
    send_json,
    start_atlas_process,
)

import atlas.gateway.app

ROUNDS = 500


async def reject_and_close_at_once(url: str) -> None:
    async with connect(url) as ws:
        frame = await receive_json(ws)
        assert frame["error"]["code"] == "unauthorized", frame
    # Leaving the block closes at once, crossing the server's own 4001 close.


async def served_normally(base: str, token: str) -> None:
    async with connect(f"{base}/party/alice?token={token}") as ws:
        await ready(ws)
        await send_json(ws, {"type": "ping"})
        assert (await receive_json(ws))["type"] == "pong"
        await send_json(ws, {"type": "agent:text", "message": "hello"})
        done = (await receive_until(ws, "agent:done"))[-1]
        assert done["text"], done


@pytest.mark.parametrize("parallel", [1, 20])
async def test_clients_closing_as_they_are_rejected_never_end_the_server(tmp_path, parallel):
    data_dir = tmp_path / "data"
    # Every client is refused for its token (no per-address limit), as on main before the fix.
    process = await start_atlas_process(data_dir, env={"ATLAS_AUTH_FAILURES_PER_MINUTE": "0"})
    try:
        from servers import add_user

        token = add_user(data_dir, "alice")
        base = process.url.replace("http://", "ws://")
        bad = f"{base}/party/alice?token=bad-token"
        remaining = ROUNDS

        async def client() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                await reject_and_close_at_once(bad)

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for _ in range(parallel):
                    nursery.start_soon(client)
        assert process.process.poll() is None, process.log()[-3000:]
        await served_normally(base, token)
        assert "Traceback" not in process.log(), process.log()[-3000:]
    finally:
        if process.process.poll() is None:
            process.terminate()


async def test_an_exception_from_the_app_costs_one_connection_only(tmp_path, monkeypatch):
    from servers import open_atlas

    real_endpoint = atlas.gateway.app.websocket_endpoint

    async def failing_for_mallory(services, room_id, scope, receive, send):
        if room_id == "mallory":
            await receive()
            raise RuntimeError("injected fault in the app")
        await real_endpoint(services, room_id, scope, receive, send)

    monkeypatch.setattr(atlas.gateway.app, "websocket_endpoint", failing_for_mallory)
    async with open_atlas(tmp_path, users={"alice": None, "mallory": None}) as server:
        async with connect(server.ws_url("alice", server.tokens["alice"])) as alice:
            await ready(alice)
            for _ in range(5):
                # The app failed before accepting: Hypercorn answers the handshake with a 500.
                rejected = await refused_handshake(server.ws_url("mallory", server.tokens["mallory"]))
                assert rejected.status_code == 500
            await send_json(alice, {"type": "ping"})
            assert (await receive_json(alice))["type"] == "pong"
        async with connect(server.ws_url("alice", server.tokens["alice"])) as again:
            await ready(again)


async def test_an_exception_from_the_transport_costs_one_connection_only(tmp_path, monkeypatch):
    """A fault raised inside Hypercorn's connection task (its HTTP/1.1 protocol), below the app:
    the exception that used to reach the server's nursery."""
    from servers import open_atlas

    real_handle = hypercorn.protocol.h11.H11Protocol.handle

    async def handle(self, event):
        if b"x-inject-fault" in getattr(event, "data", b"").lower():
            raise RuntimeError("injected fault in the transport")
        await real_handle(self, event)

    monkeypatch.setattr(hypercorn.protocol.h11.H11Protocol, "handle", handle)
    async with open_atlas(tmp_path, users={"alice": None}) as server:
        token = server.tokens["alice"]
        async with connect(server.ws_url("alice", token)) as alice:
            await ready(alice)
            port = int(server.url.rsplit(":", 1)[1])
            for _ in range(5):
                # A raw socket: the server drops this connection, and the client sees it closed.
                with trio.socket.socket() as sock:
                    await sock.connect(("127.0.0.1", port))
                    await sock.send(b"GET /party/alice HTTP/1.1\r\nHost: x\r\nX-Inject-Fault: 1\r\n\r\n")
                    with trio.fail_after(WAIT):
                        assert await sock.recv(100) == b""
            await send_json(alice, {"type": "ping"})
            with trio.fail_after(WAIT):
                assert (await receive_json(alice))["type"] == "pong"
        async with connect(server.ws_url("alice", token)) as again:
            await ready(again)
