"""The WebSocket endpoint against a real server: close codes, error replies, prefs, broadcast."""

from __future__ import annotations

import json

import httpx
import pytest
import trio
from servers import connect, open_atlas, ready, receive_json, refused_handshake, send_json
from trio_websocket import ConnectionClosed


async def closed_with(ws, timeout: float = 10.0) -> tuple[list[dict], int]:
    """Frames received until the server closed the connection, and the close code."""
    frames = []
    with trio.fail_after(timeout):
        try:
            while True:
                frames.append(json.loads(await ws.get_message()))
        except ConnectionClosed as closed:
            return frames, closed.reason.code


@pytest.mark.parametrize("path", ["/party/", "/parties/main/"])
async def test_ready_frame_on_both_paths(tmp_path, path):
    async with open_atlas(tmp_path, users={"alice": "sk-test-alice-0123456789"}) as server:
        token = server.tokens["alice"]
        async with connect(server.ws_url("alice", token, path=path) + "&_pk=conn-1") as ws:
            frame = await ready(ws)
    assert frame == {
        "type": "ready", "roomId": "alice", "userId": "alice", "connectionId": "conn-1",
        "credentials": True, "prefs": {},
    }


async def test_token_in_authorization_header(tmp_path):
    async with open_atlas(tmp_path, users={"alice": None}) as server:
        headers = [("Authorization", f"Bearer {server.tokens['alice']}")]
        async with connect(server.ws_url("alice"), extra_headers=headers) as ws:
            assert (await ready(ws))["userId"] == "alice"


@pytest.mark.parametrize(
    "case, expected_close, expected_code, expected_message",
    [
        ("missing token", 4001, "unauthorized", "missing token: pass ?token= or Authorization: Bearer"),
        ("wrong token", 4001, "unauthorized", "invalid or revoked token"),
        ("other user's token", 4003, "forbidden", "this token belongs to another user's room"),
        ("bad room id", 4400, "bad_room_id", "room ids are 1-128 of A-Z a-z 0-9 . _ @ -"),
    ],
)
async def test_rejections_send_error_then_close_code(tmp_path, case, expected_close, expected_code, expected_message):
    async with open_atlas(tmp_path, users={"alice": None, "bob": None}) as server:
        url = {
            "missing token": server.ws_url("alice"),
            "wrong token": server.ws_url("alice", "not-a-real-token"),
            "other user's token": server.ws_url("bob", server.tokens["alice"]),
            "bad room id": server.ws_url("bad%20room!", server.tokens["alice"]),
        }[case]
        async with connect(url) as ws:
            frames, code = await closed_with(ws)
    assert code == expected_close
    assert frames == [{"type": "error", "error": {"code": expected_code, "message": expected_message}}]


async def test_oversized_message_closes_1009(tmp_path):
    async with open_atlas(tmp_path, users={"alice": None}, max_message_bytes=64 * 1024) as server:
        async with connect(server.ws_url("alice", server.tokens["alice"])) as ws:
            await ready(ws)
            await send_json(ws, {"type": "broadcast", "data": "x" * (64 * 1024)})
            _, code = await closed_with(ws)
    assert code == 1009


async def test_bad_frames_get_errors_and_the_connection_stays_open(tmp_path):
    async with open_atlas(tmp_path, users={"alice": None}) as server:
        async with connect(server.ws_url("alice", server.tokens["alice"])) as ws:
            await ready(ws)
            cases = [
                ("{not json", "bad_json"),
                ("[1, 2]", "bad_message"),
                ('{"no": "type"}', "bad_message"),
                ('{"type": "teleport"}', "unknown_type"),
                ('{"type": "prefs:set", "prefs": 5}', "bad_message"),
                ('{"type": "ping", "surprise": true}', "bad_message"),
                ('{"type": "broadcast", "data": ' + "[" * 100_000 + "]" * 100_000 + "}", "bad_message"),
            ]
            for frame, code in cases:
                await ws.send_message(frame)
                reply = await receive_json(ws)
                assert reply["type"] == "error" and reply["error"]["code"] == code, (frame, reply)
            await ws.send_message(b"\x00binary")
            reply = await receive_json(ws)
            assert reply["error"]["code"] == "bad_message" and "binary" in reply["error"]["message"]
            # A bad agent request with an id is answered for that id.
            await send_json(ws, {"type": "agent:stream", "id": "r1"})
            reply = await receive_json(ws)
            assert reply["type"] == "agent:error" and reply["id"] == "r1"
            assert reply["error"]["code"] == "bad_message" and "message" in reply["error"]["message"]
            await send_json(ws, {"type": "ping"})
            assert await receive_json(ws) == {"type": "pong"}


async def test_prefs_merge_delete_and_survive_a_restart(tmp_path):
    data_dir = tmp_path / "data"
    async with open_atlas(tmp_path, users={"alice": None}) as server:
        token = server.tokens["alice"]
        async with connect(server.ws_url("alice", token)) as ws:
            await ready(ws)
            await send_json(ws, {"type": "prefs:set", "prefs": {"theme": "dark", "agentId": "a", "n": 1}})
            assert (await receive_json(ws))["prefs"] == {"theme": "dark", "agentId": "a", "n": 1}
            await send_json(ws, {"type": "prefs:set", "prefs": {"n": None, "lang": "fr"}})
            assert (await receive_json(ws))["prefs"] == {"theme": "dark", "agentId": "a", "lang": "fr"}
    # A new server process on the same data directory: the acknowledged prefs are there.
    async with open_atlas(tmp_path, data_dir=data_dir) as server:
        async with connect(server.ws_url("alice", token)) as ws:
            frame = await ready(ws)
            assert frame["prefs"] == {"theme": "dark", "agentId": "a", "lang": "fr"}
            await send_json(ws, {"type": "prefs:get"})
            assert await receive_json(ws) == {"type": "prefs", "prefs": {"theme": "dark", "agentId": "a", "lang": "fr"}}


