"""``atlas agent``: the agent HTTP API alone, for the two-process layout."""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import trio

from .agent import build_agent_app, open_agent_service
from .agents_config import load_agents
from .config import Settings
from .devprovider import serve_dev_provider
from .http_server import serve_asgi

log = logging.getLogger("atlas.agent")


async def serve_agent(
    settings: Settings,
    *,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the agent API on ``settings.bind`` (with the dev provider when no provider URL is
    configured) until cancelled or ``shutdown_trigger`` returns. Reports the base URL once
    listening. A bad agents file raises ``ConfigError`` before anything starts."""
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
            app = build_agent_app(service, settings)
            serve = partial(
                serve_asgi, app, settings.bind, shutdown_trigger=shutdown_trigger,
                max_message_bytes=settings.max_message_bytes,
                graceful_seconds=settings.shutdown_seconds,
            )
            async with trio.open_nursery() as server_nursery:
                url = await server_nursery.start(serve)
                log.info("agents: %s; provider URLs allowed: %s", ", ".join(service.agents),
                         ", ".join(sorted(service.allowed_provider_urls)))
                task_status.started(url)
        nursery.cancel_scope.cancel()  # the server has stopped: stop the dev provider too


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level, stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if level != "DEBUG":  # one line per provider call is noise at INFO
        logging.getLogger("httpx").setLevel(logging.WARNING)


async def run(settings: Settings) -> None:
    stop = trio.Event()
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            url = await nursery.start(partial(serve_agent, settings, shutdown_trigger=stop.wait))
            print(f"Atlas agent listening on {url}", file=sys.stderr, flush=True)
            async for signum in signals:
                log.info("%s: shutting down (up to %.0fs for requests in flight)",
                         signal.Signals(signum).name, settings.shutdown_seconds)
                stop.set()
                # Hypercorn drains for graceful_seconds; this is the hard deadline behind it.
                nursery.cancel_scope.deadline = trio.current_time() + settings.shutdown_seconds + 1
                break


def main(args: Any) -> int:
    settings: Settings = args.settings
    setup_logging(settings.log_level)
    load_agents(settings)  # a bad agents file stops here, as one line from the CLI
    try:
        trio.run(run, settings)
    except BaseExceptionGroup as group:
        os_errors, rest = group.split(OSError)
        if os_errors is None or rest is not None:
            raise
        exc = _first_leaf(os_errors)
        print(f"atlas: cannot serve on {settings.bind}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


def _first_leaf(group: BaseExceptionGroup) -> Any:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first
