"""The OpenAI-compatible endpoint, driven by the official ``openai`` Python SDK against a real
Atlas server, in front of a fake provider that bills like a real one."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import httpx2
import openai
import pytest
import trio
from fake_provider import Bill, Malformed, Status, prompt_tokens
from servers import WAIT, AtlasServer, open_atlas
from usage_helpers import Clock, write_agents

MODEL = "test-model"


@asynccontextmanager
async def open_v1(tmp_path, provider, **settings: Any) -> AsyncIterator[AtlasServer]:
    write_agents(tmp_path / "data")
    async with open_atlas(tmp_path, users={"alice": None}, provider_url=provider.url,
                          clock=Clock(), **settings) as server:
        yield server


_SDK_CLIENTS: list[openai.OpenAI] = []


def sdk(server: AtlasServer, token: str | None = None, **kwargs: Any) -> openai.OpenAI:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=token or server.tokens["alice"],
                           timeout=WAIT, **kwargs)
    _SDK_CLIENTS.append(client)
    return client


@pytest.fixture(autouse=True)
def _close_sdk_clients():
    """Every SDK client a test made is closed after it: each keeps a pool of connections."""
    yield
    while _SDK_CLIENTS:
        _SDK_CLIENTS.pop().close()


async def in_thread(function, *args: Any, **kwargs: Any) -> Any:
    """The SDK is synchronous: run it in a worker thread, as an application would."""
    return await trio.to_thread.run_sync(lambda: function(*args, **kwargs))


async def usage_of(server: AtlasServer, user: str = "alice") -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=WAIT) as http:
        response = await http.get(f"{server.url}/party/{user}/usage?since=2000-01-01",
                                  headers={"Authorization": f"Bearer {server.tokens[user]}"})
    return response.json()


async def test_a_plain_completion_with_the_body_kept_as_it_came(tmp_path, provider):
    provider.behaviour = Bill(tokens=7)
    tools = [{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]
    async with open_v1(tmp_path, provider) as server:
        client = sdk(server)
        completion = await in_thread(
            client.chat.completions.create, model=MODEL, temperature=0.2, tools=tools,
            messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
            response_format={"type": "text"}, extra_body={"vendor_option": {"x": [1, 2]}},
        )
        ledger = await usage_of(server)
    assert completion.choices[0].message.content == "w " * 7
    sent = provider.completions()[0]
    assert sent.api_key != server.tokens["alice"] and sent.api_key.startswith("sk-test-alice")
    assert sent.body["temperature"] == 0.2 and sent.body["tools"] == tools
    assert sent.body["vendor_option"] == {"x": [1, 2]} and sent.body["response_format"] == {"type": "text"}
    assert "max_tokens" not in sent.body and "stream_options" not in sent.body  # no limit: untouched
    assert completion.usage.total_tokens == prompt_tokens(sent.body) + 7
    day = ledger["days"][0]
    assert (day["requests"], day["totalTokens"]) == (1, completion.usage.total_tokens)


async def test_a_streamed_completion_assembled_from_the_sdks_chunks(tmp_path, provider):
    provider.behaviour = Bill(tokens=12)
    async with open_v1(tmp_path, provider, limit_tokens_per_day=100_000) as server:
        client = sdk(server)
        messages = [{"role": "user", "content": "Tell me something"}]

        def stream(**extra: Any) -> list[Any]:
            return list(client.chat.completions.create(model=MODEL, messages=messages, stream=True, **extra))

        plain = await in_thread(stream)
        with_usage = await in_thread(stream, stream_options={"include_usage": True})
        ledger = await usage_of(server)
    text = "".join(c.choices[0].delta.content or "" for c in plain if c.choices)
    assert text == "w " * 12
    assert all(c.usage is None for c in plain)  # the usage chunk was Atlas's, not the client's
    assert with_usage[-1].choices == [] and with_usage[-1].usage.completion_tokens == 12
    first, second = provider.completions()
    assert first.body["stream_options"] == {"include_usage": True}  # Atlas asked for it
    assert first.body["max_tokens"] == 4096  # the default output cap, with a token limit on
    day = ledger["days"][0]
    assert day["requests"] == 2
    assert day["totalTokens"] == 2 * (prompt_tokens(first.body) + 12)


async def test_models_come_from_the_provider_else_from_the_agents(tmp_path, provider):
    async with open_v1(tmp_path, provider) as server:
        client = sdk(server)
        provider.models = ["gpt-a", "gpt-b"]
        listed = await in_thread(client.models.list)
        assert [m.id for m in listed.data] == ["gpt-a", "gpt-b"]
        provider.models = None  # a provider without /models
        listed = await in_thread(client.models.list)
        assert [m.id for m in listed.data] == [MODEL]
    assert provider.requests[0].api_key.startswith("sk-test-alice")


async def test_a_bad_token_is_an_authentication_error(tmp_path, provider):
    async with open_v1(tmp_path, provider) as server:
        with pytest.raises(openai.AuthenticationError) as error:
            await in_thread(sdk(server, "not-a-token").chat.completions.create,
                            model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert error.value.status_code == 401
    assert error.value.body["code"] == "unauthorized"
    assert provider.requests == []


async def test_over_budget_is_402_and_reaches_no_provider(tmp_path, provider):
    provider.behaviour = Bill(tokens=5)
    async with open_v1(tmp_path, provider, limit_tokens_per_day=60) as server:
        client = sdk(server)
        with pytest.raises(openai.APIStatusError) as error:
            await in_thread(client.chat.completions.create, model=MODEL,
                            messages=[{"role": "user", "content": "x" * 100}])
    assert error.value.status_code == 402
    body = error.value.body
    assert body["code"] == "quota_exceeded" and body["type"] == "insufficient_quota"
    assert body["resetAt"] == "2025-01-16T00:00:00Z"
    assert provider.requests == []  # and the SDK did not retry a 402


async def test_a_rate_limit_is_retried_by_the_sdk(tmp_path, provider):
    gate = trio.Event()
    provider.behaviour = Bill(tokens=3, gate=gate, hold_after=1)
    statuses: list[int] = []
    refused = trio.Event()
    token = trio.lowlevel.current_trio_token()

    def seen(response: httpx2.Response) -> None:
        statuses.append(response.status_code)
        if response.status_code == 429:
            trio.from_thread.run_sync(refused.set, trio_token=token)

    async with open_v1(tmp_path, provider, limit_concurrent_requests=1) as server:
        messages = [{"role": "user", "content": "hi"}]
        async with httpx.AsyncClient(timeout=WAIT) as http, trio.open_nursery() as nursery:
            # One request in flight, held by the provider.
            nursery.start_soon(lambda: http.post(
                f"{server.url}/v1/chat/completions", json={"model": MODEL, "messages": messages},
                headers={"Authorization": f"Bearer {server.tokens['alice']}"}))
            await provider.wait_requests(1)
            client = sdk(server, http_client=httpx2.Client(event_hooks={"response": [seen]}))
            result: list[Any] = []
            nursery.start_soon(lambda: in_thread_append(result, client, messages))
            with trio.fail_after(WAIT):
                await refused.wait()
            gate.set()  # the held request ends; the SDK's retry (after Retry-After) gets in
    assert statuses == [429, 200]
    assert result[0].choices[0].message.content == "w " * 3
    assert len(provider.completions()) == 2


async def in_thread_append(result: list[Any], client: openai.OpenAI, messages: list[Any]) -> None:
    result.append(await in_thread(client.chat.completions.create, model=MODEL, messages=messages))


async def test_a_cancelled_stream_stops_the_provider_and_is_settled(tmp_path, provider):
    gate = trio.Event()
    provider.behaviour = Bill(tokens=50, gate=gate, hold_after=3)
    async with open_v1(tmp_path, provider, limit_tokens_per_day=10_000, limit_wait_seconds=0) as server:
        token = server.tokens["alice"]
        async with httpx.AsyncClient(timeout=WAIT) as http:
            async with http.stream(
                "POST", f"{server.url}/v1/chat/completions",
                json={"model": MODEL, "stream": True, "max_tokens": 100,
                      "messages": [{"role": "user", "content": "a long story"}]},
                headers={"Authorization": f"Bearer {token}"},
            ) as response:
                assert response.status_code == 200
                async for chunk in response.aiter_bytes():
                    if b'"content"' in chunk:
                        break  # leave mid-stream: the connection closes
            cut = await provider.wait_disconnect()
            assert not cut.completed
            # Settled: the worst case is charged (nothing was reported) and nothing stays held.
            with trio.fail_after(WAIT):
                while not (await usage_of(server))["days"]:
                    await trio.lowlevel.checkpoint()
            usage = await usage_of(server)
            day = usage["days"][0]
            assert day["completionTokens"] == 100  # the output cap: the provider said nothing
            assert 0 < day["promptTokens"] < 200  # the prompt's bound: body bytes and allowances
            provider.behaviour = Bill(tokens=2)
            left = usage["remaining"]["tokensToday"]
            final = await http.post(
                f"{server.url}/v1/chat/completions",
                json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": left - 40},
                headers={"Authorization": f"Bearer {token}"},
            )
            assert final.status_code == 200, final.text  # with no wait allowed, a leak would be 429


async def test_v1_errors_have_openais_shape(tmp_path, provider):
    async with open_v1(tmp_path, provider) as server:
        client = sdk(server, max_retries=0)
        with pytest.raises(openai.BadRequestError) as error:
            await in_thread(client.chat.completions.create, model=MODEL, messages=[])
        assert error.value.body["code"] == "bad_request" and "messages" in error.value.body["message"]
        with pytest.raises(openai.BadRequestError) as error:
            await in_thread(client.chat.completions.create, model=MODEL, max_tokens=0,
                            messages=[{"role": "user", "content": "hi"}])
        assert "max_tokens" in error.value.body["message"]
        provider.script(Status(429, retry_after="7"), Status(500), Status(401, echo_key=True))
        with pytest.raises(openai.RateLimitError) as error:
            await in_thread(client.chat.completions.create, model=MODEL, messages=[{"role": "user", "content": "hi"}])
        assert error.value.response.headers["retry-after"] == "7"
        with pytest.raises(openai.InternalServerError):
            await in_thread(client.chat.completions.create, model=MODEL, messages=[{"role": "user", "content": "hi"}])
        with pytest.raises(openai.AuthenticationError) as error:  # the provider refused the virtual key
            await in_thread(client.chat.completions.create, model=MODEL, messages=[{"role": "user", "content": "hi"}])
        assert error.value.body["message"] == "fake failure for key ***"
        async with httpx.AsyncClient(timeout=WAIT) as http:
            headers = {"Authorization": f"Bearer {server.tokens['alice']}"}
            not_json = await http.post(f"{server.url}/v1/chat/completions", content=b"{", headers=headers)
            unknown = await http.get(f"{server.url}/v1/embeddings", headers=headers)
            wrong_method = await http.get(f"{server.url}/v1/chat/completions", headers=headers)
    assert not_json.status_code == 400 and not_json.json()["error"]["type"] == "invalid_request_error"
    assert unknown.status_code == 404 and wrong_method.status_code == 405
    assert wrong_method.headers["allow"] == "POST"
    assert len(provider.completions()) == 3  # only the three the provider refused


async def test_cors_preflights(tmp_path, provider):
    async with open_v1(tmp_path, provider, cors_origins=("https://app.example",)) as server:
        async with httpx.AsyncClient(timeout=WAIT) as http:
            preflight_headers = {
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os",
            }
            allowed = await http.options(f"{server.url}/v1/chat/completions",
                                         headers={"Origin": "https://app.example", **preflight_headers})
            refused = await http.options(f"{server.url}/v1/chat/completions",
                                         headers={"Origin": "https://evil.example", **preflight_headers})
            party = await http.options(f"{server.url}/party/alice",
                                       headers={"Origin": "https://app.example", **preflight_headers})
            models = await http.get(f"{server.url}/v1/models", headers={
                "Origin": "https://app.example", "Authorization": f"Bearer {server.tokens['alice']}"})
            other = await http.get(f"{server.url}/party/alice", headers={
                "Origin": "https://evil.example", "Authorization": f"Bearer {server.tokens['alice']}"})
    assert allowed.status_code == 204
    assert allowed.headers["access-control-allow-origin"] == "https://app.example"
    allowed_headers = allowed.headers["access-control-allow-headers"]
    assert "authorization" in allowed_headers and "content-type" in allowed_headers
    assert "x-stainless-os" in allowed_headers
    assert refused.status_code == 403 and "access-control-allow-origin" not in refused.headers
    assert party.status_code == 204 and party.headers["access-control-allow-origin"] == "https://app.example"
    assert models.status_code == 200 and models.headers["access-control-allow-origin"] == "https://app.example"
    assert other.status_code == 200 and "access-control-allow-origin" not in other.headers


async def test_whole_numbers_sent_as_floats_are_whole_numbers(tmp_path, provider):
    """JSON's 2 and 2.0 are one number (JSON Schema's integer takes both); schemathesis found
    `n: 2773.0` refused with 400."""
    async with open_v1(tmp_path, provider) as server:
        async with httpx.AsyncClient(timeout=WAIT) as http:
            answer = await http.post(
                f"{server.url}/v1/chat/completions", headers={"Authorization": f"Bearer {server.tokens['alice']}"},
                json={"model": MODEL, "n": 1.0, "max_tokens": 5.0, "messages": [{"role": "user", "content": "hi"}]},
            )
            half = await http.post(
                f"{server.url}/v1/chat/completions", headers={"Authorization": f"Bearer {server.tokens['alice']}"},
                json={"model": MODEL, "max_tokens": 5.5, "messages": [{"role": "user", "content": "hi"}]},
            )
    assert answer.status_code == 200, answer.text
    sent = provider.completions()[0].body
    assert (sent["n"], sent["max_tokens"]) == (1, 5) and type(sent["max_tokens"]) is int  # noqa: E721
    assert half.status_code == 400 and "max_tokens" in half.json()["error"]["message"]


async def test_a_provider_answer_that_is_not_json_is_a_provider_error(tmp_path, provider):
    """Schemathesis found a provider's malformed chunk passed on to the client as it came."""
    provider.script(Malformed(after=1))
    async with open_v1(tmp_path, provider) as server:
        async with httpx.AsyncClient(timeout=WAIT) as http:
            answer = await http.post(
                f"{server.url}/v1/chat/completions", headers={"Authorization": f"Bearer {server.tokens['alice']}"},
                json={"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "hi"}]},
            )
            provider.script(Malformed(after=1))  # a stream, where a whole JSON answer was asked for
            whole = await http.post(
                f"{server.url}/v1/chat/completions", headers={"Authorization": f"Bearer {server.tokens['alice']}"},
                json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
            )
    events = [line[len("data: "):] for line in answer.text.splitlines() if line.startswith("data: ")]
    decoded = [json.loads(event) for event in events]  # every event the client gets is JSON
    assert decoded[-2]["choices"][0]["delta"]["content"] == "part0 "
    assert decoded[-1]["error"]["code"] == "provider_error"
    assert whole.status_code == 502 and whole.json()["error"]["code"] == "provider_error"
