"""The reply cap (``ATLAS_MAX_REPLY_BYTES``): the most of one agent or provider reply that Atlas
relays, on every path (WebSocket, the metered ``?proxy=`` routes, ``/v1``).

Without it, memory per request is bounded only by what the provider chooses to send: the
WebSocket relay keeps a reply's whole text for ``agent:done`` (and a resumable request for
replay). A reply over the cap ends with the error ``too_large``; the provider request is closed,
and admission settles the request as any other that ends early (the provider's usage if it
reported one, else the estimate)."""

from __future__ import annotations

from atlas.llm.types import AgentError

CODE = "too_large"


def utf8_size(text: str) -> int:
    """Bytes of ``text`` in UTF-8, without encoding it when it is ASCII (``isascii`` is O(1))."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def reply_too_large(limit: int) -> AgentError:
    return AgentError(
        CODE, f"the reply is longer than the {limit} bytes this server relays (ATLAS_MAX_REPLY_BYTES)", 502
    )
