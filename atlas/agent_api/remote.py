"""A remote agent (``atlas agent`` or any VoltAgent-compatible server) behind the relay's interface.

``RemoteAgent.open_stream`` posts to ``{base}/agents/{id}/stream`` with the user's credentials in
the ``X-Provider-*`` headers (and ``X-Atlas-Agent-Secret`` when configured), and turns the SSE
events back into the same ``TextDelta``/``Finish`` events and ``AgentError``s that the in-process
agent gives, so the relay cannot tell the two apart.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import quote

import httpx
import msgspec

from atlas.llm.types import AgentError, ChatMessage, Credentials, Finish, StreamEvent, TextDelta, Usage

log = logging.getLogger("atlas.agent_api.remote")


class _TotalUsage(msgspec.Struct, rename="camel"):
    input_tokens: int = 0
    output_tokens: int = 0
    total_tokens: int = 0


class _ErrorBody(msgspec.Struct):
    code: str = "provider_error"
    message: str = "the agent reported an error"


class _Event(msgspec.Struct, rename="camel"):
    """One ``/stream`` SSE event; only the fields the relay needs."""

    type: str
    text: str | None = None
    delta: str | None = None
    finish_reason: str | None = None
    total_usage: _TotalUsage | None = None
    error: _ErrorBody | str | None = None


class _Envelope(msgspec.Struct):
    success: bool = False
    error: str | Any = None
    code: str | None = None


_event_decoder = msgspec.json.Decoder(_Event)
_envelope_decoder = msgspec.json.Decoder(_Envelope)
_encoder = msgspec.json.Encoder()


class RemoteAgent:
    def __init__(self, client: httpx.AsyncClient, base_url: str, secret: str | None) -> None:
        self._client = client
        self._base_url = base_url.rstrip("/")
        self._secret = secret

    def _headers(self, credentials: Credentials) -> dict[str, str]:
        headers = {
            "Content-Type": "application/json",
            "Accept": "text/event-stream",
            "X-Provider-API-Key": credentials.api_key,
            "X-Provider-API-URL": credentials.api_url,
            "X-User-ID": credentials.user_id,
        }
        if self._secret:
            headers["X-Atlas-Agent-Secret"] = self._secret
        return headers

    @asynccontextmanager
    async def open_stream(
        self, agent_id: str, input: str | list[ChatMessage], options: dict[str, Any],
        credentials: Credentials,
    ) -> AsyncIterator[AsyncIterator[StreamEvent]]:
        body = _encoder.encode({"input": input, "options": options})
        url = f"{self._base_url}/agents/{quote(agent_id, safe='')}/stream"
        try:
            async with self._client.stream(
                "POST", url, content=body, headers=self._headers(credentials)
            ) as response:
                if response.status_code != 200:
                    raise _envelope_error(response.status_code, await response.aread())
                yield _events(response)
        except httpx.TimeoutException:
            raise AgentError("provider_timeout", "the agent did not answer in time", 504) from None
        except httpx.HTTPError as exc:
            log.warning("remote agent unreachable: %s", type(exc).__name__)
            raise AgentError("agent_unavailable", "the agent service cannot be reached", 502) from None


async def _events(response: httpx.Response) -> AsyncIterator[StreamEvent]:
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if not data or data == "[DONE]":
            continue
        try:
            event = _event_decoder.decode(data)
        except msgspec.DecodeError:
            raise AgentError("provider_error", "the agent sent an unreadable event", 502) from None
        if event.type == "text-delta":
            text = event.text if event.text is not None else event.delta
            if text:
                yield TextDelta(text)
        elif event.type == "finish":
            usage = event.total_usage or _TotalUsage()
            yield Finish(
                event.finish_reason or "unknown",
                Usage(usage.input_tokens, usage.output_tokens, usage.total_tokens),
            )
        elif event.type == "error":
            error = event.error
            if isinstance(error, _ErrorBody):
                raise AgentError(error.code, error.message, 502)
            raise AgentError("provider_error", str(error or "the agent reported an error"), 502)


def _envelope_error(status: int, body: bytes) -> AgentError:
    try:
        envelope = _envelope_decoder.decode(body)
        message = envelope.error if isinstance(envelope.error, str) else "the agent refused the request"
        return AgentError(envelope.code or "provider_error", message, status)
    except msgspec.DecodeError:
        return AgentError("agent_unavailable", f"the agent answered {status}", 502)
