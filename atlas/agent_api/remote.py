"""A remote agent (``atlas agent`` or any VoltAgent-compatible server) behind the relay's interface.

``RemoteAgent.open_stream`` posts to ``{base}/agents/{id}/stream`` with the user's credentials in
the ``X-Provider-*`` headers (and ``X-Atlas-Agent-Secret`` when configured), and turns the SSE
events back into the same ``TextDelta``/``Finish`` events and ``AgentError``s that the in-process
agent gives, so the relay cannot tell the two apart: a stream that ends without ``finish``, or a
200 that is not an event stream, is a ``provider_error`` as it is in-process.

A 401 from the agent is never the user's doing (the gateway verified the user's token; the agent
never sees it) unless it says ``provider_auth``: it means the gateway and the agent do not share
``ATLAS_AGENT_SECRET``. That is ``agent_secret_mismatch`` (502), logged for the operator.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import quote

import httpx
import msgspec

from atlas.llm.sse import SseDataParser, SseTooLong
from atlas.llm.types import (
    AgentBudget,
    AgentError,
    ChatMessage,
    Credentials,
    Finish,
    StreamEvent,
    TextDelta,
    Usage,
)

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


class _AgentInfo(msgspec.Struct):
    id: str
    budget: AgentBudget | None = None  # Atlas's agents say it; other VoltAgent servers may not


class _AgentList(msgspec.Struct):
    data: list[_AgentInfo] = msgspec.field(default_factory=list)


_agents_decoder = msgspec.json.Decoder(_AgentList)


# A VoltAgent server that does not say how much its agent adds to a prompt: assume this much.
UNKNOWN_INSTRUCTIONS_BYTES = 8192
BUDGET_CACHE_SECONDS = 60.0

_event_decoder = msgspec.json.Decoder(_Event)
_envelope_decoder = msgspec.json.Decoder(_Envelope)
_encoder = msgspec.json.Encoder()


SECRET_MISMATCH_MESSAGE = "the gateway cannot use its agent (their ATLAS_AGENT_SECRET differs); tell the operator"


def secret_mismatch(base_url: str) -> AgentError:
    """The agent refused the gateway's secret: an operator's mistake, said in both logs."""
    log.error(
        "the remote agent at %s refused this gateway's X-Atlas-Agent-Secret: set the same "
        "ATLAS_AGENT_SECRET on both processes", base_url,
    )
    return AgentError("agent_secret_mismatch", SECRET_MISMATCH_MESSAGE, 502)


class RemoteAgent:
    def __init__(self, client: httpx.AsyncClient, base_url: str, secret: str | None) -> None:
        self._client = client
        self._base_url = base_url.rstrip("/")
        self._secret = secret
        self._default_agent: str | None = None
        self._budgets: dict[str, tuple[float, AgentBudget]] = {}
        self._warned_unknown_budget = False

    async def default_agent_id(self) -> str:
        """The first agent the remote agent lists (asked once, then remembered)."""
        if self._default_agent is None:
            agents = await self._list_agents()
            if not agents:
                raise AgentError("unknown_agent", "the agent service has no agents", 404)
            self._default_agent = agents[0].id
        return self._default_agent

    async def budget(self, agent_id: str) -> AgentBudget:
        """The agent's prompt overhead and output cap, for admission, from the agent list
        (``GET /agents``, one request for every agent, kept a minute)."""
        cached = self._budgets.get(agent_id)
        if cached is None or cached[0] <= time.monotonic():
            await self._list_agents()
            cached = self._budgets.get(agent_id)
        if cached is None:  # not listed: the request itself will meet the agent's own answer
            return AgentBudget(UNKNOWN_INSTRUCTIONS_BYTES, None)
        return cached[1]

    async def _list_agents(self) -> list[_AgentInfo]:
        headers = {"X-Atlas-Agent-Secret": self._secret} if self._secret else {}
        try:
            response = await self._client.get(f"{self._base_url}/agents", headers=headers)
        except httpx.HTTPError as exc:
            log.warning("remote agent unreachable: %s", type(exc).__name__)
            raise AgentError("agent_unavailable", "the agent service cannot be reached", 502) from None
        if response.status_code != 200:
            raise _envelope_error(response.status_code, response.content, self._base_url)
        try:
            agents = _agents_decoder.decode(response.content).data
        except msgspec.DecodeError:
            raise AgentError("agent_unavailable", "the agent service sent an unusable agent list", 502) from None
        expires = time.monotonic() + BUDGET_CACHE_SECONDS
        if len(agents) > 1000:
            agents = agents[:1000]
        self._budgets = {}
        for agent in agents:
            budget = agent.budget
            if budget is None:
                if not self._warned_unknown_budget:
                    self._warned_unknown_budget = True
                    log.warning("the remote agent does not say how much its agents add to a prompt; "
                                "assuming %d bytes each", UNKNOWN_INSTRUCTIONS_BYTES)
                budget = AgentBudget(UNKNOWN_INSTRUCTIONS_BYTES, None)
            self._budgets[agent.id] = (expires, budget)
        return agents

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
                    raise _envelope_error(response.status_code, await response.aread(), self._base_url)
                if not response.headers.get("content-type", "").startswith("text/event-stream"):
                    raise AgentError("provider_error", "the agent answered without an event stream", 502)
                events = _events(response)
                try:
                    yield events
                finally:  # left mid-stream (a cancel, the reply cap): not left to the GC
                    await events.aclose()
        except httpx.TimeoutException:
            raise AgentError("provider_timeout", "the agent did not answer in time", 504) from None
        except httpx.HTTPError as exc:
            log.warning("remote agent unreachable: %s", type(exc).__name__)
            raise AgentError("agent_unavailable", "the agent service cannot be reached", 502) from None


async def _events(response: httpx.Response) -> AsyncIterator[StreamEvent]:
    parser = SseDataParser()
    finished = False
    try:
        async for chunk in response.aiter_raw():
            for data in parser.feed(chunk):
                event = _stream_event(data)
                if event is not None:
                    finished = finished or isinstance(event, Finish)
                    yield event
    except SseTooLong:
        raise AgentError("provider_error", "the agent sent an over-long stream event", 502) from None
    for data in parser.close():
        event = _stream_event(data)
        if event is not None:
            finished = finished or isinstance(event, Finish)
            yield event
    if not finished:
        raise AgentError("provider_error", "the agent's stream ended before the reply was complete", 502)


def _stream_event(data: bytes) -> StreamEvent | None:
    """The relay's event for one SSE event of the agent's ``/stream``, if it carries one."""
    if data == b"[DONE]":
        return None
    try:
        event = _event_decoder.decode(data)
    except msgspec.DecodeError:
        raise AgentError("provider_error", "the agent sent an unreadable event", 502) from None
    if event.type == "text-delta":
        text = event.text if event.text is not None else event.delta
        return TextDelta(text) if text else None
    if event.type == "finish":
        usage = event.total_usage or _TotalUsage()
        return Finish(
            event.finish_reason or "unknown",
            Usage(usage.input_tokens, usage.output_tokens, usage.total_tokens),
        )
    if event.type == "error":
        error = event.error
        if isinstance(error, _ErrorBody):
            raise AgentError(error.code, error.message, 502)
        raise AgentError("provider_error", str(error or "the agent reported an error"), 502)
    return None


def _envelope_error(status: int, body: bytes, base_url: str) -> AgentError:
    try:
        envelope = _envelope_decoder.decode(body)
    except msgspec.DecodeError:
        envelope = None
    code = envelope.code if envelope is not None else None
    if status == 401 and code != "provider_auth":
        return secret_mismatch(base_url)
    if envelope is None:
        return AgentError("agent_unavailable", f"the agent answered {status}", 502)
    message = envelope.error if isinstance(envelope.error, str) else "the agent refused the request"
    return AgentError(code or "provider_error", message, status)
