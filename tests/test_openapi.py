"""The OpenAPI documents (``GET /openapi.json``): served by the real servers as JSON, valid
OpenAPI, and describing every route the apps serve, so that a route added without documentation
fails here. (tests/reliability/test_schemathesis.py fuzzes the servers from these documents.)"""

from __future__ import annotations

import re
from typing import Any

import httpx
import msgspec
from agent_fixtures import TEST_KEY, agent_settings, credentials, open_agent
from schemathesis.specs.openapi.adapter.validators import validate_v3
from servers import open_atlas

from atlas.agent_api.app import ROUTES as AGENT_ROUTES
from atlas.gateway.app import ROOM_PREFIXES, build_pages_app
from atlas.gateway.openapi import UNDOCUMENTED
from atlas.gateway.v1 import ROUTES as V1_ROUTES

METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace", "query"}


def operations(document: dict[str, Any]) -> dict[str, set[str]]:
    return {path: {m.upper() for m in item if m in METHODS} for path, item in document["paths"].items()}


def load(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    document = msgspec.json.decode(response.content)
    validate_v3(document)  # schemathesis's own validator: the OpenAPI 3.2 meta-schema
    assert document["openapi"].startswith("3.")
    return document


async def test_the_agent_serves_a_valid_document_of_all_its_routes(agent):
    document = load(await agent.client.get("/openapi.json"))
    assert operations(document) == {path: {method} for path, method in AGENT_ROUTES.items()}
    assert "securitySchemes" not in document["components"]  # no ATLAS_AGENT_SECRET here
    # The credentials it documents are the headers the routes read.
    text = document["paths"]["/agents/{id}/text"]["post"]
    assert {p["name"] for p in text["parameters"] if p["in"] == "header"} == set(credentials("x"))


async def test_with_a_secret_the_document_says_so_and_needs_none(provider, tmp_path):
    async with open_agent(agent_settings(provider.url, tmp_path, agent_secret="s3cret-for-openapi")) as agent:
        document = load(await agent.client.get("/openapi.json"))
        assert document["components"]["securitySchemes"]["agentSecret"]["name"] == "X-Atlas-Agent-Secret"
        assert document["paths"]["/agents"]["get"]["security"] == [{"agentSecret": []}]
        assert document["paths"]["/healthz"]["get"]["security"] == []
        assert (await agent.client.get("/agents")).status_code == 401
        wrong = await agent.client.post("/openapi.json")
        assert (wrong.status_code, wrong.headers["allow"]) == (405, "GET")


async def test_the_document_describes_the_bodies_the_agent_takes(agent, provider):
    """Examples written from the document alone are served; one it forbids is refused."""
    document = load(await agent.client.get("/openapi.json"))
    options = document["components"]["schemas"]["AgentOptions"]
    assert options["additionalProperties"] is False and "maxOutputTokens" in options["properties"]
    body = {"input": [{"role": "user", "parts": [{"type": "text", "text": "hi"}]}],
            "options": {"maxOutputTokens": 20.0}}  # a whole number as a float is that number
    answer = await agent.client.post("/agents/atlas-assistant/text", json=body, headers=credentials(provider.url))
    assert answer.status_code == 200, answer.text
    assert provider.completions(TEST_KEY)[-1].body["max_tokens"] == 20
    refused = await agent.client.post("/agents/atlas-assistant/text", json={**body, "options": {"topP": 2}},
                                      headers=credentials(provider.url))
    assert refused.status_code == 400


def gateway_routes() -> set[str]:
    """Every HTTP route the gateway serves, as OpenAPI paths: the pages' URL map (Quart's),
    the /v1 routes, the room routes, and the dispatcher's own."""
    pages = {re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule) for rule in build_pages_app(None).url_map.iter_rules()}
    rooms = {f"{prefix.rstrip('/')}/{{room}}{sub}" for prefix in ROOM_PREFIXES for sub in ("", "/usage")}
    return pages | set(V1_ROUTES) | rooms | {"/api/me", "/metrics", "/openapi.json"}


