"""Auth: the built-in /api/me, an external auth API (a real server), caching, failures, HTTP status."""

from __future__ import annotations

import httpx
from fake_auth import open_fake_auth
from servers import SECRETS, connect, new_key, open_atlas, ready, receive_json
from test_websocket import closed_with


async def test_builtin_api_me(tmp_path):
    async with open_atlas(tmp_path, users={"alice": "sk-test-alice-abcdef123456"}) as server:
        SECRETS.add("sk-test-alice-abcdef123456")
        async with httpx.AsyncClient(base_url=server.url) as client:
            ok = await client.get("/api/me", headers={"Authorization": f"Bearer {server.tokens['alice']}"})
            missing = await client.get("/api/me")
            wrong = await client.get("/api/me", headers={"Authorization": "Bearer nope"})
    assert ok.status_code == 200
    me = ok.json()
    assert isinstance(me.pop("createdAt"), float)  # tells a re-created user from the removed one
    assert me == {"id": "alice", "virtualKey": "sk-test-alice-abcdef123456"}
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "unauthorized"
    assert wrong.status_code == 401


async def test_room_status_needs_the_rooms_token_and_masks_the_key(tmp_path):
    key = new_key("alice")
    async with open_atlas(tmp_path, users={"alice": key, "bob": None}) as server:
        alice, bob = server.tokens["alice"], server.tokens["bob"]
        async with httpx.AsyncClient(base_url=server.url) as client:
            ok = await client.get("/party/alice", headers={"Authorization": f"Bearer {alice}"})
            by_query = await client.get(f"/party/alice?token={alice}")
            no_token = await client.get("/party/alice")
            other = await client.get("/party/alice", headers={"Authorization": f"Bearer {bob}"})
            bad_room = await client.get("/party/bad room", headers={"Authorization": f"Bearer {alice}"})
            post = await client.post("/party/alice", headers={"Authorization": f"Bearer {alice}"})
    assert ok.status_code == 200 and by_query.status_code == 200
    body = ok.json()
    assert body["roomId"] == "alice" and body["userId"] == "alice" and body["credentials"] is True
    assert body["virtualKey"] == "…" + key[-4:]
    assert key not in ok.text
    assert body["prefs"] == {} and body["connections"] == 0 and body["providerUrl"].endswith("/v1")
    assert no_token.status_code == 401 and no_token.json()["error"]["code"] == "unauthorized"
    assert other.status_code == 403 and other.json()["error"]["code"] == "forbidden"
    assert bad_room.status_code == 400 and bad_room.json()["error"]["code"] == "bad_room_id"
    assert post.status_code == 405 and post.json()["error"]["code"] == "method_not_allowed"


async def test_external_auth_api(tmp_path):
    key = new_key("ext")
    async with open_fake_auth() as auth:
        auth.users["tok-alice-0123456789"] = {"id": "alice", "virtualKey": key}
        SECRETS.add("tok-alice-0123456789")
        async with open_atlas(tmp_path, auth_url=auth.url) as server:
            async with connect(server.ws_url("alice", "tok-alice-0123456789")) as ws:
                frame = await ready(ws)
                assert frame["credentials"] is True
            async with connect(server.ws_url("alice", "wrong-token")) as ws:
                _, code = await closed_with(ws)
                assert code == 4001
            async with connect(server.ws_url("bob", "tok-alice-0123456789")) as ws:
                _, code = await closed_with(ws)
                assert code == 4003
            async with httpx.AsyncClient(base_url=server.url) as client:
                # Built-in /api/me is not served when auth is external.
                assert (await client.get("/api/me")).status_code == 404


async def test_external_auth_results_are_cached_for_the_configured_time(tmp_path):
    async with open_fake_auth() as auth:
        auth.users["tok-cached-0123456789"] = {"id": "alice", "virtualKey": new_key()}
        SECRETS.add("tok-cached-0123456789")
        async with open_atlas(tmp_path, auth_url=auth.url, auth_cache_seconds=3600) as server:
            for _ in range(3):
                async with connect(server.ws_url("alice", "tok-cached-0123456789")) as ws:
                    await ready(ws)
            assert auth.calls == 1
            # Revoked at the auth API: still trusted while cached (the documented trade-off).
            del auth.users["tok-cached-0123456789"]
            async with connect(server.ws_url("alice", "tok-cached-0123456789")) as ws:
                await ready(ws)
        async with open_atlas(tmp_path, auth_url=auth.url, auth_cache_seconds=0,
                              data_dir=tmp_path / "data2") as server:
            auth.users["tok-uncached-012345678"] = {"id": "alice", "virtualKey": new_key()}
            SECRETS.add("tok-uncached-012345678")
            async with connect(server.ws_url("alice", "tok-uncached-012345678")) as ws:
                await ready(ws)
            del auth.users["tok-uncached-012345678"]
            async with connect(server.ws_url("alice", "tok-uncached-012345678")) as ws:
                _, code = await closed_with(ws)
                assert code == 4001


async def test_auth_api_down_or_slow_is_1011_and_503_not_a_hang(tmp_path):
    async with open_fake_auth() as auth:
        auth.users["tok-x-0123456789"] = {"id": "alice", "virtualKey": new_key()}
        SECRETS.add("tok-x-0123456789")
        async with open_atlas(tmp_path, auth_url=auth.url, auth_timeout=0.5, auth_cache_seconds=0) as server:
            for mode in ("down", "stall"):
                auth.mode = mode
                async with connect(server.ws_url("alice", "tok-x-0123456789")) as ws:
                    frames, code = await closed_with(ws)
                assert code == 1011
                assert frames[0]["error"]["code"] == "auth_unavailable"
                async with httpx.AsyncClient(base_url=server.url) as client:
                    response = await client.get("/party/alice?token=tok-x-0123456789")
                assert response.status_code == 503
                assert response.json()["error"]["code"] == "auth_unavailable"


async def test_auth_api_unreachable(tmp_path):
    async with open_atlas(tmp_path, auth_url="http://127.0.0.1:9", auth_cache_seconds=0) as server:
        async with connect(server.ws_url("alice", "whatever-token")) as ws:
            frames, code = await closed_with(ws)
    assert code == 1011 and frames[0]["error"]["code"] == "auth_unavailable"


async def test_two_connections_of_one_user_share_the_room(tmp_path):
    async with open_atlas(tmp_path, users={"alice": None}) as server:
        url = server.ws_url("alice", server.tokens["alice"])
        async with connect(url) as one, connect(url) as two:
            await ready(one)
            await ready(two)
            await one.send_message('{"type": "prefs:set", "prefs": {"shared": 1}}')
            await receive_json(one)
            await two.send_message('{"type": "prefs:get"}')
            assert (await receive_json(two))["prefs"] == {"shared": 1}
            assert len(server_rooms(server)) == 1


def server_rooms(server) -> list[str]:
    return [path.stem for path in (server.data_dir / "rooms").glob("*.json")]
