"""The two SSE dialects of the agent API, as bytes ready to send.

``/stream`` speaks VoltAgent's raw stream (AI SDK ``fullStream`` parts); ``/chat`` speaks the AI
SDK UI message stream v1 that ``useChat`` reads (strict schema: no extra fields on a chunk).
Both start the text part lazily, just before the first delta, as the AI SDK does.
"""

from __future__ import annotations

import secrets
from typing import Any

import msgspec

from atlas.llm.types import AgentError, Finish, Usage

_encode = msgspec.json.Encoder().encode

SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
UI_STREAM_HEADERS = [*SSE_HEADERS, (b"x-vercel-ai-ui-message-stream", b"v1")]


def frame(event: Any) -> bytes:
    return b"data: " + _encode(event) + b"\n\n"


def usage_camel(usage: Usage) -> dict[str, int]:
    return {
        "promptTokens": usage.prompt_tokens,
        "completionTokens": usage.completion_tokens,
        "totalTokens": usage.total_tokens,
    }


class FullStream:
    """``POST /agents/{id}/stream``: start, text-start, text-delta*, text-end, finish."""

    headers = SSE_HEADERS

    def __init__(self) -> None:
        self.text_id = f"text-{secrets.token_hex(6)}"
        self._text_started = False

    def start(self) -> bytes:
        return frame({"type": "start"})

    def delta(self, text: str) -> bytes:
        out = frame({"type": "text-delta", "id": self.text_id, "text": text})
        if not self._text_started:
            self._text_started = True
            out = frame({"type": "text-start", "id": self.text_id}) + out
        return out

    def finish(self, finish: Finish) -> bytes:
        usage = finish.usage
        out = frame({"type": "text-end", "id": self.text_id}) if self._text_started else b""
        return out + frame({
            "type": "finish",
            "finishReason": finish.finish_reason,
            "totalUsage": {
                "inputTokens": usage.prompt_tokens,
                "outputTokens": usage.completion_tokens,
                "totalTokens": usage.total_tokens,
            },
        })

    def error(self, error: AgentError) -> bytes:
        return frame({"type": "error", "error": error.to_dict()})


class UIMessageStream:
    """``POST /agents/{id}/chat``: the AI SDK UI message stream, ending with ``[DONE]``."""

    headers = UI_STREAM_HEADERS

    def __init__(self) -> None:
        self.message_id = f"msg-{secrets.token_hex(8)}"
        self.text_id = f"text-{secrets.token_hex(6)}"
        self._text_started = False

    def start(self) -> bytes:
        return frame({"type": "start", "messageId": self.message_id}) + frame({"type": "start-step"})

    def delta(self, text: str) -> bytes:
        out = frame({"type": "text-delta", "id": self.text_id, "delta": text})
        if not self._text_started:
            self._text_started = True
            out = frame({"type": "text-start", "id": self.text_id}) + out
        return out

    def finish(self, finish: Finish) -> bytes:
        out = frame({"type": "text-end", "id": self.text_id}) if self._text_started else b""
        metadata = {"finishReason": finish.finish_reason, "usage": usage_camel(finish.usage)}
        return (
            out
            + frame({"type": "finish-step"})
            + frame({"type": "finish", "messageMetadata": metadata})
            + b"data: [DONE]\n\n"
        )

    def error(self, error: AgentError) -> bytes:
        return frame({"type": "error", "errorText": f"{error.message} ({error.code})"}) + b"data: [DONE]\n\n"