async def test_the_gateway_serves_a_valid_document_of_all_its_routes(tmp_path, provider):
    async with open_atlas(tmp_path, users={"alice": None}, provider_url=provider.url) as server:
        async with httpx.AsyncClient(base_url=server.url) as client:
            document = load(await client.get("/openapi.json"))
            assert set(document["paths"]) == gateway_routes() - set(UNDOCUMENTED)
            for path, method in V1_ROUTES.items():
                assert operations(document)[path] == {method}
            # Every documented path is served (none is the pages' 404), with the right methods.
            token = server.tokens["alice"]
            for path, methods in operations(document).items():
                url = path.replace("{room}", "alice")
                for method in methods:
                    answer = await client.request(method, url, headers={"Authorization": f"Bearer {token}"},
                                                  params={"proxy": "/agents"} if method == "POST" else None,
                                                  json={"input": "hi"} if method == "POST" else None)
                    assert answer.json() if "json" in answer.headers["content-type"] else answer.text
                    assert answer.status_code != 404, (method, path, answer.text)
            wrong = await client.post("/openapi.json")
            assert (wrong.status_code, wrong.headers["allow"]) == (405, "GET, HEAD")
            assert wrong.json()["error"]["code"] == "method_not_allowed"
            # The in-process agent's own document, through the room's proxy.
            agent = load(await client.get("/party/alice", params={"proxy": "/openapi.json"},
                                          headers={"Authorization": f"Bearer {token}"}))
            assert operations(agent) == {path: {method} for path, method in AGENT_ROUTES.items()}


async def test_a_remote_agents_document_through_the_gateway(tmp_path, provider):
    secret = "s3cret-for-openapi-remote"
    async with open_agent(agent_settings(provider.url, tmp_path / "agent", agent_secret=secret)) as agent:
        async with open_atlas(tmp_path, users={"alice": None}, provider_url=provider.url,
                              agent_url=agent.url, agent_secret=secret) as server:
            async with httpx.AsyncClient(base_url=server.url) as client:
                document = load(await client.get("/party/alice", params={"proxy": "/openapi.json"},
                                                 headers={"Authorization": f"Bearer {server.tokens['alice']}"}))
    assert operations(document) == {path: {method} for path, method in AGENT_ROUTES.items()}
    assert "agentSecret" in document["components"]["securitySchemes"]


async def test_a_method_a_gateway_route_does_not_take_is_405_with_allow(tmp_path, provider):
    """RFC 9110: a 405 lists what the route takes. Schemathesis found none on the pages' routes
    (Quart's exception names them valid_methods), on /api/me and on the room routes, and found
    /metrics answering any method."""
    async with open_atlas(tmp_path, users={"alice": None}, provider_url=provider.url) as server:
        async with httpx.AsyncClient(base_url=server.url) as client:
            document = load(await client.get("/openapi.json"))
            auth = {"Authorization": f"Bearer {server.tokens['alice']}"}
            for path, methods in operations(document).items():
                answer = await client.request("DELETE", path.replace("{room}", "alice"), headers=auth)
                assert answer.status_code == 405, (path, answer.status_code)
                assert answer.json()["error"]["code"] == "method_not_allowed"
                allowed = set(answer.headers["allow"].split(", "))
                # Without ?proxy= a room route takes GET alone; the agent's routes take POST.
                assert methods - {"POST"} <= allowed if "{room}" in path else methods <= allowed, (path, allowed)


async def test_with_external_auth_there_is_no_api_me(tmp_path, provider):
    async with open_atlas(tmp_path, provider_url=provider.url, auth_url="http://127.0.0.1:9/") as server:
        async with httpx.AsyncClient(base_url=server.url) as client:
            assert "/api/me" not in load(await client.get("/openapi.json"))["paths"]
