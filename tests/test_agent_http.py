"""The agent HTTP API end to end: a real agent server on port 0 in front of the fake provider."""

from __future__ import annotations

import pytest
import trio
from agent_fixtures import TEST_KEY, credentials, read_events, sse_events
from fake_provider import DEFAULT_USAGE, Reply


async def test_healthz_and_agents(agent):
    assert (await agent.client.get("/healthz")).json() == {"ok": True}
    listed = (await agent.client.get("/agents")).json()
    assert listed["success"] is True
    [assistant] = listed["data"]
    assert assistant["id"] == "atlas-assistant"
    assert {"id", "name", "description", "status", "model", "tools", "subAgents"} <= assistant.keys()
    assert assistant["status"] == "idle" and assistant["tools"] == [] and assistant["subAgents"] == []
    one = (await agent.client.get("/agents/atlas-assistant")).json()
    assert one == {"success": True, "data": assistant}


async def test_routing_errors(agent):
    response = await agent.client.get("/agents/nobody")
    assert response.status_code == 404
    assert response.json() == {"success": False, "error": "no agent with id 'nobody'", "code": "unknown_agent"}
    assert (await agent.client.get("/nowhere")).status_code == 404
    assert (await agent.client.get("/agents/atlas-assistant/bogus")).status_code == 404
    response = await agent.client.get("/agents/atlas-assistant/text")
    assert response.status_code == 405 and response.headers["allow"] == "POST"
    assert (await agent.client.post("/agents")).status_code == 405
    response = await agent.client.post(
        "/agents/atlas-assistant/text", content=b"{not json", headers=credentials("x")
    )
    assert response.status_code == 400 and response.json()["code"] == "bad_request"
    deep = b'{"input": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    response = await agent.client.post("/agents/atlas-assistant/text", content=deep, headers=credentials("x"))
    assert response.status_code == 400 and "nested too deeply" in response.json()["error"]
    response = await agent.client.post("/agents/nobody/text", json={"input": "hi"})
    assert response.status_code == 404 and response.json()["code"] == "unknown_agent"


