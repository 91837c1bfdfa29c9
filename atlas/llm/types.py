"""The values the agent API passes around: stream events, messages, credentials and its one error.

Kept apart from ``atlas.agent`` so the provider client can use them without an import cycle;
``atlas.agent`` re-exports everything here.
"""

from __future__ import annotations

import msgspec


class Usage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class TextDelta(msgspec.Struct):
    text: str


class Finish(msgspec.Struct):
    finish_reason: str  # VoltAgent / AI SDK names: stop, length, content-filter, tool-calls, other, unknown
    usage: Usage


StreamEvent = TextDelta | Finish


class ChatMessage(msgspec.Struct):
    role: str  # system, user or assistant
    content: str


class Credentials(msgspec.Struct, frozen=True):
    api_key: str
    api_url: str  # empty: the default provider URL
    user_id: str

    def __repr__(self) -> str:  # the key never reaches a log line, not even by accident
        return f"Credentials(api_key='***', api_url={self.api_url!r}, user_id={self.user_id!r})"


class AgentBudget(msgspec.Struct, frozen=True, rename="camel"):
    """What admission needs to bound an agent's provider request from outside the agent: the
    bytes the agent adds to every prompt (its instructions) and its own output cap."""

    instructions_bytes: int = 0
    max_output_tokens: int | None = None


class AgentError(Exception):
    """A request the agent cannot serve. ``code`` is one of the contract's error codes,
    ``message`` is safe to show to the user (it never holds a key), ``status`` is the HTTP status,
    ``retry_after`` (seconds) is set for ``provider_rate_limited`` when the provider said so."""

    def __init__(
        self, code: str, message: str, status: int, *, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status
        self.retry_after = retry_after

    def __repr__(self) -> str:
        return f"AgentError({self.code!r}, {self.message!r}, {self.status})"

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


def bad_request(message: str) -> AgentError:
    return AgentError("bad_request", message, 400)
