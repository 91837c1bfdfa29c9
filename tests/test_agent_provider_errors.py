"""Provider failures, retries, credentials, the agent secret and disconnects, over real HTTP.

Backoff sleeps and the provider timeout run on trio's autojump clock: no real waiting.
"""

from __future__ import annotations

import logging
import socket
from contextlib import aclosing

import pytest
import trio
from agent_fixtures import TEST_KEY, agent_settings, credentials, open_agent, read_events, sse_events
from fake_provider import Cut, Malformed, Reply, Stall, Status


async def post(agent, provider, route="text", **kwargs):
    headers = kwargs.pop("headers", None) or credentials(provider.url)
    return await agent.client.post(
        f"/agents/atlas-assistant/{route}", json=kwargs.pop("json", {"input": "hi"}),
        headers=headers, **kwargs)


def error_of(response):
    payload = response.json()
    assert payload["success"] is False
    return response.status_code, payload["code"]


@pytest.mark.parametrize("route", ["text", "stream", "chat"])
@pytest.mark.parametrize(("status", "expected"), [(401, 401), (403, 401)])
async def test_provider_auth_is_not_retried(agent, provider, route, status, expected):
    provider.behaviour = Status(status)
    response = await post(agent, provider, route)
    assert error_of(response) == (expected, "provider_auth")
    assert len(provider.requests) == 1


async def test_rate_limit_retried_then_reported_with_retry_after(agent, provider, autojump_clock):
    provider.behaviour = Status(429, retry_after="3")
    start = trio.current_time()
    response = await post(agent, provider)
    assert error_of(response) == (429, "provider_rate_limited")
    assert response.headers["retry-after"] == "3"
    assert len(provider.requests) == 3  # provider_retries=2
    assert trio.current_time() - start >= 6  # Retry-After honoured before each retry


async def test_long_retry_after_is_passed_on_not_waited(agent, provider, autojump_clock):
    provider.behaviour = Status(429, retry_after="3600")
    start = trio.current_time()
    response = await post(agent, provider, "stream")
    assert error_of(response) == (429, "provider_rate_limited")
    assert response.headers["retry-after"] == "3600"
    assert len(provider.requests) == 1 and trio.current_time() - start < 1


@pytest.mark.parametrize("status", [500, 502, 503])
async def test_server_errors_retried_then_502(agent, provider, status, autojump_clock):
    provider.behaviour = Status(status)
    response = await post(agent, provider, "stream")
    assert error_of(response) == (502, "provider_error")
    assert len(provider.requests) == 3


async def test_other_client_errors_are_502_without_retry(agent, provider):
    provider.behaviour = Status(404)
    assert error_of(await post(agent, provider)) == (502, "provider_error")
    assert len(provider.requests) == 1


@pytest.mark.parametrize("route", ["text", "stream"])
async def test_failures_then_success(agent, provider, route, autojump_clock):
    provider.script(Status(500), Status(429, retry_after="1"))
    response = await post(agent, provider, route)
    assert response.status_code == 200
    if route == "text":
        assert response.json()["data"]["text"] == "Hello, world"
    else:
        assert sse_events(response.text)[-1]["type"] == "finish"
    assert len(provider.requests) == 3
    assert {r.api_key for r in provider.requests} == {TEST_KEY}


async def test_no_retry_after_the_first_token(agent, provider, autojump_clock):
    provider.behaviour = Cut(after=2, abrupt=True)
    response = await post(agent, provider, "stream")
    assert response.status_code == 200
    events = sse_events(response.text)
    assert [e["type"] for e in events] == ["start", "text-start", "text-delta", "text-delta", "error"]
    assert events[-1]["error"]["code"] == "provider_error"
    assert len(provider.requests) == 1


async def test_clean_cut_without_finish_is_an_error(agent, provider):
    provider.behaviour = Cut(after=1, abrupt=False)
    response = await post(agent, provider)
    assert error_of(response) == (502, "provider_error")
    response = await post(agent, provider, "chat")
    events = sse_events(response.text)
    assert events[-2]["type"] == "error" and "provider_error" in events[-2]["errorText"]
    assert events[-1] == "[DONE]"


@pytest.mark.parametrize("data", [b'{"choices": [{"delta": {"content": ', b'{"choices": "nope"}', b"[1, 2]"])
async def test_malformed_chunk(agent, provider, data):
    provider.behaviour = Malformed(after=1, data=data)
    response = await post(agent, provider, "stream")
    events = sse_events(response.text)
    assert events[-1] == {"type": "error", "error": {
        "code": "provider_error", "message": "the provider sent a malformed stream chunk"}}
    assert error_of(await post(agent, provider)) == (502, "provider_error")


async def test_unreachable_provider_is_retried_then_502(tmp_path, autojump_clock):
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        dead_url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    async with open_agent(agent_settings(dead_url, tmp_path)) as agent:
        response = await agent.client.post(
            "/agents/atlas-assistant/text", json={"input": "hi"}, headers=credentials(dead_url))
        assert error_of(response) == (502, "provider_unreachable")


