"""What every request handler of the gateway may use, created once by ``server.serve_atlas``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import httpx

from atlas.config import Settings
from atlas.gateway.auth import TokenVerifier
from atlas.gateway.metrics import Metrics
from atlas.gateway.relay import Relay
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
    default_provider_url: str
    agent_app: Any = None  # in-process agent ASGI app, or None with a remote agent
    agent_client: httpx.AsyncClient | None = None  # with a remote agent
    shutting_down: bool = False
    metrics: Metrics = field(default_factory=Metrics)
