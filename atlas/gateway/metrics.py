"""``GET /metrics``: what an operator graphs and alerts on, in Prometheus's text format.

Built on ``prometheus-client`` with a registry of the server's own (not the library's global
one), so several servers in one process (the tests) never share or clash. Labels name paths,
outcomes, error codes and limit kinds: never a user id, a token or a key.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Seconds: first tokens come in milliseconds, whole replies in seconds to minutes.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
STORE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.connections = Gauge("atlas_websocket_connections", "Open WebSocket connections", registry=r)
        self.rooms = Gauge("atlas_rooms_loaded", "Rooms loaded in memory", registry=r)
        self.requests = Counter(
            "atlas_agent_requests", "Agent requests by path (ws, proxy, v1) and outcome code",
            ["path", "outcome"], registry=r,
        )
        self.first_token = Histogram(
            "atlas_time_to_first_token_seconds", "Time from a request's start to its first token",
            ["path"], buckets=TTFT_BUCKETS, registry=r,
        )
        self.duration = Histogram(
            "atlas_agent_request_duration_seconds", "Agent request duration, start to end",
            ["path"], buckets=DURATION_BUCKETS, registry=r,
        )
        self.provider_errors = Counter(
            "atlas_provider_errors", "Provider failures by error code", ["code"], registry=r,
        )
        self.limit_refusals = Counter(
            "atlas_limit_refusals", "Requests refused by a limit, by kind", ["kind"], registry=r,
        )
        self.store_writes = Histogram(
            "atlas_store_write_seconds", "Durable store writes (room state, usage)", ["kind"],
            buckets=STORE_BUCKETS, registry=r,
        )

    def track_live(self, connections: Callable[[], int], rooms: Callable[[], int]) -> None:
        """Read the live counts when scraped, rather than counting every change."""
        self.connections.set_function(connections)
        self.rooms.set_function(rooms)

    def request_finished(
        self, path: str, outcome: str, *, duration: float, first_token: float | None = None,
    ) -> None:
        self.requests.labels(path, outcome).inc()
        self.duration.labels(path).observe(duration)
        if first_token is not None:
            self.first_token.labels(path).observe(first_token)
        if outcome.startswith("provider_"):
            self.provider_errors.labels(outcome).inc()
        elif outcome in ("quota_exceeded", "rate_limited"):
            self.limit_refusals.labels(outcome).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
