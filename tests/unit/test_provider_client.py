"""The provider client's error and retry mapping (atlas/llm/provider.py), on httpx.MockTransport.

Each test scripts the provider's answers, one per request: a status, a streamed body, or an
httpx exception. The retries' sleeps run on the autojump clock, so their lengths are measured
in trio time and cost nothing; a test that would hang fails at once instead (``@bounded``)."""

from __future__ import annotations

import email.utils
import json
import time
from collections.abc import Iterable

import httpx
import pytest
import trio

from atlas import __version__
from atlas.llm.provider import DRAIN_SECONDS, ProviderClient, RetryPolicy
from atlas.llm.sse import MAX_SSE_EVENT, SseDataParser, SseTooLong
from atlas.llm.types import AgentError, Finish, TextDelta, Usage

from .deadline import bounded

URL = "https://provider.example/v1"
KEY = "sk-test-unit-0123456789"
BODY = b'{"model": "m", "stream": true}'
BASE = 0.25  # RetryPolicy.base_seconds: the jitter added to a Retry-After


class Body(httpx.AsyncByteStream):
    """A response body: ``parts`` are bytes to send, exceptions to raise, or ``STALL``. An
    iterator rather than an async generator, as the provider transport's own body is."""

    STALL = object()

    def __init__(self, parts: Iterable[object] = ()) -> None:
        self.parts = list(parts)
        self.sent = 0
        self.closed = False

    def __aiter__(self) -> Body:
        return self

    async def __anext__(self) -> bytes:
        await trio.lowlevel.checkpoint()
        if not self.parts:
            raise StopAsyncIteration
        part = self.parts.pop(0)
        if part is Body.STALL:
            await trio.sleep_forever()
        if isinstance(part, BaseException):
            raise part
        self.sent += 1
        return part  # type: ignore[return-value]

    async def aclose(self) -> None:
        self.closed = True


class Provider:
    """The handler of an httpx.MockTransport: each request gets the next scripted answer."""

    def __init__(self, *answers: httpx.Response | Exception) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []
        self.times: list[float] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        self.times.append(trio.current_time())
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    def gaps(self) -> list[float]:
        return [later - earlier for earlier, later in zip(self.times, self.times[1:])]


def sse(*events: object) -> Body:
    """An SSE body: each event a JSON object (or a raw string), one ``data:`` line each."""
    lines = [f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n".encode() for e in events]
    return Body(lines)


def delta(text: str) -> dict:
    return {"choices": [{"delta": {"content": text}, "finish_reason": None}]}


def finish(reason: str = "stop") -> dict:
    return {"choices": [{"delta": {}, "finish_reason": reason}]}


USAGE = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}


def ok(*events: object) -> httpx.Response:
    return httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=sse(*events))


def status(code: int, *, retry_after: str | None = None, body: bytes = b"") -> httpx.Response:
    headers = {"retry-after": retry_after} if retry_after is not None else {}
    return httpx.Response(code, headers=headers, stream=Body([body]))


def client_for(provider: Provider, **policy: float) -> ProviderClient:
    return ProviderClient(httpx.MockTransport(provider), RetryPolicy(**policy), timeout=30.0)


async def complete(provider: Provider, **policy: float) -> list[object]:
    async with client_for(provider, **policy).open_completion(URL, KEY, BODY) as events:
        return [event async for event in events]


async def failure(provider: Provider, **policy: float) -> AgentError:
    with pytest.raises(AgentError) as caught:
        await complete(provider, **policy)
    return caught.value


@bounded
async def test_a_streamed_reply_and_the_request_that_asked_for_it(autojump_clock):
    provider = Provider(ok(delta("Hel"), delta("lo"), finish(), USAGE, "[DONE]"))
    assert await complete(provider) == [TextDelta("Hel"), TextDelta("lo"), Finish("stop", Usage(3, 2, 5))]
    (request,) = provider.requests
    assert (request.method, str(request.url)) == ("POST", f"{URL}/chat/completions")
    assert request.content == BODY
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert request.headers["accept"] == "text/event-stream"
    assert request.headers["content-type"] == "application/json"
    assert request.headers["user-agent"] == f"atlas/{__version__}"
    assert request.extensions["timeout"] == {"connect": 30.0, "read": 30.0, "write": 30.0, "pool": 30.0}


