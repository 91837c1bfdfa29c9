"""Calling an OpenAI-compatible provider: one streaming ``POST {url}/chat/completions``.

Every failure leaves this module as an ``AgentError`` (``atlas.llm.types``), mapped in one
place for status codes (``status_error``) and one for httpx exceptions (``transport_error``):

    AgentError
    ├── provider_auth          401  provider said 401/403
    ├── provider_rate_limited  429  provider said 429 (retry_after from its Retry-After)
    ├── provider_error         502  provider 5xx, other unexpected status, malformed or cut stream
    ├── provider_unreachable   502  connection failed
    └── provider_timeout       504  no byte for ``settings.provider_timeout`` seconds

Before the first byte of a 200 response, 429/5xx/connect failures are retried with exponential
backoff and jitter, honouring Retry-After up to a cap. Once the provider has said 200, nothing is
retried. Error messages are our own words: a provider's error body is never echoed, so a key it
might quote back never reaches a client or a log line.
"""

from __future__ import annotations

import email.utils
import logging
import random
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import msgspec
import trio

from atlas import __version__
from atlas.backoff import backoff_delay
from atlas.config import DEFAULT_PROVIDER_MAX_CONNECTIONS
from atlas.llm.sse import SseDataParser, SseTooLong
from atlas.llm.transport import ProviderTransport, proxy_for
from atlas.llm.types import AgentError, Finish, StreamEvent, TextDelta, Usage

log = logging.getLogger("atlas.llm.provider")

USER_AGENT = f"atlas/{__version__}"
MAX_CACHED_URLS = 1024
DRAIN_SECONDS = 1.0  # how long to wait for the body's end after [DONE] before dropping the connection


class _Delta(msgspec.Struct):
    content: str | None = None


class _Choice(msgspec.Struct):
    delta: _Delta | None = None
    finish_reason: str | None = None


class _Usage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int | None = None


class _Chunk(msgspec.Struct):
    choices: list[_Choice] | None = None
    usage: _Usage | None = None
    error: Any = None  # a provider's error object mid-reply (any shape: only its presence counts)


_chunk_decoder = msgspec.json.Decoder(_Chunk)

FINISH_REASONS = {
    "stop": "stop",
    "length": "length",
    "content_filter": "content-filter",
    "tool_calls": "tool-calls",
    "function_call": "tool-calls",
}


def provider_error(message: str) -> AgentError:
    return AgentError("provider_error", message, 502)


def status_error(status: int, retry_after: float | None) -> AgentError:
    if status in (401, 403):
        return AgentError("provider_auth", f"the provider rejected the API key (HTTP {status})", 401)
    if status == 429:
        return AgentError(
            "provider_rate_limited", "the provider is rate limiting this key", 429,
            retry_after=retry_after,
        )
    if 300 <= status < 400:
        return provider_error(f"the provider answered with a redirect (HTTP {status}), not followed")
    return provider_error(f"the provider failed (HTTP {status})")


def transport_error(exc: httpx.TransportError, *, streaming: bool) -> AgentError:
    if isinstance(exc, httpx.TimeoutException):
        return AgentError("provider_timeout", "the provider did not answer in time", 504)
    if streaming:
        return provider_error("the connection to the provider broke mid-reply")
    return AgentError("provider_unreachable", "the provider could not be reached", 502)


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds from a Retry-After header: a number of seconds or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


@dataclass(frozen=True)
class RetryPolicy:
    retries: int = 2
    base_seconds: float = 0.25
    max_seconds: float = 8.0  # the backoff never grows past this
    max_retry_after: float = 10.0  # a longer Retry-After is passed to the client instead

    def delay(self, attempt: int, retry_after: float | None) -> float | None:
        """Seconds to wait before retry ``attempt`` (0-based), or None to give up now."""
        if attempt >= self.retries:
            return None
        if retry_after is not None:
            if retry_after > self.max_retry_after:
                return None
            return retry_after + random.uniform(0, self.base_seconds)
        return backoff_delay(attempt, first=self.base_seconds, factor=2.0, cap=self.max_seconds)


