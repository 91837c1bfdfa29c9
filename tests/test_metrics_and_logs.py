"""Operations (issue 14): ``/metrics`` parses as Prometheus text and names no user, token or key;
``ATLAS_LOG_FORMAT=json`` writes one JSON object per line."""

from __future__ import annotations

import json
import logging

import httpx
from prometheus_client.parser import text_string_to_metric_families
from servers import connect, open_atlas, ready

from atlas.logs import JsonFormatter


async def test_metrics_parse_and_hold_no_user_token_or_key(tmp_path):
    async with open_atlas(tmp_path, users={"alice": None}) as server:
        token = server.tokens["alice"]
        async with connect(server.ws_url("alice", token)) as ws:
            await ready(ws)
            async with httpx.AsyncClient(base_url=server.url) as client:
                response = await client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    families = {family.name: family for family in text_string_to_metric_families(response.text)}
    samples = {sample.name: sample.value for family in families.values() for sample in family.samples}
    assert samples["atlas_websocket_connections"] == 1 and samples["atlas_rooms_loaded"] == 1
    for name in ("atlas_agent_requests", "atlas_time_to_first_token_seconds",
                 "atlas_agent_request_duration_seconds", "atlas_provider_errors", "atlas_limit_refusals"):
        assert name in families, name
    assert "alice" not in response.text and token not in response.text


def test_json_log_lines_are_objects_with_the_records_fields():
    record = logging.LogRecord("atlas.test", logging.INFO, __file__, 1, "request %s", ("done",), None)
    record.fields = {"user": "alice", "path": "ws", "outcome": "ok", "tokens": 14}
    line = JsonFormatter().format(record)
    entry = json.loads(line)
    assert "\n" not in line
    assert entry["message"] == "request done" and entry["level"] == "info" and entry["logger"] == "atlas.test"
    assert (entry["user"], entry["path"], entry["outcome"], entry["tokens"]) == ("alice", "ws", "ok", 14)
    assert entry["time"].endswith("Z")


async def test_every_agent_request_leaves_one_record_on_every_path(tmp_path, caplog):
    from fake_provider import Status, open_fake_provider
    from prometheus_client.parser import text_string_to_metric_families
    from servers import receive_until, send_json

    caplog.set_level(logging.INFO, logger="atlas.requests")
    async with open_fake_provider() as provider:
        async with open_atlas(
            tmp_path, users={"alice": None}, provider_url=provider.url, provider_retries=0,
            limit_tokens_per_day=10_000,
        ) as server:
            token = server.tokens["alice"]
            async with connect(server.ws_url("alice", token)) as ws:
                await ready(ws)
                await send_json(ws, {"type": "agent:stream", "message": "hi", "id": "ok"})
                await receive_until(ws, "agent:done")
                provider.script(Status(401))
                await send_json(ws, {"type": "agent:stream", "message": "hi", "id": "bad"})
                error = await receive_until(ws, "agent:error")
                assert error[-1]["error"]["code"] == "provider_auth"
            async with httpx.AsyncClient(base_url=server.url, headers={"Authorization": f"Bearer {token}"}) as client:
                proxied = await client.post("/party/alice?proxy=/agents/atlas-assistant/text", json={"input": "hi"})
                assert proxied.status_code == 200
                completion = await client.post("/v1/chat/completions", json={
                    "model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]})
                assert completion.status_code == 200
                exposition = (await client.get("/metrics")).text
    records = [r.fields for r in caplog.records if r.name == "atlas.requests"]
    seen = [(f["path"], f["outcome"]) for f in records]
    assert seen == [("ws", "ok"), ("ws", "provider_auth"), ("proxy", "ok"), ("v1", "ok")], seen
    assert all(f["user"] == "alice" and f["duration_ms"] >= 0 for f in records)
    assert records[0]["agent"] == "atlas-assistant" and records[0]["tokens"] > 0
    assert "first_token_ms" in records[0] and records[3]["agent"] == "gpt-test"
    counts = {
        (s.labels.get("path"), s.labels.get("outcome")): s.value
        for family in text_string_to_metric_families(exposition) if family.name == "atlas_agent_requests"
        for s in family.samples if s.name == "atlas_agent_requests_total"
    }
    assert counts == {("ws", "ok"): 1, ("ws", "provider_auth"): 1, ("proxy", "ok"): 1, ("v1", "ok"): 1}
    assert token not in exposition and all(token not in r.getMessage() for r in caplog.records)
