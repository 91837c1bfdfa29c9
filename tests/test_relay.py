"""The relay and the proxy, end to end: a real external auth API, a real test provider, and Atlas
in both layouts (agent in-process, and ``atlas agent`` + ``atlas serve`` over HTTP)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial

import httpx
import pytest
import trio
import trio.testing
from agent_fixtures import read_events
from fake_auth import FakeAuth, open_fake_auth
from fake_provider import Cut, FakeProvider, Reply, Status, open_fake_provider
from servers import (
    SECRETS,
    AtlasServer,
    add_user,
    connect,
    new_key,
    open_atlas,
    ready,
    receive_json,
    receive_until,
    send_json,
    start_atlas_process,
)
from test_websocket import closed_with

from atlas.agent_api.server import serve_agent
from atlas.config import Settings, parse_bind

AGENT_SECRET = "agent-secret-for-tests-0123456789"
SECRETS.add(AGENT_SECRET)


@dataclass
class Gateway:
    atlas: AtlasServer
    provider: FakeProvider
    auth: FakeAuth
    keys: dict[str, str]
    tokens: dict[str, str]

    def ws_url(self, user: str) -> str:
        return self.atlas.ws_url(user, self.tokens[user])

    def proxy_url(self, user: str, path: str) -> str:
        return f"{self.atlas.url}/party/{user}?proxy={path}"

    def auth_header(self, user: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[user]}"}


@pytest.fixture(params=["in-process", "two-process"])
def layout(request) -> str:
    return request.param


@asynccontextmanager
async def open_gateway(tmp_path, layout: str, **overrides) -> AsyncIterator[Gateway]:
    async with open_fake_provider() as provider, open_fake_auth() as auth:
        keys, tokens = {}, {}
        for user in ("alice", "bob"):
            keys[user], tokens[user] = new_key(user), f"token-{user}-{new_key('t')}"
            SECRETS.add(tokens[user])
            auth.users[tokens[user]] = {"id": user, "virtualKey": keys[user]}
        tokens["nokey"] = f"token-nokey-{new_key('t')}"
        SECRETS.add(tokens["nokey"])
        auth.users[tokens["nokey"]] = {"id": "nokey"}
        common = dict(auth_url=auth.url, provider_url=provider.url, provider_retries=0, **overrides)
        if layout == "in-process":
            async with open_atlas(tmp_path, **common) as atlas:
                yield Gateway(atlas, provider, auth, keys, tokens)
            return
        agent_settings = Settings(
            data_dir=tmp_path / "agent-data", bind=parse_bind("127.0.0.1:0"),
            provider_url=provider.url, agent_secret=AGENT_SECRET, provider_retries=0,
        )
        async with trio.open_nursery() as nursery:
            agent_url = await nursery.start(partial(serve_agent, agent_settings))
            async with open_atlas(tmp_path, agent_url=agent_url, agent_secret=AGENT_SECRET, **common) as atlas:
                yield Gateway(atlas, provider, auth, keys, tokens)
            nursery.cancel_scope.cancel()


async def test_two_users_stream_at_once_each_billed_to_their_own_key(tmp_path, layout):
    async with open_gateway(tmp_path, layout) as gw:
        gate = trio.Event()
        gw.provider.behaviour = Reply(deltas=["one ", "two ", "three"], gate=gate, hold_after=1)
        async with connect(gw.ws_url("alice")) as alice, connect(gw.ws_url("bob")) as bob:
            await ready(alice)
            await ready(bob)
            await send_json(alice, {"type": "agent:stream", "message": "question from alice", "id": "a1"})
            await send_json(bob, {"type": "agent:stream", "message": "question from bob", "id": "b1"})
            with trio.fail_after(10):
                await gw.provider.wait_requests(2)  # both in flight at the provider at once
            gate.set()
            replies = {}
            for user, ws, request_id in (("alice", alice, "a1"), ("bob", bob, "b1")):
                frames = await receive_until(ws, "agent:done")
                assert frames[0] == {"type": "agent:start", "id": request_id, "agentId": "atlas-assistant"}
                deltas = "".join(f["text"] for f in frames if f["type"] == "agent:delta")
                replies[user] = frames[-1]
                assert deltas == frames[-1]["text"] == "one two three"
                assert frames[-1]["usage"] == {"promptTokens": 11, "completionTokens": 3, "totalTokens": 14}
                assert frames[-1]["finishReason"] == "stop"
        for request in gw.provider.requests:
            asker = "alice" if "question from alice" in json.dumps(request.body) else "bob"
            assert request.api_key == gw.keys[asker]
        assert {r.api_key for r in gw.provider.requests} == {gw.keys["alice"], gw.keys["bob"]}


async def test_agent_text_answers_with_done_only(tmp_path, layout):
    async with open_gateway(tmp_path, layout) as gw:
        async with connect(gw.ws_url("alice")) as ws:
            await ready(ws)
            await send_json(ws, {"type": "agent:text", "message": "hi"})
            done = await receive_json(ws)
    assert done["type"] == "agent:done" and done["text"] == "Hello, world" and done["id"]


async def test_spoofed_credential_headers_never_reach_the_provider(tmp_path, layout):
    async with open_gateway(tmp_path, layout) as gw:
        spoofed = {
            **gw.auth_header("alice"),
            "X-Provider-API-Key": "sk-spoofed-key", "X-Provider-API-URL": "http://127.0.0.1:9/v1",
            "X-User-ID": "mallory", "X-Atlas-Agent-Secret": "guess",
        }
        async with httpx.AsyncClient() as client:
            response = await client.post(
                gw.proxy_url("alice", "/agents/atlas-assistant/text"), headers=spoofed,
                json={"input": "hello", "options": {"temperature": 0.2}},
            )
        assert response.status_code == 200, response.text
        assert response.json()["data"]["text"] == "Hello, world"
        assert [r.api_key for r in gw.provider.requests] == [gw.keys["alice"]]
        assert gw.provider.requests[0].body["temperature"] == 0.2
        assert "sk-spoofed-key" not in json.dumps(gw.provider.requests[0].headers)


async def test_proxy_passes_methods_query_and_agent_errors_through(tmp_path, layout):
    async with open_gateway(tmp_path, layout) as gw:
        async with httpx.AsyncClient() as client:
            listed = await client.get(gw.proxy_url("alice", "/agents"), headers=gw.auth_header("alice"))
            missing = await client.get(gw.proxy_url("alice", "/agents/ghost"), headers=gw.auth_header("alice"))
            no_token = await client.get(gw.proxy_url("alice", "/agents"))
            other = await client.get(gw.proxy_url("bob", "/agents"), headers=gw.auth_header("alice"))
    assert listed.status_code == 200 and listed.json()["data"][0]["id"] == "atlas-assistant"
    assert missing.status_code == 404 and missing.json()["success"] is False
    assert no_token.status_code == 401 and other.status_code == 403
    assert gw.provider.requests == []


@pytest.mark.parametrize("path", [
    "http://127.0.0.1:9/agents", "//evil.example/agents", "/agents/../healthz", "/agents/%2e%2e/x",
    "/agents/%252e%252e/x", "/agents\\x", "/agents/./x", "/agents//x", "/healthz", "/api/me",
    "/v1/chat/completions", "agents", "/agentsx", "/", "",
])
async def test_rejected_proxy_paths_send_nothing(tmp_path, path):
    async with open_gateway(tmp_path, "in-process") as gw:
        async with httpx.AsyncClient() as client:
            response = await client.post(
                f"{gw.atlas.url}/party/alice", params={"proxy": path},
                headers=gw.auth_header("alice"), json={"input": "x"},
            )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "bad_proxy_path"
    assert gw.provider.requests == []


def stream_through_proxy(gw: Gateway, client: httpx.AsyncClient):
    """alice's ``POST ?proxy=/agents/atlas-assistant/stream``, as a streamed response."""
    return client.stream(
        "POST", gw.proxy_url("alice", "/agents/atlas-assistant/stream"),
        headers=gw.auth_header("alice"), json={"input": "go"},
    )


