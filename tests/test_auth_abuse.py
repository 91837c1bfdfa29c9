"""Auth under abuse and load (issue 14): a bad token is asked about once per cache period, one
token's concurrent first requests make one auth call, auth calls in flight are capped, an address
whose tokens keep failing is refused for a while, and credentials no token or key can hold are a
clean refusal, never a 500."""

from __future__ import annotations

import httpx
import trio
from fake_auth import open_fake_auth
from fake_provider import open_fake_provider
from servers import SECRETS, WAIT, connect, open_atlas, receive_json
from test_websocket import closed_with


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def get_many(client: httpx.AsyncClient, count: int, path: str, token: str) -> list[httpx.Response]:
    responses: list[httpx.Response] = []

    async def one() -> None:
        responses.append(await client.get(path, headers=bearer(token)))

    async with trio.open_nursery() as nursery:
        for _ in range(count):
            nursery.start_soon(one)
    return responses


async def test_one_call_per_token_however_many_ask_at_once_and_refusals_are_cached(tmp_path):
    async with open_fake_auth() as auth:
        auth.users["good-token-0123456789"] = {"id": "alice", "virtualKey": "sk-test-alice-0123456789"}
        SECRETS.update({"good-token-0123456789", "sk-test-alice-0123456789"})
        auth.gate = trio.Event()
        async with open_atlas(tmp_path, auth_url=auth.url, auth_cache_seconds=60) as server:
            async with httpx.AsyncClient(base_url=server.url, timeout=WAIT) as client:
                async with trio.open_nursery() as nursery:
                    results: list[list[httpx.Response]] = []

                    async def ask() -> None:
                        results.append(await get_many(client, 50, "/party/alice", "good-token-0123456789"))

                    nursery.start_soon(ask)
                    with trio.fail_after(WAIT):
                        while auth.in_flight < 1:
                            await trio.sleep(0.01)  # polling the fake's state, not timing
                    auth.gate.set()
                assert [r.status_code for r in results[0]] == [200] * 50
                assert auth.calls == 1  # one flight for fifty
                refused = [await client.get("/party/alice", headers=bearer("bad-token")) for _ in range(10)]
                assert {r.status_code for r in refused} == {401}
                assert auth.calls == 2  # the refusal was cached


async def test_auth_calls_in_flight_are_capped(tmp_path):
    async with open_fake_auth() as auth:
        tokens = [f"token-{n}-0123456789" for n in range(10)]
        for n, token in enumerate(tokens):
            auth.users[token] = {"id": f"user{n}", "virtualKey": f"sk-test-user{n}-0123456789"}
            SECRETS.update({token, f"sk-test-user{n}-0123456789"})
        auth.gate = trio.Event()
        async with open_atlas(tmp_path, auth_url=auth.url, auth_max_concurrent=3) as server:
            async with httpx.AsyncClient(base_url=server.url, timeout=WAIT) as client:
                statuses: list[int] = []

                async def one(n: int) -> None:
                    response = await client.get(f"/party/user{n}", headers=bearer(tokens[n]))
                    statuses.append(response.status_code)

                async with trio.open_nursery() as nursery:
                    for n in range(10):
                        nursery.start_soon(one, n)
                    with trio.fail_after(WAIT):
                        while auth.in_flight < 3:
                            await trio.sleep(0.01)  # polling the fake's state, not timing
                    await trio.testing.wait_all_tasks_blocked(0.05)
                    assert auth.in_flight == 3
                    auth.gate.set()
        assert statuses == [200] * 10 and auth.max_in_flight == 3


async def test_an_address_whose_tokens_keep_failing_is_refused_for_a_while(tmp_path):
    async with open_atlas(tmp_path, users={"alice": None}, auth_failures_per_minute=5) as server:
        token = server.tokens["alice"]
        async with httpx.AsyncClient(base_url=server.url) as client:
            failed = [await client.get("/party/alice", headers=bearer(f"guess-{n}")) for n in range(5)]
            assert {r.status_code for r in failed} == {401}
            limited = await client.get("/party/alice", headers=bearer("guess-6"))
            assert limited.status_code == 429 and limited.json()["error"]["code"] == "rate_limited"
            assert 1 <= int(limited.headers["retry-after"]) <= 60
            # The address is refused whatever token it brings, until its budget refills.
            assert (await client.get("/party/alice", headers=bearer(token))).status_code == 429
        async with connect(server.ws_url("alice", token)) as ws:
            frames, code = await closed_with(ws)
        assert code == 1008 and frames[0]["error"]["code"] == "rate_limited"


async def test_credentials_no_token_or_key_can_hold_are_refused_cleanly(tmp_path):
    async with open_fake_provider() as provider, open_fake_auth() as auth:
        auth.users["odd-key-token-0123456789"] = {"id": "carol", "virtualKey": "sk-\u00e9\u4e2d-0123456789"}
        SECRETS.add("odd-key-token-0123456789")
        async with open_atlas(
            tmp_path, auth_url=auth.url, provider_url=provider.url, auth_failures_per_minute=0,
        ) as server:
            async with httpx.AsyncClient(base_url=server.url) as client:
                raw = await client.get("/party/alice", headers=[(b"authorization", b"Bearer \xff\xfe")])
                assert raw.status_code == 401 and raw.json()["error"]["code"] == "unauthorized"
                proxied = await client.post(
                    "/party/carol?proxy=/agents/atlas-assistant/text",
                    headers=bearer("odd-key-token-0123456789"), json={"input": "hi"},
                )
                assert 400 <= proxied.status_code < 500 and proxied.json()["code"] == "no_credentials"
            async with connect(server.url.replace("http://", "ws://") + "/party/alice?token=%C3%A9") as ws:
                frames, code = await closed_with(ws)
            assert code == 4001 and frames[0]["error"]["code"] == "unauthorized"
            async with connect(server.ws_url("carol", "odd-key-token-0123456789")) as ws:
                assert (await receive_json(ws))["credentials"] is True
                await ws.send_message('{"type": "agent:text", "message": "hi", "id": "k"}')
                error = await receive_json(ws)
            assert error["type"] == "agent:error" and error["error"]["code"] == "no_credentials"
    assert provider.requests == []


def test_the_client_address_is_the_peer_unless_the_peer_is_a_trusted_balancer():
    from atlas.gateway.auth import client_address

    scope = {"client": ("10.0.0.5", 5000), "headers": [(b"x-forwarded-for", b"6.6.6.6, 203.0.113.7")]}
    assert client_address(scope) == "10.0.0.5"  # nobody trusted: a header proves nothing
    assert client_address(scope, frozenset({"10.0.0.5"})) == "203.0.113.7"  # what the balancer saw
    assert client_address({"client": ("10.0.0.5", 1), "headers": []}, frozenset({"10.0.0.5"})) == "10.0.0.5"
