"""``atlas agent``: the agent HTTP API alone, for the two-process layout."""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

import trio

from atlas.agent import open_agent_service
from atlas.agent_api.app import AgentApp
from atlas.config import Settings
from atlas.http_server import serve_asgi
from atlas.lifecycle import run_until_signal
from atlas.llm.agents import AgentSpec, load_agents
from atlas.llm.devprovider import serve_dev_provider
from atlas.logs import setup_logging

log = logging.getLogger("atlas.agent")


async def serve_agent(
    settings: Settings,
    *,
    agents: dict[str, AgentSpec] | None = None,
    shutdown: trio.Event | None = None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the agent API on ``settings.bind`` (with the dev provider when no provider URL is
    configured) until cancelled or ``shutdown`` is set. Reports the base URL once
    listening. A bad agents file raises ``ConfigError`` before anything starts."""
    if agents is None:
        agents = load_agents(settings)
    async with trio.open_nursery() as nursery:
        default_provider_url = settings.provider_url
        if default_provider_url is None:
            default_provider_url = await nursery.start(serve_dev_provider)
            log.warning(
                "no provider configured: using the built-in dev provider at %s; replies are "
                "canned text, not a real model (set ATLAS_PROVIDER_URL)", default_provider_url,
            )
        async with open_agent_service(
            settings, default_provider_url=default_provider_url, agents=agents
        ) as service:
            app = AgentApp(service, settings)
            serve = partial(
                serve_asgi, app, settings.bind, shutdown_trigger=None if shutdown is None else shutdown.wait,
                max_message_bytes=settings.max_message_bytes,
                graceful_seconds=settings.shutdown_seconds,
            )
            async with trio.open_nursery() as server_nursery:
                url = await server_nursery.start(serve)
                log.info("agents: %s; provider URLs allowed: %s", ", ".join(service.agents),
                         ", ".join(sorted(service.allowed_provider_urls)))
                task_status.started(url)
        nursery.cancel_scope.cancel()  # the server has stopped: stop the dev provider too


def main(args: Any) -> int:
    settings: Settings = args.settings
    setup_logging(settings.log_level, settings.log_format)
    agents = load_agents(settings)  # a bad agents file stops here, as one line from the CLI
    serve = partial(serve_agent, settings, agents=agents)
    trio.run(partial(
        run_until_signal, serve, name="Atlas agent", bind=settings.bind,
        grace_seconds=settings.shutdown_seconds,
    ))
    return 0