async def test_proxied_sse_arrives_event_by_event(tmp_path, layout):
    async with open_gateway(tmp_path, layout) as gw:
        gate = trio.Event()
        gw.provider.behaviour = Reply(deltas=["first", " second"], gate=gate, hold_after=1)
        events = []
        async with httpx.AsyncClient(timeout=10) as client:
            async with stream_through_proxy(gw, client) as response:
                assert response.status_code == 200
                assert response.headers["content-type"].startswith("text/event-stream")
                with trio.fail_after(10):
                    async for event in read_events(response):
                        events.append(event)
                        if event["type"] == "text-delta" and event["text"] == "first":
                            # The provider is still held at its gate: this event came early.
                            assert not gate.is_set() and not gw.provider.requests[0].completed
                            gate.set()
    types = [event["type"] for event in events]
    assert types[0] == "start" and types[-1] == "finish"
    assert "".join(e["text"] for e in events if e["type"] == "text-delta") == "first second"


async def test_cancel_mid_stream_closes_the_provider_request(tmp_path, layout):
    async with open_gateway(tmp_path, layout) as gw:
        gw.provider.behaviour = Reply(deltas=["a", "b"], gate=trio.Event(), hold_after=1)
        async with connect(gw.ws_url("alice")) as ws:
            await ready(ws)
            await send_json(ws, {"type": "agent:stream", "message": "long", "id": "r1"})
            frames = await receive_until(ws, "agent:delta")
            assert frames[-1] == {"type": "agent:delta", "id": "r1", "text": "a", "seq": 1}
            await send_json(ws, {"type": "agent:cancel", "id": "r1"})
            error = await receive_json(ws)
            assert error == {"type": "agent:error", "id": "r1", "error": {
                "code": "cancelled", "message": error["error"]["message"]}}
            with trio.fail_after(10):
                await gw.provider.wait_disconnect()
            # The connection is still fine.
            gw.provider.behaviour = Reply()
            await send_json(ws, {"type": "agent:text", "message": "again", "id": "r2"})
            assert (await receive_json(ws))["type"] == "agent:done"


