"""What every request handler of the gateway may use, created once by ``server.serve_atlas``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import httpx

from atlas.config import Settings
from atlas.gateway.admission import Admission
from atlas.gateway.auth import TokenVerifier
from atlas.gateway.metrics import Metrics
from atlas.gateway.relay import Relay
from atlas.llm.provider import ProviderClient
from atlas.rooms import RoomRegistry
from atlas.store import Store


@dataclass
class Services:
    """Everything a request handler may use, created once by ``server.serve_atlas``."""

    settings: Settings
    store: Store
    verifier: TokenVerifier
    rooms: RoomRegistry
    relay: Relay
    admission: Admission
    provider: ProviderClient  # the provider HTTP client (the agent's own, in-process), for /v1
    default_provider_url: str
    agent_app: Any = None  # in-process agent ASGI app, or None with a remote agent
    agent_client: httpx.AsyncClient | None = None  # with a remote agent
    shutting_down: bool = False
    metrics: Metrics = field(default_factory=Metrics)

    async def agent_models(self) -> list[str]:
        """The models of the configured agents (in-process, or as the remote agent lists them)."""
        if self.agent_app is not None:
            return [agent.model for agent in self.agent_app.service.agents.values()]
        assert self.agent_client is not None and self.settings.agent_url
        headers = {"X-Atlas-Agent-Secret": self.settings.agent_secret} if self.settings.agent_secret else {}
        try:
            response = await self.agent_client.get(f"{self.settings.agent_url}/agents", headers=headers)
            agents = response.json().get("data") if response.status_code == 200 else None
        except (httpx.HTTPError, ValueError, AttributeError):
            agents = None
        return [a["model"] for a in agents or () if isinstance(a, dict) and isinstance(a.get("model"), str)]
