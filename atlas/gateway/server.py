"""``atlas serve``: the transport and the agent in one Hypercorn (trio worker) process.

``serve_atlas`` starts everything under one nursery and reports the base URL once listening:
the dev provider (when no provider is configured), the token verifier, the agent (in-process,
or a client for a remote one), the room registry, and the HTTP/WebSocket server. Shutdown (the
``shutdown`` event, set by SIGINT/SIGTERM in ``main``) stops new connections, closes every
WebSocket with 1001, waits a bounded time for them to go, then stops the server. Every
acknowledged write is already durable in the store, so nothing is left half-written.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import shutil
import sys
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from functools import partial
from pathlib import Path

import httpx
import trio

from atlas.config import Settings, prepare_data_dir
from atlas.gateway.admission import Admission
from atlas.gateway.app import build_app
from atlas.gateway.auth import open_token_verifier
from atlas.gateway.metrics import Metrics
from atlas.gateway.relay import Relay
from atlas.gateway.request_log import RequestObserver
from atlas.gateway.revocation import serve_revocation_sweeps
from atlas.gateway.services import Services
from atlas.gateway.streams import close_all as close_streams
from atlas.gateway.websocket_stream import close_broken_websockets
from atlas.http_server import serve_asgi
from atlas.llm.agents import AgentSpec, load_agents
from atlas.lifecycle import run_until_signal
from atlas.llm.provider import ProviderClient, RetryPolicy, open_provider_transport
from atlas.logs import setup_logging
from atlas.protocol import CLOSE_GOING_AWAY
from atlas.rooms import serve_rooms
from atlas.store import Limits, Store, StoreError, store_for
from atlas.store.users import create_user

log = logging.getLogger("atlas.gateway.server")

DEMO_USER = "demo"
DEMO_KEY = "dev-demo-key"
LEFTOVER_GRACE_SECONDS = 0.5


async def serve_atlas(
    settings: Settings,
    *,
    agents: dict[str, AgentSpec] | None = None,
    store: Store | None = None,
    shutdown: trio.Event | None = None,
    clock: Callable[[], float] = time.time,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until ``shutdown`` is set (then shut down gracefully) or until cancelled.
    ``agents``: already loaded agent definitions (else they are loaded from the settings).
    ``store``: an already prepared store, which the caller closes (else one is opened from the
    settings, prepared, and closed at the end).
    ``clock``: the wall clock of the usage ledger and limits (UTC days and months, minutes)."""
    if store is not None:
        await _serve(settings, store, agents=agents, shutdown=shutdown, clock=clock, task_status=task_status)
        return
    store = store_for(settings)
    try:
        await trio.to_thread.run_sync(store.prepare)
        await _serve(settings, store, agents=agents, shutdown=shutdown, clock=clock, task_status=task_status)
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(store.close)


