"""The in-process Python API (``AgentService.open_stream``) and the provider stream parser."""

from __future__ import annotations

import pytest
import trio
import trio.testing
from agent_fixtures import TEST_KEY, agent_settings
from servers import free_port
from fake_provider import Cut, Reply, Status, open_fake_provider

from atlas.agent import (
    AgentError,
    ChatMessage,
    Credentials,
    Finish,
    TextDelta,
    Usage,
    open_agent_service,
)
from atlas.llm.provider import RetryPolicy, parse_retry_after
from atlas.llm.sse import SseDataParser, SseTooLong


@pytest.fixture
async def service(provider, tmp_path):
    settings = agent_settings(provider.url, tmp_path)
    async with open_agent_service(settings, default_provider_url=provider.url) as service:
        yield service


def creds(provider, **changes):
    values = {"api_key": TEST_KEY, "api_url": provider.url, "user_id": "alice", **changes}
    return Credentials(**values)


async def collect(service, provider, input="hi", options=None, **changes):
    async with service.open_stream("atlas-assistant", input, options or {}, creds(provider, **changes)) as events:
        return [event async for event in events]


async def test_open_stream_yields_deltas_then_one_finish(service, provider):
    provider.behaviour = Reply(deltas=["a", "b", "c"], usage={"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12})
    events = await collect(service, provider)
    assert events == [TextDelta("a"), TextDelta("b"), TextDelta("c"), Finish("stop", Usage(9, 3, 12))]


async def test_open_stream_with_messages(service, provider):
    messages = [ChatMessage("user", "one"), ChatMessage("assistant", "two"), ChatMessage("user", "three")]
    await collect(service, provider, input=messages, options={"temperature": 1.5})
    sent = provider.requests[0].body
    assert [m["content"] for m in sent["messages"][1:]] == ["one", "two", "three"]
    assert sent["temperature"] == 1.5


@pytest.mark.parametrize(("kwargs", "code"), [
    ({"agent_id": "nobody"}, "unknown_agent"),
    ({"input": ""}, "bad_request"),
    ({"input": [ChatMessage("wizard", "x")]}, "bad_request"),
    ({"options": {"topP": 3}}, "bad_request"),
    ({"options": {"bogus": 1}}, "bad_request"),
    ({"api_key": ""}, "no_credentials"),
    ({"api_url": "https://not-allowed.example/v1"}, "provider_not_allowed"),
])
async def test_validation_before_any_io(service, provider, kwargs, code):
    agent_id = kwargs.pop("agent_id", "atlas-assistant")
    input = kwargs.pop("input", "hi")
    options = kwargs.pop("options", {})
    with pytest.raises(AgentError) as caught:
        async with service.open_stream(agent_id, input, options, creds(provider, **kwargs)):
            pytest.fail("entered")
    assert caught.value.code == code
    assert provider.requests == []


async def test_leaving_early_closes_the_provider_response(service, provider):
    provider.behaviour = Reply(deltas=["a", "b"], gate=trio.Event())
    async with service.open_stream("atlas-assistant", "hi", {}, creds(provider)) as events:
        async for event in events:
            assert event == TextDelta("a")
            break
    with trio.fail_after(5):
        record = await provider.wait_disconnect()
    assert not record.completed


async def test_cancelling_closes_the_provider_response(service, provider):
    provider.behaviour = Reply(deltas=["a", "b"], gate=trio.Event())
    with trio.move_on_after(5) as scope:
        async with trio.open_nursery() as nursery:
            async def consume():
                await collect(service, provider)
            nursery.start_soon(consume)
            await provider.wait_requests(1)
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
        await provider.wait_disconnect()
    assert not scope.cancelled_caught


@pytest.mark.parametrize(("reply", "finish"), [
    (Reply(finish_reason=None), Finish("unknown", Usage(11, 3, 14))),  # missing finish_reason
    (Reply(done=False), Finish("stop", Usage(11, 3, 14))),  # no [DONE] at EOF
    (Reply(usage=None), Finish("stop", Usage())),  # no usage chunk
    (Reply(usage_with_choices=True), Finish("stop", Usage(11, 3, 14))),
    (Reply(keepalives=True), Finish("stop", Usage(11, 3, 14))),  # comments, blank lines
    (Reply(finish_reason="length"), Finish("length", Usage(11, 3, 14))),
    (Reply(finish_reason="content_filter"), Finish("content-filter", Usage(11, 3, 14))),
])
async def test_tolerated_stream_shapes(service, provider, reply, finish):
    provider.behaviour = reply
    events = await collect(service, provider)
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == "Hello, world"
    assert events[-1] == finish
    assert sum(isinstance(e, Finish) for e in events) == 1


def test_sse_parser_incremental():
    parser = SseDataParser()
    stream = b': comment\r\n\r\ndata: {"a":1}\r\n\r\n\n\ndata: x\ndata: y\n\nevent: ping\nid: 3\n\ndata:[DONE]\n\n'
    events = []
    for i in range(len(stream)):  # byte by byte: nothing depends on chunk boundaries
        events += parser.feed(stream[i:i + 1])
    events += parser.close()
    assert events == [b'{"a":1}', b"x\ny", b"[DONE]"]
    parser = SseDataParser()
    assert parser.feed(b"data: tail-without-newline") == []
    assert parser.close() == [b"tail-without-newline"]


@pytest.mark.parametrize("reads", [
    [b'data: {"a":1}\n\n', b"data: x\n\n", b"data:[DONE]\n\n"],  # one event per read: the fast path
    [b"data: \n\n", b"data: a\r\n\n", b"data: b\r\r\n\n", b"data:  two spaces\n\n"],
    [b"event: delta\n", b"data: after a field\n\n", b": comment\n\n", b"data: x\n\n"],
    [b"data: half", b" and half\n\n", b"data: x\n\n", b"data: a\ndata: b\n\n"],
    [b"data: x\n\ndata: y\n\n", b"id: 1\ndata: z\n\n", b"data: a\rb\n\n"],
])
def test_sse_parser_gives_the_same_events_whatever_the_reads(reads):
    whole = SseDataParser()
    by_read = [event for read in reads for event in whole.feed(read)] + whole.close()
    single = SseDataParser()
    stream = b"".join(reads)
    by_byte = [event for i in range(len(stream)) for event in single.feed(stream[i:i + 1])] + single.close()
    assert by_read == by_byte and by_read


def test_sse_parser_rejects_endless_line():
    parser = SseDataParser()
    with pytest.raises(SseTooLong):
        parser.feed(b"data: " + b"x" * (2 * 1024 * 1024))


def test_retry_after_parsing_and_policy():
    assert parse_retry_after("2") == 2.0
    assert parse_retry_after("junk") is None
    assert parse_retry_after(None) is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412480.0) == 10.0
    policy = RetryPolicy(retries=2, base_seconds=1.0, max_retry_after=10)
    assert policy.delay(2, None) is None  # out of retries
    assert policy.delay(0, 60) is None  # the provider asks for longer than we wait
    assert 3 <= policy.delay(0, 3) <= 4
    for attempt in range(2):
        assert 2**attempt / 2 <= policy.delay(attempt, None) <= 2**attempt


async def test_a_key_with_a_line_break_is_refused_before_any_io(tmp_path):
    async with open_fake_provider() as provider:
        settings = agent_settings(provider.url, tmp_path)
        async with open_agent_service(settings, default_provider_url=provider.url) as service:
            bad = Credentials(api_key="sk-abc\r\nX-Injected: 1", api_url="", user_id="u")
            with pytest.raises(AgentError) as caught:
                async with service.open_stream("atlas-assistant", "hi", {}, bad):
                    pass
    assert caught.value.code == "no_credentials" and "\n" not in caught.value.message
    assert provider.requests == []


@pytest.mark.parametrize("transport", ["atlas", "httpx"])
async def test_both_provider_transports_stream_and_fail_alike(tmp_path, transport):
    async with open_fake_provider() as provider:
        settings = agent_settings(provider.url, tmp_path, provider_transport=transport, provider_retries=0)
        creds = Credentials(api_key=TEST_KEY, api_url="", user_id="u")
        async with open_agent_service(settings, default_provider_url=provider.url) as service:
            async with service.open_stream("atlas-assistant", "hi", {}, creds) as events:
                got = [event async for event in events]
            provider.script(Status(429, retry_after="3"), Cut(after=1))
            codes = []
            for _ in range(2):
                try:
                    async with service.open_stream("atlas-assistant", "hi", {}, creds) as events:
                        async for _ in events:
                            pass
                except AgentError as exc:
                    codes.append((exc.code, exc.retry_after))
    assert [e.text for e in got if isinstance(e, TextDelta)] == ["Hello", ", ", "world"]
    assert got[-1] == Finish("stop", Usage(11, 3, 14))
    assert codes == [("provider_rate_limited", 3.0), ("provider_error", None)]
    assert provider.requests[0].api_key == TEST_KEY


@pytest.mark.parametrize("transport", ["atlas", "httpx"])
async def test_provider_calls_follow_the_outbound_proxy_policy(tmp_path, transport, monkeypatch):
    """Both transports send provider calls through the proxy the environment names (loopback is
    not exempt unless NO_PROXY says so), and ATLAS_PROVIDER_PROXY overrides it."""
    dead = f"http://127.0.0.1:{free_port()}"  # a proxy that refuses connections
    creds = Credentials(api_key=TEST_KEY, api_url="", user_id="u")
    for env, proxy_setting in (({"HTTP_PROXY": dead}, None), ({}, dead)):
        for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
            monkeypatch.delenv(name, raising=False)
            monkeypatch.delenv(name.lower(), raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        async with open_fake_provider() as provider:
            settings = agent_settings(
                provider.url, tmp_path, provider_transport=transport, provider_retries=0,
                provider_proxy=proxy_setting,
            )
            async with open_agent_service(settings, default_provider_url=provider.url) as service:
                with pytest.raises(AgentError) as caught:
                    async with service.open_stream("atlas-assistant", "hi", {}, creds) as events:
                        async for _ in events:
                            pass
            assert caught.value.code == "provider_unreachable", (env, proxy_setting)
            assert provider.requests == []  # it went to the proxy, not straight to the provider
