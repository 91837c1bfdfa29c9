"""The built-in dev provider: an OpenAI-compatible ``POST /v1/chat/completions`` that answers with a
deterministic reply mentioning the last user message. Not a model: it lets Atlas run offline out
of the box, and gives tests and benchmarks a provider to talk to.

Streaming requests get ``chat.completion.chunk`` events, one usage chunk and ``[DONE]``;
non-streaming requests get one ``chat.completion`` with usage. Tokens are words; the reply is cut
at ``max_completion_tokens`` / ``max_tokens`` words (finish reason ``length``), as a real
provider honours its output cap. ``GET /v1/models`` lists ``atlas-dev``. Any bearer key is
accepted.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import partial
from typing import Any

import msgspec
import trio

from atlas.asgi import BodyTooLarge, ClientGone, Receive, Send, read_body, send_json
from atlas.config import Bind
from atlas.http_server import serve_asgi

log = logging.getLogger("atlas.llm.devprovider")

DEFAULT_REPLY = (
    "This is the Atlas dev provider, not a real model. You said: {message}. "
    "Configure ATLAS_PROVIDER_URL to talk to a real one."
)

MAX_BODY = 4 * 1024 * 1024


class _Message(msgspec.Struct):
    role: str
    content: str | list[dict[str, Any]] | None = None


class _Request(msgspec.Struct):
    messages: list[_Message]
    model: str = "atlas-dev"
    stream: bool | None = False  # OpenAI's API takes null for "not streamed"
    max_tokens: int | None = None
    max_completion_tokens: int | None = None


_decode_request = msgspec.json.Decoder(_Request).decode
_encode = msgspec.json.Encoder().encode


@dataclass
class DevProviderConfig:
    """``reply`` may hold ``{message}`` (the last user message). The reply is split into
    ``deltas`` pieces, sent ``delay`` seconds apart."""

    reply: str = DEFAULT_REPLY
    deltas: int = 8
    delay: float = 0.0


def split_text(text: str, pieces: int) -> list[str]:
    """``text`` in ``pieces`` consecutive parts of near-equal length (fewer if it is short)."""
    pieces = max(1, min(pieces, len(text) or 1))
    size, extra = divmod(len(text), pieces)
    out, start = [], 0
    for index in range(pieces):
        end = start + size + (1 if index < extra else 0)
        out.append(text[start:end])
        start = end
    return out


def count_tokens(text: str) -> int:
    return len(text.split())


def cap_reply(text: str, cap: int | None) -> tuple[str, str]:
    """The reply cut at ``cap`` tokens (words), and its finish reason."""
    if cap is None or count_tokens(text) <= cap:
        return text, "stop"
    words = text.split()
    return " ".join(words[:max(0, cap)]), "length"


def _content_text(content: str | list[dict[str, Any]] | None) -> str:
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content or () if isinstance(p, dict))


class DevProviderApp:
    def __init__(self, config: DevProviderConfig | None = None) -> None:
        self.config = config or DevProviderConfig()

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan is answered by serve_asgi
            return
        path, method = scope["path"].rstrip("/"), scope["method"]
        if path == "/v1/models" and method == "GET":
            models = {"object": "list", "data": [
                {"id": "atlas-dev", "object": "model", "created": 0, "owned_by": "atlas"}
            ]}
            await send_json(send, 200, models)
            return
        if path != "/v1/chat/completions":
            await send_json(send, 404, _error("not found", "not_found"))
            return
        if method != "POST":
            await send_json(send, 405, _error("use POST", "method_not_allowed"))
            return
        headers = dict(scope.get("headers", ()))
        if not headers.get(b"authorization", b"").startswith(b"Bearer "):
            await send_json(send, 401, _error("missing bearer API key", "invalid_api_key"))
            return
        try:
            body = await read_body(receive, MAX_BODY)
        except (BodyTooLarge, ClientGone):
            await send_json(send, 413, _error(f"bad request: body over {MAX_BODY} bytes or cut", "invalid_request_error"))
            return
        try:
            request = _decode_request(body)
        except msgspec.DecodeError as exc:
            await send_json(send, 400, _error(f"bad request: {exc}", "invalid_request_error"))
            return
        last_user = next(
            (_content_text(m.content) for m in reversed(request.messages) if m.role == "user"), ""
        )
        reply = self.config.reply.replace("{message}", last_user.strip() or "nothing")
        reply, finish_reason = cap_reply(reply, request.max_completion_tokens or request.max_tokens)
        prompt_tokens = sum(count_tokens(_content_text(m.content)) for m in request.messages)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": count_tokens(reply),
            "total_tokens": prompt_tokens + count_tokens(reply),
        }
        if request.stream:
            await self._stream(send, request.model, reply, usage, finish_reason)
        else:
            await send_json(send, 200, {
                "id": "chatcmpl-atlas-dev",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": request.model,
                "choices": [{
                    "index": 0,
                    "message": {"role": "assistant", "content": reply},
                    "finish_reason": finish_reason,
                }],
                "usage": usage,
            })

    async def _stream(
        self, send: Send, model: str, reply: str, usage: dict[str, int], finish_reason: str
    ) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"),
        ]})
        base = {"id": "chatcmpl-atlas-dev", "object": "chat.completion.chunk",
                "created": int(time.time()), "model": model}

        def chunk(choices: list[Any], **extra: Any) -> dict[str, Any]:
            return {"type": "http.response.body", "more_body": True,
                    "body": b"data: " + _encode({**base, "choices": choices, **extra}) + b"\n\n"}

        await send(chunk([{"index": 0, "delta": {"role": "assistant", "content": ""},
                           "finish_reason": None}]))
        for index, piece in enumerate(split_text(reply, self.config.deltas)):
            if index and self.config.delay:
                await trio.sleep(self.config.delay)
            await send(chunk([{"index": 0, "delta": {"content": piece}, "finish_reason": None}]))
        await send(chunk([{"index": 0, "delta": {}, "finish_reason": finish_reason}]))
        await send(chunk([], usage=usage))
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})


def _error(message: str, code: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": code, "param": None, "code": code}}




async def serve_dev_provider(
    *,
    bind: Bind = Bind("127.0.0.1", 0),
    config: DevProviderConfig | None = None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the dev provider until cancelled; reports its base URL, ending in ``/v1``."""
    async with trio.open_nursery() as nursery:
        base_url = await nursery.start(partial(serve_asgi, DevProviderApp(config), bind))
        task_status.started(f"{base_url}/v1")