async def _serve(
    settings: Settings,
    store: Store,
    *,
    agents: dict[str, AgentSpec] | None,
    shutdown: trio.Event | None,
    clock: Callable[[], float],
    task_status: trio.TaskStatus[str],
) -> None:
    if shutdown is None:
        shutdown = trio.Event()
    # Three layers, each ended before the one that outlives it: the room and sweep tasks
    # (``background``) use the clients and the provider transport (``stack``), which call the
    # dev provider (``providers``). Shutdown ends the users first, then what they use.
    async with trio.open_nursery() as providers, AsyncExitStack() as stack, trio.open_nursery() as background:
        # The stack's first callback runs last: once the clients are closed, the dev provider goes.
        stack.callback(providers.cancel_scope.cancel)
        provider_url = settings.provider_url
        if provider_url is None and settings.agent_url:
            # A remote agent picks its own default provider when the header is empty.
            provider_url = ""
        elif provider_url is None:
            from atlas.llm.devprovider import serve_dev_provider

            provider_url = await providers.start(serve_dev_provider)
            log.warning(
                "using the built-in dev provider at %s: replies are canned test text, not a model. "
                "Set ATLAS_PROVIDER_URL to use a real provider.", provider_url,
            )
        verifier = await stack.enter_async_context(open_token_verifier(settings, store))
        agent_app = agent_client = None
        if settings.agent_url:
            from atlas.agent_api.remote import RemoteAgent

            agent_client = await stack.enter_async_context(
                httpx.AsyncClient(timeout=httpx.Timeout(settings.provider_timeout, connect=5.0))
            )
            agent = RemoteAgent(agent_client, settings.agent_url, settings.agent_secret)
            log.info("agent requests go to the remote agent at %s", settings.agent_url)
            # The OpenAI-compatible endpoint calls the provider itself, with its own client.
            transport = await stack.enter_async_context(
                open_provider_transport(
                    settings.provider_transport, proxy=settings.provider_proxy,
                    max_connections=settings.provider_max_connections,
                )
            )
            provider = ProviderClient(
                transport, RetryPolicy(retries=0), timeout=settings.provider_timeout
            )
        else:
            from atlas.agent import open_agent_service
            from atlas.agent_api.app import AgentApp

            agent = await stack.enter_async_context(
                open_agent_service(settings, default_provider_url=provider_url, agents=agents)
            )
            agent_app = AgentApp(agent, settings)
            provider = agent.provider
        metrics = Metrics()
        admission = Admission(
            store.usage_ledger(owner_must_exist=settings.auth_url is None),
            Limits(**{k: v for k, v in settings.default_limits().items() if v is not None}),
            clock=clock, wait_seconds=settings.limit_wait_seconds,
            default_output_tokens=settings.default_output_tokens,
            observer=RequestObserver(metrics), deadline_seconds=settings.request_deadline_seconds,
        )
        await background.start(admission.ledger.serve)  # keeps this process's reservations alive
        rooms = await background.start(partial(
            serve_rooms, store, idle_seconds=settings.room_idle_seconds,
            users_are_stored=settings.auth_url is None, handoff_seconds=settings.room_handoff_seconds,
        ))
        admission.store_ready = rooms.leases.healthy
        await background.start(partial(
            serve_revocation_sweeps, verifier, rooms, store, period=settings.auth_cache_seconds
        ))
        services = Services(
            settings=settings, store=store, verifier=verifier, rooms=rooms,
            relay=Relay(
                agent, admission, default_provider_url=provider_url,
                max_requests=settings.max_requests_per_connection,
                conversation_turns=settings.conversation_turns, default_agent=settings.default_agent,
                resume_grace_seconds=settings.resume_grace_seconds,
                resume_buffer_bytes=settings.resume_buffer_bytes,
                max_reply_bytes=settings.max_reply_bytes,
                max_connections_per_user=settings.max_connections_per_user,
            ),
            admission=admission, provider=provider, metrics=metrics,
            default_provider_url=provider_url, agent_app=agent_app, agent_client=agent_client,
        )
        services.metrics.track_live(
            connections=lambda: len(rooms.connections()), rooms=lambda: len(rooms.rooms)
        )
        stop_listening = trio.Event()
        close_broken_websockets()  # pings answered or the peer closed; protocol violations closed
        async with trio.open_nursery() as server:
            url = await server.start(partial(
                serve_asgi, build_app(services), settings.bind,
                shutdown_trigger=stop_listening.wait,
                max_message_bytes=settings.max_message_bytes,
                # Atlas drains its own work (below) before Hypercorn stops; what is left then is
                # idle keep-alive connections, which need no long grace.
                graceful_seconds=LEFTOVER_GRACE_SECONDS, app_handles_lifespan=True, backlog=settings.backlog,
                write_timeout=settings.write_timeout_seconds, ws_ping_interval=settings.ws_ping_interval_seconds,
            ))
            log.info("ready; store: %s", store.location)
            if settings.provider_url is None and settings.auth_url is None and not store.has_users():
                announce_demo_user(store, url, command_as_invoked())
            task_status.started(url)
            await shutdown.wait()
            log.info("shutting down: closing every connection with 1001")
            services.shutting_down = True
            rooms.close_all(CLOSE_GOING_AWAY, "server shutting down")
            close_streams(rooms)  # resumable requests end with the process: none to resume here
            with trio.move_on_after(settings.shutdown_seconds):
                # WebSockets leave at once; proxied HTTP requests hold their room until done.
                await rooms.wait_drained()
            stop_listening.set()
        background.cancel_scope.cancel()
    log.info("stopped")


def command_as_invoked() -> str:
    """How this shell runs ``atlas`` again: ``atlas`` when the PATH finds this very script, else
    the script's path (a virtualenv's ``bin`` is usually not on the PATH), else ``python -m atlas``."""
    script = Path(sys.argv[0])
    if script.name == "atlas" and script.exists():
        found = shutil.which("atlas")
        if found and Path(found).resolve() == script.resolve():
            return "atlas"
        return shlex.quote(_shown_path(script))
    return f"{shlex.quote(_shown_path(Path(sys.executable)))} -m atlas"


def _shown_path(path: Path) -> str:
    """``path`` relative to the working directory when it lies below it, else absolute."""
    absolute = path.absolute()
    try:
        return str(absolute.relative_to(Path.cwd()))
    except ValueError:
        return str(absolute)


def announce_demo_user(store: Store, url: str, atlas: str = "atlas") -> None:
    """First run on the embedded defaults: create ``demo`` and print three ways in, once.
    ``atlas``: the command that runs atlas in this shell."""
    token = create_user(store, DEMO_USER, DEMO_KEY, None)
    print(
        "\nFirst run: created the user 'demo' (billed to the dev provider, which needs no key).\n"
        "Its token is shown only this once. Three ways in:\n\n"
        f"  Web page:   {url}/#user={DEMO_USER}&token={token}\n"
        f"  Terminal:   {atlas} chat --url {url} --user {DEMO_USER} --token {token}\n"
        f"  curl:       curl -H 'Authorization: Bearer {token}' -H 'Content-Type: application/json' \\\n"
        f"                -d '{{\"input\": \"Hello\"}}' '{url}/party/{DEMO_USER}?proxy=/agents/atlas-assistant/text'\n",
        flush=True,
    )


def main(args: argparse.Namespace) -> int:
    settings: Settings = args.settings
    # Bad settings stop here, before trio starts, as one line (exit status 2).
    prepare_data_dir(settings.data_dir)
    agents = None if settings.agent_url else load_agents(settings)
    setup_logging(settings.log_level, settings.log_format)
    # The store is opened (the database schema created or migrated) before anything listens;
    # a store that cannot be opened is one line and exit status 1, not a traceback.
    store = store_for(settings)
    try:
        try:
            store.prepare()
        except StoreError as exc:
            print(f"atlas: cannot open the store: {exc}", file=sys.stderr)
            return 1
        serve = partial(serve_atlas, settings, agents=agents, store=store)
        trio.run(partial(
            run_until_signal, serve, name="Atlas", bind=settings.bind, grace_seconds=settings.shutdown_seconds,
        ))
    finally:
        store.close()
    return 0