def open_provider_transport(
    kind: str = "atlas", *, proxy: str | None = None, max_connections: int = DEFAULT_PROVIDER_MAX_CONNECTIONS,
) -> httpx.AsyncBaseTransport:
    """The process's one connection pool for provider calls (use it as an async context manager).

    ``atlas`` is Atlas's own HTTP/1.1 transport on h11 (``atlas.llm.transport``, measured cheaper
    per delta), ``httpx`` is httpx's default one (httpcore). Either way the calls go straight to
    the transport rather than through an ``AsyncClient``, whose layers (redirects, auth flows,
    cookies, event hooks, content decoding) provider calls never use. Both follow the outbound
    policy of every Atlas client: the standard proxy variables as httpx reads them, and ``proxy``
    (``ATLAS_PROVIDER_PROXY``) over them, and both keep at most ``max_connections`` open,
    every one of which may stay idle for the next request."""
    if kind == "httpx":
        return HttpxTransportWithProxies(proxy, max_connections)
    return ProviderTransport(proxy=proxy, max_connections=max_connections)


class HttpxTransportWithProxies(httpx.AsyncBaseTransport):
    """httpx's own transport, with the proxy picked per request as ``proxy_for`` says (httpx's
    ``AsyncClient`` does the same with its mounts; a bare transport has none)."""

    def __init__(self, override: str | None, max_connections: int = DEFAULT_PROVIDER_MAX_CONNECTIONS) -> None:
        self._override = override
        self._limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self._by_proxy: dict[str, httpx.AsyncHTTPTransport] = {}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        proxy = proxy_for(request.url, override=self._override)
        key = "" if proxy is None else str(proxy)
        transport = self._by_proxy.get(key)
        if transport is None:
            transport = self._by_proxy[key] = httpx.AsyncHTTPTransport(
                limits=self._limits,
                proxy=None if proxy is None else httpx.Proxy(proxy),
            )
        return await transport.handle_async_request(request)

    async def aclose(self) -> None:
        transports, self._by_proxy = list(self._by_proxy.values()), {}
        for transport in transports:
            await transport.aclose()


class ProviderClient:
    def __init__(
        self, transport: httpx.AsyncBaseTransport, policy: RetryPolicy, *, timeout: float
    ) -> None:
        self._transport = transport
        self._policy = policy
        # Passed per request, as httpx.AsyncClient would: pool, connect, read and write timeouts.
        self._timeout = httpx.Timeout(timeout).as_dict()
        # Parsed completion URLs by provider URL: parsing one (httpx.URL, its host as an IP
        # address) was two thirds of building the request, ~20 us of every request's CPU.
        self._completion_urls: dict[str, httpx.URL] = {}

    def completion_url(self, url: str) -> httpx.URL:
        parsed = self._completion_urls.get(url)
        if parsed is None:
            if len(self._completion_urls) >= MAX_CACHED_URLS:  # user-given URLs: bounded
                self._completion_urls.clear()
            parsed = self._completion_urls[url] = httpx.URL(f"{url}/chat/completions")
        return parsed

    @asynccontextmanager
    async def open_response(
        self, method: str, url: str, api_key: str, body: bytes | None = None, *, stream: bool = False
    ) -> AsyncIterator[httpx.Response]:
        """One request as given, without retries (an OpenAI-compatible client retries on its
        own), for the OpenAI-compatible endpoint: the response of any status, its body unread
        (``response.stream`` yields raw bytes). Failing to connect or to get an answer in time
        raises ``AgentError``; leaving the block closes the response (and an unfinished
        connection with it)."""
        headers = {
            "Authorization": f"Bearer {api_key}",
            "Accept": "text/event-stream" if stream else "application/json",
            "User-Agent": USER_AGENT,
        }
        if body is not None:
            headers["Content-Type"] = "application/json"
        request = httpx.Request(
            method, url, content=body, headers=headers, extensions={"timeout": self._timeout}
        )
        try:
            response = await self._transport.handle_async_request(request)
        except httpx.TransportError as exc:
            raise transport_error(exc, streaming=False) from exc
        try:
            yield response
        finally:
            await response.aclose()

    @asynccontextmanager
    async def open_completion(
        self, url: str, api_key: str, body: bytes
    ) -> AsyncIterator[AsyncIterator[StreamEvent]]:
        """Send the request (retrying as the policy allows) and yield the reply's events. Leaving
        the block closes the provider response, and with it the connection if unfinished."""
        request = httpx.Request(
            "POST",
            self.completion_url(url),
            content=body,
            headers={
                "Authorization": f"Bearer {api_key}",
                "Content-Type": "application/json",
                "Accept": "text/event-stream",
                "User-Agent": USER_AGENT,
            },
            extensions={"timeout": self._timeout},
        )
        response = await self._send(request)
        events = _events(response)
        try:
            yield events
        finally:
            await events.aclose()
            await response.aclose()

    async def _send(self, request: httpx.Request) -> httpx.Response:
        for attempt in range(self._policy.retries + 1):
            try:
                response = await self._transport.handle_async_request(request)
            except httpx.ConnectError as exc:
                error = transport_error(exc, streaming=False)
            except httpx.TransportError as exc:
                raise transport_error(exc, streaming=False) from exc
            else:
                if response.status_code == 200:
                    return response
                await response.aclose()
                retry_after = parse_retry_after(response.headers.get("retry-after"))
                error = status_error(response.status_code, retry_after)
                if response.status_code != 429 and response.status_code < 500:
                    raise error
            delay = self._policy.delay(attempt, error.retry_after)
            if delay is None:
                break
            log.info("provider %s: %s, retry %d in %.2fs", request.url.host, error.code,
                     attempt + 1, delay)
            await trio.sleep(delay)
        log.info("provider %s: %s, giving up", request.url.host, error.code)
        raise error


