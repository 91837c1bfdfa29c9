"""The reply cap (``ATLAS_MAX_REPLY_BYTES``) on every path that relays a reply: the WebSocket (plain
and resumable), the metered ``?proxy=`` routes and ``/v1``, with the agent in-process and remote.
A reply over it ends with ``too_large``, and the request is still settled in the ledger."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from agent_fixtures import read_events
from fake_provider import Reply
from servers import WAIT, connect, open_atlas, ready, receive_until, send_json
from test_relay import Gateway, layout, open_gateway  # noqa: F401 (layout: the fixture)

CAP = 20_000
LONG = Reply(deltas=["x" * 1000] * 60)  # 60 kB, three times the cap
SHORT = Reply(deltas=["x" * 1000] * 15)  # under it


async def settled(gw: Gateway) -> dict[str, Any]:
    """Today's ledger entry of alice."""
    async with httpx.AsyncClient(timeout=WAIT) as http:
        response = await http.get(f"{gw.atlas.url}/party/alice/usage?since=2000-01-01",
                                  headers=gw.auth_header("alice"))
    days = response.json()["days"]
    assert len(days) == 1, days
    return days[0]


@pytest.mark.parametrize("resumable", [False, True])
async def test_a_websocket_reply_over_the_cap_ends_with_too_large(tmp_path, layout, resumable):
    async with open_gateway(tmp_path, layout, max_reply_bytes=CAP) as gw:
        gw.provider.behaviour = LONG
        async with connect(gw.ws_url("alice")) as ws:
            await ready(ws)
            await send_json(ws, {"type": "agent:stream", "id": "r", "message": "long", "resumable": resumable})
            frames = await receive_until(ws, "agent:error")
            text = "".join(f["text"] for f in frames if f["type"] == "agent:delta")
            assert frames[-1]["error"]["code"] == "too_large", frames[-1]
            assert "ATLAS_MAX_REPLY_BYTES" in frames[-1]["error"]["message"]
            assert len(text) <= CAP
            gw.provider.behaviour = SHORT  # the connection goes on; a reply under the cap is whole
            await send_json(ws, {"type": "agent:text", "id": "s", "message": "short"})
            done = (await receive_until(ws, "agent:done"))[-1]
            assert len(done["text"]) == 15_000
        day = await settled(gw)
    assert day["requests"] == 2 and day["totalTokens"] > 0, day


@pytest.mark.parametrize("route", ["stream", "chat"])
async def test_a_proxied_stream_over_the_cap_ends_with_the_routes_error_event(tmp_path, layout, route):
    async with open_gateway(tmp_path, layout, max_reply_bytes=CAP) as gw:
        gw.provider.behaviour = LONG
        url = gw.proxy_url("alice", f"/agents/atlas-assistant/{route}")
        async with httpx.AsyncClient(timeout=WAIT) as http:
            async with http.stream("POST", url, headers=gw.auth_header("alice"),
                                   json={"input": "long"}) as response:
                assert response.status_code == 200
                events = [event async for event in read_events(response)]
        day = await settled(gw)
    errors = [e for e in events if isinstance(e, dict) and e.get("type") == "error"]
    assert len(errors) == 1, events[-3:]
    said = errors[0].get("errorText") or errors[0]["error"]["code"]
    assert "too_large" in said
    assert not any(isinstance(e, dict) and e.get("type") == "finish" for e in events)
    assert day["requests"] == 1 and day["totalTokens"] > 0, day


async def test_a_proxied_whole_answer_over_the_cap_is_an_error_answer(tmp_path, layout):
    async with open_gateway(tmp_path, layout, max_reply_bytes=CAP) as gw:
        gw.provider.behaviour = LONG
        async with httpx.AsyncClient(timeout=WAIT) as http:
            response = await http.post(gw.proxy_url("alice", "/agents/atlas-assistant/text"),
                                       headers=gw.auth_header("alice"), json={"input": "long"})
            assert response.status_code == 502, response.text
            assert response.json()["code"] == "too_large"
            gw.provider.behaviour = SHORT
            response = await http.post(gw.proxy_url("alice", "/agents/atlas-assistant/text"),
                                       headers=gw.auth_header("alice"), json={"input": "short"})
            assert response.status_code == 200 and len(response.json()["data"]["text"]) == 15_000
        day = await settled(gw)
    assert day["requests"] == 2 and day["totalTokens"] > 0, day


@pytest.mark.parametrize("stream", [True, False])
async def test_a_v1_completion_over_the_cap_ends_with_too_large(tmp_path, provider, stream):
    provider.behaviour = LONG
    async with open_atlas(tmp_path, users={"alice": None}, provider_url=provider.url,
                          max_reply_bytes=CAP) as server:
        auth = {"Authorization": f"Bearer {server.tokens['alice']}"}
        body = {"model": "m", "messages": [{"role": "user", "content": "long"}], "stream": stream}
        async with httpx.AsyncClient(timeout=WAIT) as http:
            response = await http.post(f"{server.url}/v1/chat/completions", headers=auth, json=body)
            usage = (await http.get(f"{server.url}/party/alice/usage?since=2000-01-01", headers=auth)).json()
    if stream:
        assert response.status_code == 200
        events = [line[6:] for line in response.text.split("\n\n") if line.startswith("data: ")]
        assert json.loads(events[-1])["error"]["code"] == "too_large", events[-1]
        assert "[DONE]" not in events
        assert len(response.content) <= CAP + 1000
    else:
        assert response.status_code == 502 and response.json()["error"]["code"] == "too_large"
    day = usage["days"][0]
    assert day["requests"] == 1 and day["totalTokens"] > 0, day
