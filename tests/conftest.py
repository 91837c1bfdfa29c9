"""Suite-wide checks.

Every log record of the whole suite (in-process, at DEBUG) and every log file of the Atlas
subprocesses the tests started is kept, and at the end of the session none of them may contain a
token or a virtual key that a test created (``servers.SECRETS``).
"""

from __future__ import annotations

import logging

import pytest
from agent_fixtures import agent_settings, open_agent
from fake_provider import open_fake_provider
from pg_cluster import postgres_cluster, postgres_url  # noqa: F401  (fixtures)
from servers import PROCESS_LOGS, SECRETS
from store_backends import backend  # noqa: F401  (fixture)


class _KeepEverything(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        # Unredacted on purpose: this checks what Atlas hands to logging, before any filter.
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + logging.Formatter().formatException(record.exc_info)
        self.lines.append(text)


@pytest.fixture(scope="session", autouse=True)
def no_secret_in_any_log():
    handler = _KeepEverything()
    root = logging.getLogger()
    previous_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    # As in `atlas serve` (atlas.logs.setup_logging): the HTTP client libraries log at WARNING.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
    logging.getLogger("psycopg.pool").setLevel(logging.WARNING)
    # The test clients' own chatter (every frame at DEBUG) is not Atlas's log.
    logging.getLogger("trio-websocket").setLevel(logging.INFO)
    yield handler
    root.removeHandler(handler)
    root.setLevel(previous_level)
    texts = list(handler.lines)
    texts += [path.read_text(errors="replace") for path in PROCESS_LOGS if path.exists()]
    leaked = sorted({secret[:12] + "…" for secret in SECRETS for text in texts if secret in text})
    assert not leaked, f"secrets found in logs (shown truncated): {leaked}"


@pytest.fixture
async def provider():
    """A fake OpenAI-compatible provider (tests/fake_provider.py) on port 0."""
    async with open_fake_provider() as provider:
        yield provider


@pytest.fixture
async def agent(provider, tmp_path):
    """``atlas agent`` (serve_agent) on port 0 in front of ``provider``, with an httpx client."""
    async with open_agent(agent_settings(provider.url, tmp_path)) as harness:
        yield harness

