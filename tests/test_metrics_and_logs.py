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
