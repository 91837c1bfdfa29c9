"""The agent's Python API: agents from config, one streamed reply per call, per-request credentials.

The HTTP routes (``atlas.agent_api.app``) and the in-process transport both go through
``AgentService.open_stream``::

    async with open_agent_service(settings, default_provider_url=url) as service:
        async with service.open_stream("atlas-assistant", "Hi", {}, credentials) as events:
            async for event in events:   # TextDelta..., then one Finish
                ...

Everything a request can get wrong (agent, input, options, credentials, provider URL) is checked
before any network I/O, and raises ``AgentError``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import msgspec

from atlas.config import Settings, normalize_url
from atlas.llm.agents import AgentSpec, SamplingOptions, load_agents
from atlas.llm.provider import ProviderClient, RetryPolicy, open_provider_transport
from atlas.llm.types import (
    AgentBudget,
    AgentError,
    ChatMessage,
    Credentials,
    Finish,
    StreamEvent,
    TextDelta,
    Usage,
    bad_request,
)

__all__ = [
    "AgentBudget", "AgentError", "AgentService", "AgentSpec", "ChatMessage", "Credentials", "Finish",
    "StreamEvent", "TextDelta", "Usage", "open_agent_service",
]

log = logging.getLogger("atlas.agent")

ROLES = ("system", "user", "assistant")


class MemoryOptions(msgspec.Struct, rename="camel"):
    user_id: str | None = None
    conversation_id: str | None = None
    options: dict[str, Any] | None = None


class AgentOptions(SamplingOptions, forbid_unknown_fields=True, rename="camel"):
    """VoltAgent's generation options. Sampling options go to the provider; memory, context and
    tool options are accepted for compatibility and have no effect here (no tools, and the
    conversation history comes in ``input``)."""

    user_id: str | None = None
    conversation_id: str | None = None
    memory: MemoryOptions | None = None
    # Accepted, without effect:
    max_steps: int | None = None
    max_retries: int | None = None
    context_limit: int | None = None
    semantic_memory: dict[str, Any] | None = None
    conversation_persistence: dict[str, Any] | None = None
    provider_options: dict[str, Any] | None = None
    context: dict[str, Any] | None = None
    output: dict[str, Any] | None = None
    tool_choice: Any = None


_encode = msgspec.json.Encoder().encode


def parse_options(options: Mapping[str, Any] | None) -> AgentOptions:
    if options is None:
        return AgentOptions()
    if not isinstance(options, Mapping):
        raise bad_request("options: expected an object")
    # JSON does not tell 100 from 100.0 (JSON Schema's integer is both; Python's json writes a
    # float as 100.0): a whole number sent as a float is that number.
    options = {k: int(v) if isinstance(v, float) and v.is_integer() else v for k, v in options.items()}
    try:
        return msgspec.convert(options, AgentOptions)
    except msgspec.ValidationError as exc:
        message, _, where = str(exc).partition(" - at `$")
        if message.startswith("Object contains unknown field"):
            field = message.rpartition(" ")[2].strip("`")
            nested = where.rstrip("`")
            raise bad_request(f"options{nested}.{field}: unknown option") from None
        raise bad_request(f"options{where.rstrip('`')}: {message}") from None


def check_input(value: str | list[ChatMessage]) -> list[ChatMessage]:
    if isinstance(value, str):
        if not value.strip():
            raise bad_request("input: must not be empty")
        return [ChatMessage("user", value)]
    if not isinstance(value, list) or not value:
        raise bad_request("input: expected a non-empty string or list of messages")
    for index, message in enumerate(value):
        if not isinstance(message, ChatMessage):
            raise bad_request(f"input[{index}]: expected a message")
        if message.role not in ROLES:
            raise bad_request(f"input[{index}].role: expected one of {', '.join(ROLES)}")
    return value


def build_body(agent: AgentSpec, messages: list[ChatMessage], options: AgentOptions) -> bytes:
    """The provider request: the agent's defaults, overridden by the request's options."""
    prompt = [{"role": "system", "content": agent.instructions}] if agent.instructions else []
    prompt += [{"role": m.role, "content": m.content} for m in messages]
    body: dict[str, Any] = {
        "model": agent.model,
        "messages": prompt,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    for name, value in (
        ("temperature", _pick(options.temperature, agent.temperature)),
        ("max_tokens", _pick(options.max_output_tokens, agent.max_output_tokens)),
        ("top_p", _pick(options.top_p, agent.top_p)),
        ("frequency_penalty", _pick(options.frequency_penalty, agent.frequency_penalty)),
        ("presence_penalty", _pick(options.presence_penalty, agent.presence_penalty)),
        ("seed", _pick(options.seed, agent.seed)),
        ("stop", _pick(options.stop_sequences, agent.stop_sequences)),
    ):
        if value is not None:
            body[name] = value
    return _encode(body)


def _pick(value: Any, default: Any) -> Any:
    return default if value is None else value


class AgentService:
    """The agents and the provider client. Built by ``open_agent_service``."""

    def __init__(
        self,
        agents: dict[str, AgentSpec],
        provider: ProviderClient,
        *,
        default_provider_url: str,
        allowed_provider_urls: tuple[str, ...],
    ) -> None:
        self.agents = agents
        self.default_provider_url = normalize_url(default_provider_url)
        self.allowed_provider_urls = frozenset(normalize_url(u) for u in allowed_provider_urls)
        self.provider = provider  # shared with the transport's OpenAI-compatible endpoint

    async def default_agent_id(self) -> str:
        """The agent a request without ``agentId`` goes to: the first one configured."""
        return next(iter(self.agents))

    def get(self, agent_id: str) -> AgentSpec:
        agent = self.agents.get(agent_id)
        if agent is None:
            raise AgentError("unknown_agent", f"no agent with id {agent_id!r}", 404)
        return agent

    async def budget(self, agent_id: str) -> AgentBudget:
        """The agent's prompt overhead and output cap, for admission (``unknown_agent``)."""
        return self.get(agent_id).budget()

    def provider_url(self, credentials: Credentials) -> str:
        """The URL the request will go to (normalised: no user-info, query or fragment), or
        ``provider_not_allowed``."""
        url = normalize_url(credentials.api_url) if credentials.api_url.strip() else self.default_provider_url
        if url not in self.allowed_provider_urls:
            raise AgentError("provider_not_allowed", f"provider URL {url!r} is not allowed here", 400)
        return url

    @asynccontextmanager
    async def open_stream(
        self,
        agent_id: str,
        input: str | list[ChatMessage],
        options: Mapping[str, Any] | None,
        credentials: Credentials,
    ) -> AsyncIterator[AsyncIterator[StreamEvent]]:
        """Stream one reply: ``TextDelta`` per provider delta, then exactly one ``Finish``.

        Raises ``AgentError`` when entering (bad request, before any I/O; or the provider refused
        before its first byte, after the retries) and while iterating (a mid-stream failure).
        Leaving the block early closes the provider response at once."""
        agent = self.get(agent_id)
        messages = check_input(input)
        body = build_body(agent, messages, parse_options(options))
        key = credentials.api_key.strip()
        if not key:
            raise AgentError("no_credentials", "no provider API key for this request", 400)
        if not key.isascii() or not key.isprintable() or " " in key:
            # It goes into an Authorization header: a line break would smuggle other headers.
            raise AgentError(
                "no_credentials", "the provider API key has characters a key cannot have", 400
            )
        url = self.provider_url(credentials)
        log.debug("agent %s: user %r -> %s", agent.id, credentials.user_id, url)
        async with self.provider.open_completion(url, key, body) as events:
            yield events


@asynccontextmanager
async def open_agent_service(
    settings: Settings,
    *,
    default_provider_url: str,
    agents: dict[str, AgentSpec] | None = None,
) -> AsyncIterator[AgentService]:
    """Load the agents (``ConfigError`` on a bad file) and own the provider HTTP client.
    ``agents`` skips the loading, for a caller that has already loaded (or built) them."""
    agents = load_agents(settings) if agents is None else agents
    transport = open_provider_transport(
        settings.provider_transport, proxy=settings.provider_proxy,
        max_connections=settings.provider_max_connections,
    )
    async with transport:
        provider = ProviderClient(
            transport, RetryPolicy(retries=settings.provider_retries), timeout=settings.provider_timeout
        )
        yield AgentService(
            agents,
            provider,
            default_provider_url=default_provider_url,
            allowed_provider_urls=settings.allowed_provider_urls(default_provider_url),
        )