@pytest.mark.parametrize("after_headers", [False, True])
async def test_stalled_provider_times_out(agent, provider, after_headers, autojump_clock):
    provider.behaviour = Stall(after_headers=after_headers)
    start = trio.current_time()
    response = await post(agent, provider)
    assert error_of(response) == (504, "provider_timeout")
    assert trio.current_time() - start == pytest.approx(30, abs=1)  # settings.provider_timeout
    assert len(provider.requests) == 1  # a timeout is not retried


async def test_stall_mid_stream_times_out_as_error_event(agent, provider, autojump_clock):
    provider.behaviour = Stall(after_deltas=1)
    response = await post(agent, provider, "stream")
    events = sse_events(response.text)
    assert events[2]["type"] == "text-delta"
    assert events[-1]["type"] == "error" and events[-1]["error"]["code"] == "provider_timeout"


async def test_missing_key_sends_nothing(agent, provider):
    headers = credentials(provider.url)
    del headers["X-Provider-API-Key"]
    response = await post(agent, provider, headers=headers)
    assert error_of(response) == (400, "no_credentials")
    assert provider.requests == []


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:1/v1", "https://evil.example/v1", "http://169.254.169.254/latest",
])
async def test_disallowed_provider_url_sends_nothing(agent, provider, url):
    for route in ("text", "stream", "chat"):
        response = await post(agent, provider, route, headers=credentials(url))
        assert error_of(response) == (400, "provider_not_allowed")
    assert provider.requests == []


async def test_provider_url_is_compared_normalised(agent, provider):
    scheme, rest = provider.url.split("://")
    for variant in (provider.url + "/", f"{scheme.upper()}://{rest.upper().replace('/V1', '/v1')}"):
        response = await post(agent, provider, headers=credentials(variant))
        assert response.status_code == 200, (variant, response.text)
    response = await post(agent, provider, headers=credentials(provider.url + "/other"))
    assert error_of(response) == (400, "provider_not_allowed")


async def test_missing_url_header_uses_the_default_provider(agent, provider):
    headers = credentials(provider.url)
    del headers["X-Provider-API-URL"]
    assert (await post(agent, provider, headers=headers)).status_code == 200
    assert len(provider.requests) == 1


async def test_agent_secret(provider, tmp_path):
    settings = agent_settings(provider.url, tmp_path, agent_secret="s3cret")
    async with open_agent(settings) as agent:
        for secret in (None, "wrong", "s3cret-and-more", ""):
            headers = credentials(provider.url)
            if secret is not None:
                headers["X-Atlas-Agent-Secret"] = secret
            response = await post(agent, provider, headers=headers)
            assert error_of(response) == (401, "agent_secret_mismatch")
            assert (await agent.client.get("/agents", headers=headers)).status_code == 401
        assert provider.requests == []
        headers = {**credentials(provider.url), "X-Atlas-Agent-Secret": "s3cret"}
        assert (await post(agent, provider, headers=headers)).status_code == 200
        assert (await agent.client.get("/healthz")).status_code == 200


@pytest.mark.parametrize("route", ["stream", "chat"])
async def test_client_disconnect_closes_the_provider_request(agent, provider, route):
    gate = trio.Event()  # never set: the provider holds after the first delta
    provider.behaviour = Reply(deltas=["one", "two"], gate=gate)
    async with agent.client.stream(
        "POST", f"/agents/atlas-assistant/{route}", json={"input": "hi"},
        headers=credentials(provider.url),
    ) as response, aclosing(read_events(response)) as events:
        async for event in events:
            if event["type"] == "text-delta":
                break
    # Leaving the block closed our connection to the agent.
    with trio.fail_after(5):
        record = await provider.wait_disconnect()
    assert not record.completed


async def test_disconnect_before_first_byte_closes_the_provider_request(agent, provider):
    provider.behaviour = Stall(after_headers=False)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(post, agent, provider, "stream")
        await provider.wait_requests(1)
        nursery.cancel_scope.cancel()
    with trio.fail_after(5):
        await provider.wait_disconnect()


async def test_key_never_logged_nor_returned(provider, tmp_path, caplog, autojump_clock):
    caplog.set_level(logging.DEBUG)
    key = "sk-LEAKCHECK-9f8e7d6c5b4a"
    settings = agent_settings(provider.url, tmp_path, log_level="DEBUG")
    bodies: list[str] = []
    async with open_agent(settings) as agent:
        behaviours = [Reply(), Status(401), Status(429, retry_after="1"), Status(500),
                      Malformed(), Cut(after=1), Cut(after=1, abrupt=False), Stall()]
        for behaviour in behaviours:
            provider.behaviour = behaviour
            for route in ("text", "stream", "chat"):
                response = await post(agent, provider, route, headers=credentials(provider.url, key=key))
                bodies.append(response.text + str(response.headers))
        for url in ("https://elsewhere.example/v1", f"https://{key}@elsewhere.example/v1"):
            response = await post(agent, provider, headers=credentials(url, key=key))
            bodies.append(response.text + str(response.headers))
    assert all(r.api_key == key for r in provider.requests)  # the key did reach the provider
    assert caplog.records, "nothing was logged: the check would be vacuous"
    assert key not in caplog.text
    for record in caplog.records:
        assert key not in record.getMessage()
        assert key not in str(record.args)
    for body in bodies:
        assert key not in body