async def test_text_returns_reply_and_provider_usage(agent, provider):
    provider.behaviour = Reply(deltas=["Bon", "jour"], usage={"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7})
    response = await agent.client.post(
        "/agents/atlas-assistant/text",
        json={"input": "Say hello", "options": {"temperature": 0.3, "maxOutputTokens": 50, "topP": 0.9,
                                                "stopSequences": ["\n\n"], "seed": 4}},
        headers=credentials(provider.url),
    )
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    assert data["text"] == "Bonjour"
    assert data["usage"] == {"promptTokens": 5, "completionTokens": 2, "totalTokens": 7}
    assert data["finishReason"] == "stop"
    [seen] = provider.requests
    assert seen.path == "/v1/chat/completions" and seen.api_key == TEST_KEY
    body = seen.body
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["model"] == "gpt-4o-mini"
    assert body["messages"][0]["role"] == "system"
    assert body["messages"][-1] == {"role": "user", "content": "Say hello"}
    assert (body["temperature"], body["max_tokens"], body["top_p"], body["stop"], body["seed"]) == (
        0.3, 50, 0.9, ["\n\n"], 4)


async def test_stream_events_shape(agent, provider):
    response = await agent.client.post(
        "/agents/atlas-assistant/stream", json={"input": "hi"}, headers=credentials(provider.url)
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    assert [e["type"] for e in events] == [
        "start", "text-start", "text-delta", "text-delta", "text-delta", "text-end", "finish"]
    text_id = events[1]["id"]
    assert all(e["id"] == text_id for e in events[1:6])
    assert "".join(e["text"] for e in events if e["type"] == "text-delta") == "Hello, world"
    assert events[-1] == {"type": "finish", "finishReason": "stop", "totalUsage": {
        "inputTokens": DEFAULT_USAGE["prompt_tokens"], "outputTokens": DEFAULT_USAGE["completion_tokens"],
        "totalTokens": DEFAULT_USAGE["total_tokens"]}}


async def test_chat_ui_message_stream(agent, provider):
    body = {"id": "chat-1", "trigger": "submit-message", "messages": [
        {"id": "m1", "role": "user", "parts": [{"type": "text", "text": "first"}]},
        {"id": "m2", "role": "assistant", "parts": [{"type": "step-start"}, {"type": "text", "text": "ok"}]},
        {"id": "m3", "role": "user", "parts": [{"type": "text", "text": "second"}]},
    ]}
    response = await agent.client.post(
        "/agents/atlas-assistant/chat", json=body, headers=credentials(provider.url))
    assert response.status_code == 200
    assert response.headers["x-vercel-ai-ui-message-stream"] == "v1"
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    types = [e["type"] for e in events[:-1]]
    assert types == ["start", "start-step", "text-start", "text-delta", "text-delta", "text-delta",
                     "text-end", "finish-step", "finish"]
    assert "".join(e["delta"] for e in events if isinstance(e, dict) and e["type"] == "text-delta") == "Hello, world"
    sent = provider.requests[0].body["messages"]
    assert [(m["role"], m["content"]) for m in sent[1:]] == [
        ("user", "first"), ("assistant", "ok"), ("user", "second")]


@pytest.mark.parametrize("route", ["stream", "chat"])
async def test_first_delta_arrives_before_provider_finishes(agent, provider, route):
    gate = trio.Event()
    provider.behaviour = Reply(deltas=["one", "two"], gate=gate, hold_after=1)
    async with agent.client.stream(
        "POST", f"/agents/atlas-assistant/{route}", json={"input": "hi"},
        headers=credentials(provider.url),
    ) as response:
        events = read_events(response)
        async for event in events:
            if event["type"] == "text-delta":
                break
        # The provider is still held at the gate: this delta was not buffered.
        assert event.get("text", event.get("delta")) == "one"
        assert not provider.requests[0].completed
        gate.set()
        rest = [event async for event in events]
    deltas = [e.get("text", e.get("delta")) for e in rest if isinstance(e, dict) and e["type"] == "text-delta"]
    assert deltas == ["two"]
    assert provider.requests[0].completed


VOLTAGENT_DOC_BODIES = [
    {"input": "Tell me a joke", "options": {"temperature": 0.8, "maxOutputTokens": 100}},
    {"input": "Write a short story", "options": {"temperature": 0.9, "maxOutputTokens": 500}},
    {"input": "What is the weather like today?", "options": {
        "memory": {"userId": "user-123", "conversationId": "conv-456", "options": {
            "contextLimit": 10,
            "conversationPersistence": {"mode": "step", "debounceMs": 200, "flushOnToolResult": True}}},
        "maxSteps": 5, "temperature": 0.7, "maxOutputTokens": 1000, "topP": 1.0,
        "frequencyPenalty": 0.0, "presencePenalty": 0.0, "seed": 42, "stopSequences": ["\n\n"],
        "providerOptions": {"openai": {"reasoningEffort": "medium"}},
        "context": {"role": "admin", "tier": "premium"}}},
    {"input": [
        {"role": "user", "parts": [{"type": "text", "text": "What is the weather?"}]},
        {"role": "assistant", "parts": [{"type": "text", "text": "I can't access real-time weather data."}]},
        {"role": "user", "parts": [{"type": "text", "text": "Can you explain why?"}]}],
     "options": {"temperature": 0.7}},
    {"input": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the weather?"},
        {"role": "assistant", "content": "I can't access real-time weather data."},
        {"role": "user", "content": "Can you explain why?"}],
     "options": {"temperature": 0.7}},
    {"input": "Help me", "options": {"context": {"role": "admin", "language": "Spanish", "tier": "premium"}}},
    {"input": "hi", "options": {"userId": "u1", "conversationId": "c1"}},
]


@pytest.mark.parametrize("body", VOLTAGENT_DOC_BODIES)
@pytest.mark.parametrize("route", ["text", "stream", "chat"])
async def test_voltagent_doc_bodies(agent, provider, body, route):
    response = await agent.client.post(
        f"/agents/atlas-assistant/{route}", json=body, headers=credentials(provider.url))
    assert response.status_code == 200, response.text
    if route == "text":
        assert response.json()["data"]["text"] == "Hello, world"
    else:
        assert any(isinstance(e, dict) and e["type"] == "text-delta" for e in sse_events(response.text))
    assert len(provider.requests) == 1


@pytest.mark.parametrize(("body", "field"), [
    ({"input": "hi", "options": {"temperature": "hot"}}, "options.temperature"),
    ({"input": "hi", "options": {"temperature": 9}}, "options.temperature"),
    ({"input": "hi", "options": {"maxOutputTokens": 0}}, "options.maxOutputTokens"),
    ({"input": "hi", "options": {"temprature": 1}}, "options.temprature"),
    ({"input": "hi", "options": {"memory": {"userId": 5}}}, "options.memory.userId"),
    ({"input": "hi", "options": []}, "options"),
    ({"input": ""}, "input"),
    ({"input": 3}, "input"),
    ({"input": [{"role": "robot", "content": "x"}]}, "input[0].role"),
    ({"input": [{"role": "user", "parts": [{"type": "text", "text": 1}]}]}, "input[0].parts[0].text"),
    ({"options": {}}, "input"),
    ({"inptu": "hi"}, "inptu"),
    ([1, 2], "body"),
])
async def test_validation_names_the_field(agent, provider, body, field):
    response = await agent.client.post(
        "/agents/atlas-assistant/stream", json=body, headers=credentials(provider.url))
    assert response.status_code == 400, response.text
    payload = response.json()
    assert payload["success"] is False and payload["code"] == "bad_request"
    assert payload["error"].startswith(field), payload["error"]
    assert provider.requests == []


async def test_provider_connection_is_reused(agent, provider):
    for route in ("stream", "text", "chat", "stream"):
        response = await agent.client.post(
            f"/agents/atlas-assistant/{route}", json={"input": "hi"}, headers=credentials(provider.url))
        assert response.status_code == 200
    ports = {r.client_port for r in provider.requests}
    assert len(provider.requests) == 4 and len(ports) == 1 and None not in ports