async def test_client_disconnect_mid_stream_leaves_nothing_behind(tmp_path, layout):
    async with open_gateway(tmp_path, layout, room_idle_seconds=0.05) as gw:
        gw.provider.behaviour = Reply(deltas=["a", "b"], gate=trio.Event(), hold_after=1)
        async with connect(gw.ws_url("alice")) as ws:
            await ready(ws)
            await send_json(ws, {"type": "agent:stream", "message": "long", "id": "r1"})
            await receive_until(ws, "agent:delta")
        with trio.fail_after(10):
            await gw.provider.wait_disconnect()
        async with httpx.AsyncClient() as client:
            with trio.fail_after(10):
                # The request task ended, so the room could go idle and be evicted.
                while (await client.get(f"{gw.atlas.url}/healthz")).json()["rooms"]:
                    await trio.sleep(0.01)


async def test_provider_failures_are_agent_errors_and_the_next_request_works(tmp_path, layout):
    async with open_gateway(tmp_path, layout) as gw:
        gw.provider.script(Cut(after=1), Status(401), Status(429, retry_after="7"), Status(503))
        async with connect(gw.ws_url("alice")) as ws:
            await ready(ws)
            codes = []
            for n in range(4):
                await send_json(ws, {"type": "agent:stream", "message": "x", "id": f"r{n}"})
                frames = await receive_until(ws, "agent:error")
                assert all(f["id"] == f"r{n}" for f in frames)
                codes.append(frames[-1]["error"]["code"])
            assert codes == ["provider_error", "provider_auth", "provider_rate_limited", "provider_error"]
            await send_json(ws, {"type": "agent:stream", "message": "x", "id": "ok"})
            assert (await receive_until(ws, "agent:done"))[-1]["text"] == "Hello, world"