class _Reply:
    """What the stream has said so far besides text: the finish reason and the usage."""

    def __init__(self) -> None:
        self.finish_reason: str | None = None
        self.usage: Usage | None = None

    def apply(self, data: bytes) -> list[TextDelta]:
        try:
            chunk = _chunk_decoder.decode(data)
        except msgspec.DecodeError:
            raise provider_error("the provider sent a malformed stream chunk") from None
        if chunk.error is not None:
            raise provider_error("the provider reported an error mid-reply")
        deltas: list[TextDelta] = []
        for choice in chunk.choices or ():
            if choice.delta is not None and choice.delta.content:
                deltas.append(TextDelta(choice.delta.content))
            if choice.finish_reason:
                self.finish_reason = choice.finish_reason
        if (u := chunk.usage) is not None:
            total = u.prompt_tokens + u.completion_tokens if u.total_tokens is None else u.total_tokens
            self.usage = Usage(u.prompt_tokens, u.completion_tokens, total)
        return deltas

    def finish(self) -> Finish:
        reason = self.finish_reason
        return Finish(FINISH_REASONS.get(reason, "other") if reason else "unknown",
                      self.usage or Usage())


async def _events(response: httpx.Response) -> AsyncIterator[StreamEvent]:
    parser = SseDataParser()
    reply = _Reply()
    chunks = response.stream.__aiter__()  # raw bytes: no content encoding was asked for
    done = False
    try:
        async for raw in chunks:
            for data in parser.feed(raw):
                if data == b"[DONE]":
                    done = True
                    break
                for delta in reply.apply(data):
                    yield delta
            if done:
                break
        else:  # EOF without [DONE]: fine if the provider said how the reply finished
            for data in parser.close():
                if data != b"[DONE]":
                    for delta in reply.apply(data):
                        yield delta
            if reply.finish_reason is None and reply.usage is None:
                raise provider_error("the provider's stream ended before the reply was complete")
    except httpx.TransportError as exc:
        raise transport_error(exc, streaming=True) from exc
    except SseTooLong:
        raise provider_error("the provider sent an over-long stream event") from None
    yield reply.finish()
    if done:  # read to the end of the body so the connection can go back to the pool
        with trio.move_on_after(DRAIN_SECONDS):
            try:
                async for _ in chunks:
                    pass
            except httpx.TransportError:
                pass
