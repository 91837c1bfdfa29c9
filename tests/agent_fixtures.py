"""Helpers for the agent tests: a real agent server on port 0 in front of a fake provider."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import msgspec
import trio

from atlas.agent_api.server import serve_agent
from atlas.config import Bind, Settings

TEST_KEY = "sk-test-key-0123456789"


def agent_settings(provider_url: str | None, data_dir: Path, **changes: Any) -> Settings:
    base = Settings(
        data_dir=data_dir,
        bind=Bind("127.0.0.1", 0),
        provider_url=provider_url,
        provider_timeout=30.0,
        provider_retries=2,
    )
    return base.replace(**changes)


def credentials(provider_url: str, key: str = TEST_KEY, user: str = "alice") -> dict[str, str]:
    return {"X-Provider-API-Key": key, "X-Provider-API-URL": provider_url, "X-User-ID": user}


@dataclass
class AgentHarness:
    url: str
    client: httpx.AsyncClient


@asynccontextmanager
async def open_agent(settings: Settings) -> AsyncIterator[AgentHarness]:
    async with trio.open_nursery() as nursery:
        url = await nursery.start(partial(serve_agent, settings))
        async with httpx.AsyncClient(base_url=url, timeout=None) as client:
            yield AgentHarness(url, client)
        nursery.cancel_scope.cancel()


def sse_events(text: str) -> list[Any]:
    """The ``data:`` payloads of an SSE body, JSON-decoded (``[DONE]`` kept as the string)."""
    events = []
    for block in text.split("\n\n"):
        for line in block.splitlines():
            if line.startswith("data: "):
                payload = line[len("data: "):]
                events.append(payload if payload == "[DONE]" else msgspec.json.decode(payload))
    return events


async def read_events(response: httpx.Response) -> AsyncIterator[Any]:
    """Decode SSE ``data:`` payloads as they arrive."""
    buffer = ""
    async for chunk in response.aiter_text():
        buffer += chunk
        while "\n\n" in buffer:
            block, buffer = buffer.split("\n\n", 1)
            for event in sse_events(block + "\n\n"):
                yield event