@pytest.mark.parametrize(("code", "expected"), [
    (401, ("provider_auth", 401, "the provider rejected the API key (HTTP 401)")),
    (403, ("provider_auth", 401, "the provider rejected the API key (HTTP 403)")),
    (400, ("provider_error", 502, "the provider failed (HTTP 400)")),
    (404, ("provider_error", 502, "the provider failed (HTTP 404)")),
    (302, ("provider_error", 502, "the provider answered with a redirect (HTTP 302), not followed")),
])
@bounded
async def test_client_errors_are_mapped_and_never_retried(autojump_clock, code, expected):
    answer = status(code, body=b'{"error": "bad key sk-test-unit-0123456789"}')
    provider = Provider(answer)
    error = await failure(provider, retries=3)
    assert (error.code, error.status, error.message) == expected
    assert error.retry_after is None
    assert len(provider.requests) == 1 and trio.current_time() == 0
    assert answer.stream.closed  # the failed response is closed, its connection not leaked
    assert KEY not in repr(error) and "bad key" not in error.message  # the body is never echoed


@pytest.mark.parametrize("code", [500, 502, 503, 504, 529])
@bounded
async def test_server_errors_are_retried_then_mapped(autojump_clock, code):
    answers = [status(code) for _ in range(3)]
    provider = Provider(*answers)
    error = await failure(provider, retries=2)
    assert (error.code, error.status, error.message) == ("provider_error", 502, f"the provider failed (HTTP {code})")
    assert len(provider.requests) == 3
    assert all(answer.stream.closed for answer in answers)


@bounded
async def test_a_retry_that_succeeds_is_invisible(autojump_clock):
    provider = Provider(status(503), httpx.ConnectError("refused"), status(429), ok(delta("hi"), finish()))
    assert await complete(provider, retries=3) == [TextDelta("hi"), Finish("stop", Usage())]
    assert len(provider.requests) == 4
    assert len({id(request) for request in provider.requests}) == 1  # the same request, resent


@pytest.mark.parametrize("retries", [0, 1, 4])
@bounded
async def test_the_number_of_retries_is_bounded(autojump_clock, retries):
    provider = Provider(*[status(500) for _ in range(retries + 2)])
    await failure(provider, retries=retries)
    assert len(provider.requests) == retries + 1
    assert len(provider.answers) == 1  # never asked again
    assert trio.current_time() == provider.times[-1]  # and no wait after the last attempt


@bounded
async def test_backoff_grows_with_jitter_up_to_its_cap(autojump_clock):
    provider = Provider(*[status(502) for _ in range(6)])
    await failure(provider, retries=5, base_seconds=1.0, max_seconds=3.0)
    # Before retry n: a random point in the upper half of min(cap, base * 2**n).
    ceilings = [1.0, 2.0, 3.0, 3.0, 3.0]
    gaps = provider.gaps()
    assert len(gaps) == 5
    for gap, ceiling in zip(gaps, ceilings):
        assert ceiling / 2 <= gap <= ceiling, (gaps, ceilings)


@bounded
async def test_rate_limit_honours_retry_after(autojump_clock):
    provider = Provider(*[status(429, retry_after="3") for _ in range(3)])
    error = await failure(provider, retries=2)
    assert (error.code, error.status, error.message) == (
        "provider_rate_limited", 429, "the provider is rate limiting this key"
    )
    assert error.retry_after == 3.0  # passed on to the client
    gaps = provider.gaps()
    assert len(gaps) == 2 and all(3 <= gap <= 3 + BASE for gap in gaps), gaps