async def test_request_limits_credentials_and_agent_choice(tmp_path, layout):
    async with open_gateway(tmp_path, layout, max_requests_per_connection=2) as gw:
        gate = trio.Event()
        gw.provider.behaviour = Reply(gate=gate, hold_after=0)
        async with connect(gw.ws_url("alice")) as ws:
            await ready(ws)
            for n in range(3):
                await send_json(ws, {"type": "agent:text", "message": "x", "id": f"r{n}"})
            refused = await receive_json(ws)
            assert refused["id"] == "r2" and refused["error"]["code"] == "too_many_requests"
            await send_json(ws, {"type": "agent:text", "message": "x", "id": "r0"})
            duplicate = await receive_json(ws)
            assert duplicate["id"] == "r0" and duplicate["error"]["code"] == "bad_message"
            gate.set()
            done = {(await receive_json(ws))["id"] for _ in range(2)}
            assert done == {"r0", "r1"}
            # The default agent comes from prefs.
            await send_json(ws, {"type": "prefs:set", "prefs": {"agentId": "ghost"}})
            await receive_json(ws)
            await send_json(ws, {"type": "agent:stream", "message": "x", "id": "g"})
            frames = await receive_until(ws, "agent:error")
            # A refusal comes alone, without agent:start, and names the agent it looked for.
            assert [f["type"] for f in frames] == ["agent:error"]
            assert frames[0]["error"]["code"] == "unknown_agent" and "'ghost'" in frames[0]["error"]["message"]
        async with connect(gw.ws_url("nokey")) as ws:
            assert (await ready(ws))["credentials"] is False
            await send_json(ws, {"type": "agent:stream", "message": "x", "id": "n"})
            error = await receive_json(ws)
            assert error["id"] == "n" and error["error"]["code"] == "no_credentials"


async def test_conversation_history_is_durable_and_sent_to_the_agent(tmp_path, layout):
    async with open_gateway(tmp_path, layout) as gw:
        async with connect(gw.ws_url("alice")) as ws:
            await ready(ws)
            await send_json(ws, {"type": "agent:text", "message": "My name is Ann.", "conversationId": "c1"})
            await receive_json(ws)
            stored = json.loads((gw.atlas.data_dir / "rooms" / "alice.json").read_text())
            assert stored["conversations"]["c1"] == [
                {"role": "user", "content": "My name is Ann."},
                {"role": "assistant", "content": "Hello, world"},
            ]
            await send_json(ws, {"type": "agent:text", "message": "What is my name?", "conversationId": "c1"})
            await receive_json(ws)
        messages = gw.provider.requests[-1].body["messages"]
        contents = [m["content"] for m in messages if m["role"] != "system"]
        assert contents == ["My name is Ann.", "Hello, world", "What is my name?"]


async def test_shutdown_lets_a_proxied_stream_finish_and_refuses_new_requests(tmp_path):
    async with open_gateway(tmp_path, "in-process") as gw:
        gate = trio.Event()
        gw.provider.behaviour = Reply(deltas=["before", " after"], gate=gate, hold_after=1)
        events = []
        async with httpx.AsyncClient(timeout=10) as client:
            async with stream_through_proxy(gw, client) as response:
                with trio.fail_after(10):
                    async for event in read_events(response):
                        events.append(event)
                        if event.get("text") == "before":
                            gw.atlas.shutdown.set()
                            await trio.testing.wait_all_tasks_blocked()
                            refused = await client.get(
                                gw.proxy_url("alice", "/agents"), headers=gw.auth_header("alice"))
                            assert refused.status_code == 503
                            assert refused.json()["error"]["code"] == "shutting_down"
                            gate.set()
    assert events[-1]["type"] == "finish"
    assert "".join(e["text"] for e in events if e["type"] == "text-delta") == "before after"


async def test_a_failed_history_write_is_an_internal_error_and_the_room_lives_on(tmp_path):
    async with open_gateway(tmp_path, "in-process") as gw:
        async with connect(gw.ws_url("alice")) as ws:
            await ready(ws)
            blocker = gw.atlas.data_dir / "rooms" / "alice.json"
            blocker.mkdir()  # renaming the new file over a directory fails, as a full disk would
            try:
                await send_json(ws, {"type": "agent:text", "message": "x", "conversationId": "c", "id": "w"})
                error = await receive_json(ws)
                assert error["type"] == "agent:error" and error["id"] == "w"
                assert error["error"]["code"] == "internal"
            finally:
                blocker.rmdir()
            await send_json(ws, {"type": "agent:text", "message": "x", "conversationId": "c", "id": "ok"})
            done = await receive_json(ws)
            assert done["type"] == "agent:done" and done["id"] == "ok"


