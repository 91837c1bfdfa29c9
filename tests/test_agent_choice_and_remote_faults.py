"""Which agent a request goes to, and what a misconfigured or faulty remote agent looks like.

- A request without ``agentId`` goes to ``ATLAS_DEFAULT_AGENT``, else the first agent configured
  (not a literal ``atlas-assistant`` that an agents file may not have).
- Gateway and remote agent with different ``ATLAS_AGENT_SECRET``s: a documented code
  (``agent_secret_mismatch``), refused before ``agent:start``, HTTP 502 rather than a 401 that
  looks like a bad token, and a line in both logs.
- A remote agent whose stream ends without ``finish``, or whose 200 is not an event stream, is a
  ``provider_error``, as in-process.
"""

from __future__ import annotations

import logging
from functools import partial

import httpx
import trio
from fake_provider import Status, open_fake_provider
from servers import connect, open_atlas, ready, receive_json, receive_until, send_json

from atlas.agent_api.server import serve_agent
from atlas.config import Settings, parse_bind
from atlas.http_server import serve_asgi

AGENTS_TOML = '''
[[agents]]
id = "helper"
model = "m1"

[[agents]]
id = "other"
model = "m2"
'''


async def started_agent_ids(server, count: int = 1) -> list[str]:
    async with connect(server.ws_url("alice", server.tokens["alice"])) as ws:
        await ready(ws)
        ids = []
        for index in range(count):
            await send_json(ws, {"type": "agent:stream", "message": "hi", "id": f"r{index}"})
            frames = await receive_until(ws, "agent:done")
            ids.append(frames[0]["agentId"])
        return ids


async def test_the_default_agent_is_the_first_configured_or_the_setting(tmp_path):
    async with open_fake_provider() as provider:
        agents_file = tmp_path / "agents.toml"
        agents_file.write_text(AGENTS_TOML)
        common = dict(users={"alice": None}, provider_url=provider.url, agents_file=agents_file)
        async with open_atlas(tmp_path / "a", **common) as server:
            assert await started_agent_ids(server) == ["helper"]
        async with open_atlas(tmp_path / "b", default_agent="other", **common) as server:
            assert await started_agent_ids(server) == ["other"]
        assert [request.body["model"] for request in provider.requests] == ["m1", "m2"]


async def test_mismatched_agent_secrets_are_named_refused_before_start_and_logged(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    async with open_fake_provider() as provider, trio.open_nursery() as nursery:
        agent_url = await nursery.start(partial(serve_agent, Settings(
            data_dir=tmp_path / "agent-data", bind=parse_bind("127.0.0.1:0"),
            provider_url=provider.url, agent_secret="the-agents-secret-0123456789",
        )))
        async with open_atlas(
            tmp_path, users={"alice": None}, agent_url=agent_url,
            agent_secret="the-gateways-secret-0123456789", provider_url=provider.url,
        ) as server:
            token = server.tokens["alice"]
            async with connect(server.ws_url("alice", token)) as ws:
                await ready(ws)
                await send_json(ws, {"type": "agent:stream", "message": "hi", "id": "s", "agentId": "atlas-assistant"})
                frame = await receive_json(ws)
            assert frame["type"] == "agent:error", frame  # alone: no agent:start before it
            assert frame["error"]["code"] == "agent_secret_mismatch"
            async with httpx.AsyncClient(base_url=server.url) as client:
                proxied = await client.post(
                    "/party/alice?proxy=/agents/atlas-assistant/text",
                    headers={"Authorization": f"Bearer {token}"}, json={"input": "hi"},
                )
            assert proxied.status_code == 502
            assert proxied.json()["error"]["code"] == "agent_secret_mismatch"
        nursery.cancel_scope.cancel()
    assert provider.requests == []
    logged = {(record.name, record.levelno) for record in caplog.records if "ATLAS_AGENT_SECRET" in record.getMessage()}
    assert ("atlas.agent.http", logging.WARNING) in logged  # the agent's side
    assert ("atlas.agent_api.remote", logging.ERROR) in logged  # the gateway's side


async def test_a_provider_auth_401_through_a_remote_agent_stays_a_401(tmp_path):
    async with open_fake_provider() as provider, trio.open_nursery() as nursery:
        provider.behaviour = Status(401)
        secret = "shared-secret-0123456789"
        agent_url = await nursery.start(partial(serve_agent, Settings(
            data_dir=tmp_path / "agent-data", bind=parse_bind("127.0.0.1:0"),
            provider_url=provider.url, agent_secret=secret, provider_retries=0,
        )))
        async with open_atlas(
            tmp_path, users={"alice": None}, agent_url=agent_url, agent_secret=secret, provider_url=provider.url,
        ) as server:
            async with httpx.AsyncClient(base_url=server.url) as client:
                proxied = await client.post(
                    "/party/alice?proxy=/agents/atlas-assistant/text",
                    headers={"Authorization": f"Bearer {server.tokens['alice']}"}, json={"input": "hi"},
                )
        nursery.cancel_scope.cancel()
    assert proxied.status_code == 401 and proxied.json()["code"] == "provider_auth"


def faulty_voltagent(seen: list[str]):
    """A VoltAgent-compatible server that lists ``first`` and answers badly."""

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        seen.append(scope["path"])
        if scope["path"] == "/agents":
            body = b'{"success": true, "data": [{"id": "first"}, {"id": "second"}]}'
            content_type = b"application/json"
        elif scope["path"] == "/agents/first/stream":  # the stream stops before its finish
            body = b'data: {"type": "text-delta", "id": "t", "text": "partial"}\n\n'
            content_type = b"text/event-stream"
        else:  # a 200 that is no event stream
            body = b'{"success": true, "data": {"text": "not a stream"}}'
            content_type = b"application/json"
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", content_type)]})
        await send({"type": "http.response.body", "body": body})

    return app


async def test_a_faulty_remote_agent_is_a_provider_error_and_its_first_agent_the_default(tmp_path):
    seen: list[str] = []
    async with trio.open_nursery() as nursery:
        agent_url = await nursery.start(partial(serve_asgi, faulty_voltagent(seen), parse_bind("127.0.0.1:0")))
        async with open_atlas(tmp_path, users={"alice": None}, agent_url=agent_url) as server:
            async with connect(server.ws_url("alice", server.tokens["alice"])) as ws:
                await ready(ws)
                await send_json(ws, {"type": "agent:stream", "message": "hi", "id": "cut"})
                cut = await receive_until(ws, "agent:error")
                await send_json(ws, {"type": "agent:stream", "message": "hi", "id": "json", "agentId": "second"})
                not_sse = await receive_until(ws, "agent:error")
        nursery.cancel_scope.cancel()
    assert seen[:2] == ["/agents", "/agents/first/stream"]  # asked for its list, then used the first
    assert [f["type"] for f in cut] == ["agent:start", "agent:delta", "agent:error"]
    assert cut[-1]["error"]["code"] == "provider_error"
    assert not_sse[-1]["error"]["code"] == "provider_error"
    assert not any(f["type"] == "agent:done" for f in cut + not_sse)