async def test_prefs_have_a_size_limit_and_a_refused_set_changes_nothing(tmp_path):
    from atlas.rooms import MAX_PREFS_BYTES

    async with open_atlas(tmp_path, users={"alice": None}) as server:
        async with connect(server.ws_url("alice", server.tokens["alice"])) as ws:
            await ready(ws)
            await send_json(ws, {"type": "prefs:set", "prefs": {"keep": 1}})
            await receive_json(ws)
            await send_json(ws, {"type": "prefs:set", "prefs": {"huge": "z" * MAX_PREFS_BYTES}})
            error = await receive_json(ws)
            assert error["type"] == "error" and error["error"]["code"] == "too_large"
            await send_json(ws, {"type": "prefs:get"})
            assert (await receive_json(ws))["prefs"] == {"keep": 1}


async def test_broadcast_reaches_the_rooms_other_connections_only(tmp_path):
    async with open_atlas(tmp_path, users={"alice": None, "bob": None}) as server:
        alice, bob = server.tokens["alice"], server.tokens["bob"]
        async with connect(server.ws_url("alice", alice) + "&_pk=one") as one, \
                connect(server.ws_url("alice", alice) + "&_pk=one") as two, \
                connect(server.ws_url("bob", bob)) as other:
            for ws in (one, two, other):
                await ready(ws)
            await send_json(one, {"type": "broadcast", "data": {"hello": [1, 2]}})
            # Same _pk on two sockets: still two connections, told apart by socket.
            assert await receive_json(two) == {"type": "broadcast", "from": "one", "data": {"hello": [1, 2]}}
            # The sender and the other room get nothing: a ping is answered first.
            for ws in (one, other):
                await send_json(ws, {"type": "ping"})
                assert await receive_json(ws) == {"type": "pong"}
            async with httpx.AsyncClient() as client:
                status = await client.get(
                    f"{server.url}/party/alice", headers={"Authorization": f"Bearer {alice}"}
                )
            assert status.json()["connections"] == 2


async def connection_count(server, room_id: str) -> int:
    async with httpx.AsyncClient() as client:
        response = await client.get(
            f"{server.url}/party/{room_id}", headers={"Authorization": f"Bearer {server.tokens[room_id]}"}
        )
    return response.json()["connections"]


async def test_a_peer_that_stops_reading_is_dropped_not_waited_for(tmp_path):
    async with open_atlas(tmp_path, users={"alice": None}) as server:
        url = server.ws_url("alice", server.tokens["alice"])
        async with connect(url) as sender, connect(url, message_queue_size=1) as stuck:
            await ready(sender)
            await ready(stuck)
            payload = "y" * 60_000
            # The stuck peer never reads: its TCP buffers fill, then its bounded outbox; the
            # server drops it instead of blocking the sender, who keeps getting answers.
            with trio.fail_after(30):
                for n in range(1, 3001):
                    await send_json(sender, {"type": "broadcast", "data": payload})
                    if n % 50 == 0:
                        await send_json(sender, {"type": "ping"})
                        assert await receive_json(sender) == {"type": "pong"}
                        if await connection_count(server, "alice") == 1:
                            break
            assert await connection_count(server, "alice") == 1


async def test_unknown_websocket_path_is_refused(tmp_path):
    async with open_atlas(tmp_path, users={"alice": None}) as server:
        rejected = await refused_handshake(server.url.replace("http", "ws") + "/elsewhere/alice")
    assert rejected.status_code == 403  # closed before accepting: Hypercorn answers 403


async def test_shutdown_closes_connections_with_1001(tmp_path):
    async with open_atlas(tmp_path, users={"alice": None}) as server:
        async with connect(server.ws_url("alice", server.tokens["alice"])) as ws:
            await ready(ws)
            server.shutdown.set()
            _, code = await closed_with(ws)
    assert code == 1001


async def test_room_is_evicted_when_idle_and_comes_back_from_disk(tmp_path):
    async with open_atlas(tmp_path, users={"alice": None}, room_idle_seconds=0.05) as server:
        url = server.ws_url("alice", server.tokens["alice"])
        async with connect(url) as ws:
            await ready(ws)
            await send_json(ws, {"type": "prefs:set", "prefs": {"kept": True}})
            await receive_json(ws)
        async with httpx.AsyncClient() as client:
            with trio.fail_after(10):
                while (await client.get(f"{server.url}/healthz")).json()["rooms"] != 0:
                    await trio.sleep(0.01)  # waiting for the eviction, bounded by fail_after
        async with connect(url) as ws:
            assert (await ready(ws))["prefs"] == {"kept": True}


async def test_compression_offers_are_declined(tmp_path):
    # Browsers always offer permessage-deflate; accepting it would cost a zlib state per socket.
    async with open_atlas(tmp_path, users={"alice": None}) as server:
        port = int(server.url.rsplit(":", 1)[1])
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(
                f"GET /party/alice?token={server.tokens['alice']} HTTP/1.1\r\n"
                f"Host: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\r\n".encode()
            )
            head = b""
            with trio.fail_after(10):
                while b"\r\n\r\n" not in head:
                    head += await stream.receive_some(4096)
    assert head.startswith(b"HTTP/1.1 101")
    assert b"sec-websocket-extensions" not in head.split(b"\r\n\r\n")[0].lower()