@bounded
async def test_rate_limit_with_an_http_date(autojump_clock):
    when = email.utils.formatdate(time.time() + 5, usegmt=True)  # whole seconds: 4 to 5 s away
    provider = Provider(status(429, retry_after=when), ok(finish()))
    await complete(provider, retries=1)
    (gap,) = provider.gaps()
    assert 4 - 0.5 <= gap <= 5 + BASE, gap


@bounded
async def test_a_retry_after_longer_than_the_cap_is_passed_on_at_once(autojump_clock):
    provider = Provider(status(429, retry_after="3600"), ok(finish()))
    error = await failure(provider, retries=2, max_retry_after=10.0)
    assert (error.code, error.retry_after) == ("provider_rate_limited", 3600.0)
    assert len(provider.requests) == 1 and trio.current_time() == 0


@bounded
async def test_rate_limit_without_retry_after_backs_off(autojump_clock):
    provider = Provider(status(429), status(429, retry_after="soon"))
    error = await failure(provider, retries=1, base_seconds=1.0)
    assert error.retry_after is None  # an unreadable Retry-After is no Retry-After
    (gap,) = provider.gaps()
    assert 0.5 <= gap <= 1.0


@bounded
async def test_connect_errors_are_retried_then_unreachable(autojump_clock):
    provider = Provider(*[httpx.ConnectError("connection refused") for _ in range(3)])
    error = await failure(provider, retries=2)
    assert (error.code, error.status, error.message) == (
        "provider_unreachable", 502, "the provider could not be reached"
    )
    assert len(provider.requests) == 3


@pytest.mark.parametrize("exception", [
    httpx.ConnectTimeout("connect"), httpx.ReadTimeout("read"), httpx.WriteTimeout("write"),
    httpx.PoolTimeout("pool"),
])
@bounded
async def test_timeouts_before_the_reply_are_provider_timeout_and_not_retried(autojump_clock, exception):
    provider = Provider(exception, ok(finish()))
    error = await failure(provider, retries=2)
    assert (error.code, error.status, error.message) == (
        "provider_timeout", 504, "the provider did not answer in time"
    )
    assert len(provider.requests) == 1


@bounded
async def test_other_transport_errors_before_the_reply_are_unreachable_and_not_retried(autojump_clock):
    provider = Provider(httpx.RemoteProtocolError("garbage"), ok(finish()))
    error = await failure(provider, retries=2)
    assert (error.code, error.status) == ("provider_unreachable", 502)
    assert len(provider.requests) == 1


@pytest.mark.parametrize(("broken", "expected"), [
    (httpx.ReadError("reset"), ("provider_error", 502, "the connection to the provider broke mid-reply")),
    (httpx.RemoteProtocolError("bad chunk"), ("provider_error", 502, "the connection to the provider broke mid-reply")),
    (httpx.ReadTimeout("read"), ("provider_timeout", 504, "the provider did not answer in time")),
])
@bounded
async def test_a_reply_cut_after_its_first_token_is_not_retried(autojump_clock, broken, expected):
    body = Body([b'data: {"choices": [{"delta": {"content": "Hel"}}]}\n\n', broken])
    provider = Provider(httpx.Response(200, stream=body), ok(delta("never"), finish()))
    got = []
    with pytest.raises(AgentError) as caught:
        async with client_for(provider, retries=3).open_completion(URL, KEY, BODY) as events:
            async for event in events:
                got.append(event)
    assert got == [TextDelta("Hel")]
    assert (caught.value.code, caught.value.status, caught.value.message) == expected
    assert len(provider.requests) == 1
    assert body.closed


@bounded
async def test_a_200_that_fails_before_any_token_is_not_retried_either(autojump_clock):
    provider = Provider(httpx.Response(200, stream=Body([httpx.ReadError("reset")])), ok(finish()))
    error = await failure(provider, retries=3)
    assert (error.code, error.message) == ("provider_error", "the connection to the provider broke mid-reply")
    assert len(provider.requests) == 1


