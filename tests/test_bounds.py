"""Bounds per user and per slow client (issue 14): a user's connections are capped, and a client
that leaves what it was sent unread past the write timeout loses its TCP connection (Hypercorn
shields its writes, so before this a stalled reader held its socket, task and queue for as long
as TCP kept the connection up)."""

from __future__ import annotations

import socket

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
        # 16 MB: more than loopback's socket buffers can hold, even autotuned to their maximum.
        provider.behaviour = Reply(deltas=["x" * 4096] * 4000)
        async with open_atlas(
            tmp_path, users={"alice": None}, provider_url=provider.url, write_timeout_seconds=0.3,
        ) as server:
            token = server.tokens["alice"]
            # A queue of one message: once it holds one, the client reads nothing more from TCP.
            async with connect(server.ws_url("alice", token), message_queue_size=1) as stuck:
                # A small receive window, so that what the server sends stalls soon.
                stuck._stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
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


async def test_a_request_past_its_overall_deadline_ends_with_provider_timeout(tmp_path):
    """A provider that keeps a request open (dripping, or holding it as here) cannot hold it, or
    its reservation, past ATLAS_REQUEST_DEADLINE_SECONDS."""
    async with open_fake_provider() as provider:
        provider.behaviour = Reply(deltas=["a", "b"], gate=trio.Event(), hold_after=1)  # never ends
        async with open_atlas(
            tmp_path, users={"alice": None}, provider_url=provider.url, request_deadline_seconds=0.5,
        ) as server:
            async with connect(server.ws_url("alice", server.tokens["alice"])) as ws:
                await ready(ws)
                await send_json(ws, {"type": "agent:stream", "id": "slow", "message": "hi"})
                with trio.fail_after(WAIT):
                    while (frame := await receive_json(ws))["type"] != "agent:error":
                        assert frame["type"] in ("agent:start", "agent:delta"), frame
                assert frame["error"]["code"] == "provider_timeout", frame
                with trio.fail_after(WAIT):
                    await provider.wait_disconnect()
            token = server.tokens["alice"]
            async with httpx.AsyncClient(base_url=server.url, headers={"Authorization": f"Bearer {token}"}) as client:
                proxied = await client.post("/party/alice?proxy=/agents/atlas-assistant/text", json={"input": "hi"})
                with trio.fail_after(WAIT):  # a held stream is ended, not kept open
                    streamed = await client.post("/v1/chat/completions", json={
                        "model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]})
            assert proxied.status_code == 504 and proxied.json()["error"]["code"] == "provider_timeout", proxied.text
            assert streamed.status_code == 200 and "data: [DONE]" not in streamed.text  # cut, not finished
            assert '"code":"provider_timeout"' in streamed.text.splitlines()[-2]  # its last event says why
