"""One record per agent request, on every path (WebSocket ``ws``, ``proxy``, ``v1``): a log line
for the operator and the request metrics, written when the request ends.

The line names the user, the agent or model, the path, the outcome code (``ok``, ``cancelled``,
a limit's ``quota_exceeded``/``rate_limited``, a provider's ``provider_*``, ...), the tokens
charged and the duration; never a key or a token. With ``ATLAS_LOG_FORMAT=json`` the same fields
are the JSON object's own (``logs.JsonFormatter``).
"""

from __future__ import annotations

import logging
import time

from atlas.gateway.metrics import Metrics

log = logging.getLogger("atlas.requests")


class RequestTrace:
    """One request, from admission to its end."""

    __slots__ = (
        "_observer", "path", "user", "agent", "started", "first_token_at", "outcome", "tokens", "answered_whole",
    )

    def __init__(self, observer: RequestObserver, path: str, user: str, agent: str) -> None:
        self._observer = observer
        self.path = path
        self.user = user
        self.agent = agent
        self.started = time.monotonic()
        self.first_token_at: float | None = None
        self.outcome = "ok"
        self.tokens = 0
        # The client has the whole answer: what happens after (a disconnect) changes no outcome.
        self.answered_whole = False

    def first_token(self) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()

    def finish(self) -> None:
        self._observer.finished(self)


class RequestObserver:
    def __init__(self, metrics: Metrics | None = None) -> None:
        self.metrics = metrics

    def start(self, path: str, user: str, agent: str) -> RequestTrace:
        return RequestTrace(self, path, user, agent)

    def finished(self, trace: RequestTrace) -> None:
        now = time.monotonic()
        duration = now - trace.started
        first = None if trace.first_token_at is None else trace.first_token_at - trace.started
        if self.metrics is not None:
            self.metrics.request_finished(trace.path, trace.outcome, duration=duration, first_token=first)
        fields = {
            "user": trace.user, "agent": trace.agent, "path": trace.path, "outcome": trace.outcome,
            "tokens": trace.tokens, "duration_ms": round(duration * 1000, 1),
        }
        if first is not None:
            fields["first_token_ms"] = round(first * 1000, 1)
        level = logging.WARNING if trace.outcome == "internal" else logging.INFO
        log.log(
            level, "request user=%s agent=%s path=%s outcome=%s tokens=%d duration_ms=%.1f",
            trace.user, trace.agent, trace.path, trace.outcome, trace.tokens, fields["duration_ms"],
            extra={"fields": fields},
        )