async def test_open_connections_follow_key_changes_and_revocation(tmp_path):
    async with open_gateway(tmp_path, "in-process", auth_cache_seconds=0) as gw:
        async with connect(gw.ws_url("alice")) as ws:
            await ready(ws)
            new_alice_key = new_key("alice-rotated")
            gw.auth.users[gw.tokens["alice"]]["virtualKey"] = new_alice_key  # set-key, upstream
            await send_json(ws, {"type": "agent:text", "message": "x", "id": "k"})
            assert (await receive_json(ws))["type"] == "agent:done"
            assert gw.provider.requests[-1].api_key == new_alice_key
            del gw.auth.users[gw.tokens["alice"]]  # token revoked upstream
            await send_json(ws, {"type": "agent:text", "message": "x", "id": "r"})
            frames, code = await closed_with(ws)
        assert code == 4001
        assert frames == [{"type": "agent:error", "id": "r", "error": {
            "code": "unauthorized", "message": "this token has been revoked"}}]
        assert len(gw.provider.requests) == 1


async def test_atlas_agent_and_atlas_serve_as_two_processes(tmp_path):
    """The original two-process design, as an operator runs it: two commands, one secret."""
    async with open_fake_provider() as provider:
        env = {"ATLAS_AGENT_SECRET": AGENT_SECRET, "ATLAS_PROVIDER_URL": provider.url}
        agent = await start_atlas_process(tmp_path / "agent-data", command="agent", env=env)
        try:
            token = add_user(tmp_path / "data", "alice")
            serve = await start_atlas_process(
                tmp_path / "data", env={**env, "ATLAS_AGENT_URL": agent.url}
            )
            try:
                ws_url = serve.url.replace("http://", "ws://") + f"/parties/main/alice?token={token}"
                async with connect(ws_url) as ws:
                    await ready(ws)
                    await send_json(ws, {"type": "agent:stream", "message": "hi", "id": "r1"})
                    frames = await receive_until(ws, "agent:done")
                assert frames[-1]["text"] == "Hello, world"
                async with httpx.AsyncClient(timeout=10) as client:
                    proxied = await client.post(
                        f"{serve.url}/party/alice?proxy=/agents/atlas-assistant/text",
                        headers={"Authorization": f"Bearer {token}"}, json={"input": "hi"},
                    )
                    direct = await client.get(f"{agent.url}/agents")  # no secret: refused
                assert proxied.status_code == 200 and proxied.json()["data"]["text"] == "Hello, world"
                assert direct.status_code == 401
                assert len(provider.requests) == 2
            finally:
                assert serve.terminate() == 0
        finally:
            agent.terminate()


async def test_stored_conversations_stay_bounded(tmp_path):
    from atlas.rooms import MAX_CONVERSATION_CHARS

    async with open_gateway(tmp_path, "in-process", conversation_turns=4) as gw:
        gw.provider.behaviour = Reply(deltas=["ok"])
        async with connect(gw.ws_url("alice")) as ws:
            await ready(ws)
            for n in range(5):
                await send_json(ws, {"type": "agent:text", "message": f"turn {n}", "conversationId": "c"})
                await receive_json(ws)
            big = "x" * (MAX_CONVERSATION_CHARS // 2 + 1)
            for _ in range(2):
                await send_json(ws, {"type": "agent:text", "message": big, "conversationId": "big"})
                await receive_json(ws)
        stored = json.loads((gw.atlas.data_dir / "rooms" / "alice.json").read_text())["conversations"]
    assert [t["content"] for t in stored["c"]] == ["turn 3", "ok", "turn 4", "ok"]
    assert sum(len(t["content"]) for t in stored["big"]) <= MAX_CONVERSATION_CHARS
    assert stored["big"][-2:] == [{"role": "user", "content": big}, {"role": "assistant", "content": "ok"}]
