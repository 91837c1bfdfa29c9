"""Bounds per user and per slow client (issue 14): a user's connections are capped, and a client
that leaves what it was sent unread past the write timeout loses its TCP connection (Hypercorn
shields its writes, so before this a stalled reader held its socket, task and queue for as long
as TCP kept the connection up)."""

from __future__ import annotations

import httpx
import trio
from fake_provider import Reply, open_fake_provider
from servers import WAIT, connect, open_atlas, ready, receive_json, send_json
from test_websocket import closed_with
from trio_websocket import ConnectionClosed


async def test_a_users_connections_are_capped(tmp_path):
    async with open_atlas(tmp_path, users={"alice": None}, max_connections_per_user=3) as server:
        url = server.ws_url("alice", server.tokens["alice"])
        async with connect(url) as a, connect(url) as b, connect(url) as c:
            for ws in (a, b, c):
                await ready(ws)
            async with connect(url) as extra:
                frames, code = await closed_with(extra)
            assert code == 1008 and frames == [{"type": "error", "error": {
                "code": "too_many_connections", "message": "this user already has 3 connections open"}}]
            await send_json(a, {"type": "ping"})
            assert (await receive_json(a))["type"] == "pong"
        async with connect(url) as again:  # the others left: room for a new one
            await ready(again)


async def connections(client: httpx.AsyncClient, token: str) -> int:
    response = await client.get("/party/alice", headers={"Authorization": f"Bearer {token}"})
    return response.json()["connections"]


async def test_a_client_that_stops_reading_is_disconnected_after_the_write_timeout(tmp_path):
    async with open_fake_provider() as provider:
        provider.behaviour = Reply(deltas=["x" * 1024] * 4000)  # 4 MB: far more than socket buffers
        async with open_atlas(
            tmp_path, users={"alice": None}, provider_url=provider.url, write_timeout_seconds=0.3,
        ) as server:
            token = server.tokens["alice"]
            # A queue of one message: once it holds one, the client reads nothing more from TCP.
            async with connect(server.ws_url("alice", token), message_queue_size=1) as stuck:
                await send_json(stuck, {"type": "agent:stream", "id": "big", "message": "hi"})
                async with httpx.AsyncClient(base_url=server.url) as client:
                    with trio.fail_after(WAIT):
                        while await connections(client, token) != 0:
                            await trio.sleep(0.05)  # polling the server's view, not timing
                    with trio.fail_after(WAIT):
                        await provider.wait_disconnect()  # its request was cancelled with it
                    async with connect(server.ws_url("alice", token)) as other:  # others unaffected
                        await ready(other)
                frames = []
                try:
                    with trio.fail_after(WAIT):
                        while True:
                            frames.append(await stuck.get_message())
                except ConnectionClosed as closed:
                    assert closed.reason.code == 1006  # the TCP connection went, without a close frame
                assert not any('"agent:done"' in frame for frame in frames)