@pytest.mark.parametrize(("events", "message"), [
    (["not json"], "the provider sent a malformed stream chunk"),
    (['{"choices": "nope"}'], "the provider sent a malformed stream chunk"),
    (['{"choices": [{"delta": {"content": 5}}]}'], "the provider sent a malformed stream chunk"),
    ([delta("partial")], "the provider's stream ended before the reply was complete"),
    ([], "the provider's stream ended before the reply was complete"),
])
@bounded
async def test_malformed_streams_are_provider_error(autojump_clock, events, message):
    provider = Provider(ok(*events), ok(finish()))
    error = await failure(provider, retries=3)
    assert (error.code, error.status, error.message) == ("provider_error", 502, message)
    assert len(provider.requests) == 1


@bounded
async def test_an_endless_stream_line_is_provider_error(autojump_clock):
    line = b"data: " + b"x" * (MAX_SSE_EVENT + 1)
    provider = Provider(httpx.Response(200, stream=Body([line[:MAX_SSE_EVENT // 2], line[MAX_SSE_EVENT // 2:]])))
    error = await failure(provider)
    assert (error.code, error.message) == ("provider_error", "the provider sent an over-long stream event")


def test_an_event_on_many_short_lines_is_bounded_as_a_whole():
    line = b"data: " + b" " * 60_000 + b"\n"
    parser = SseDataParser()
    fed = 0
    with pytest.raises(SseTooLong, match="event is longer than"):
        while fed <= MAX_SSE_EVENT:
            assert parser.feed(line) == []
            fed += len(line)
    # A blank line ends an event: many events that are each under the bound are fine.
    parser = SseDataParser()
    for _ in range(2 * MAX_SSE_EVENT // len(line)):
        assert parser.feed(line + b"\n") == [b" " * 60_000]


@pytest.mark.parametrize(("events", "expected"), [
    ([delta("a"), finish("length")], Finish("length", Usage())),  # EOF without [DONE] is fine
    ([delta("a"), finish("content_filter"), "[DONE]"], Finish("content-filter", Usage())),
    ([delta("a"), finish("tool_calls"), "[DONE]"], Finish("tool-calls", Usage())),
    ([delta("a"), finish("something_new"), "[DONE]"], Finish("other", Usage())),
    ([delta("a"), {"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 1}}],
     Finish("unknown", Usage(4, 1, 5))),  # no finish reason; the total is worked out
])
@bounded
async def test_how_a_reply_finished(autojump_clock, events, expected):
    assert await complete(Provider(ok(*events))) == [TextDelta("a"), expected]


@bounded
async def test_after_done_the_body_is_drained_for_the_pool(autojump_clock):
    body = Body([b"data: " + json.dumps(finish()).encode() + b"\n\ndata: [DONE]\n\n", b": trailing\n\n", b""])
    provider = Provider(httpx.Response(200, stream=body))
    assert await complete(provider) == [Finish("stop", Usage())]
    assert body.sent == 3  # read to its end, so the connection can be reused


@bounded
async def test_a_body_that_stalls_after_done_is_dropped_after_the_drain_time(autojump_clock):
    body = Body([b"data: " + json.dumps(finish()).encode() + b"\n\ndata: [DONE]\n\n", Body.STALL])
    provider = Provider(httpx.Response(200, stream=body))
    assert await complete(provider) == [Finish("stop", Usage())]
    assert trio.current_time() == pytest.approx(DRAIN_SECONDS)
    assert body.closed


@bounded
async def test_leaving_early_closes_the_response(autojump_clock):
    body = Body([b'data: {"choices": [{"delta": {"content": "a"}}]}\n\n', Body.STALL])
    provider = Provider(httpx.Response(200, stream=body))
    async with client_for(provider).open_completion(URL, KEY, BODY) as events:
        async for event in events:
            assert event == TextDelta("a")
            break
    assert body.closed


@pytest.mark.parametrize("error", [{"message": "overloaded", "code": 529}, "overloaded"])
@bounded
async def test_an_error_reported_mid_reply_is_named_as_such(autojump_clock, error):
    provider = Provider(ok(delta("a"), {"error": error}))
    failed = await failure(provider)
    assert (failed.code, failed.message) == ("provider_error", "the provider reported an error mid-reply")
