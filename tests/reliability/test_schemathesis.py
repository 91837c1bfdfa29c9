"""Schemathesis fuzzing of the agent API and the gateway, from the documents they serve (issue 14).

Each test starts the real server on port 0 in front of the fake provider, loads its
``/openapi.json`` and lets ``schemathesis_run.fuzz`` draw valid and invalid requests for every
operation, with valid credentials, checking each answer: never a 5xx; only documented statuses,
content types and headers; bodies and SSE events that match their schemas; valid requests served
and invalid ones refused. Quick: derandomized, a few examples per operation; long
(``ATLAS_RELIABILITY_LONG=1``): random, many more, and schemathesis's own runner (``st run``,
every phase and check) against the same servers.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import pytest
import trio
from agent_fixtures import agent_settings, open_agent
from fake_provider import Cut, Malformed, Reply, Status
from probes import LONG, record, scaled
from schemathesis import GenerationMode
from schemathesis_run import fuzz, run_cli
from servers import SECRETS, new_key, open_atlas

EXAMPLES = scaled(6, 300)  # per operation and mode (valid, invalid)
# schemathesis's own runner, every phase, random: the long run only. Its coverage phase alone
# takes 5 s a server (1,500 cases for the agent API); what it found has regression tests of its
# own (tests/test_openapi.py), which the quick run has.
long_only = pytest.mark.skipif(not LONG, reason="schemathesis's runner: the long run (ATLAS_RELIABILITY_LONG=1)")
CLI_PHASES = "coverage,fuzzing,stateful"
CLI_EXAMPLES = 200
AGENT = "atlas-assistant"
# What a failing provider does, in turn with healthy replies: each maps to a documented answer
# (401 provider_auth, 429 with Retry-After, 502 provider_error, or an error event mid-stream).
# No retries (ATLAS_PROVIDER_RETRIES=0), so that each request meets the fault it was dealt.
FAULTS = (Status(401), Status(429, retry_after="60"), Status(500), Status(400), Cut(after=1), Malformed(after=1))
PROVIDERS = ["healthy", "faulty"]


def deal_faults(provider: Any, kind: str) -> dict[str, Any]:
    """Script the provider (``kind`` faulty: every other request fails, in turn); the settings
    that go with it."""
    if kind == "healthy":
        return {}
    turn = [b for fault in FAULTS for b in (Reply(), fault)]
    provider.script(*(turn * 2000))
    return {"provider_retries": 0}


def _real(operation: Any, mode: GenerationMode, names: dict[str, str], pinned_always: str) -> dict[str, Any]:
    """Pin path parameters to what exists, for valid requests (an unknown agent or another
    user's room only ever gets a 404 or a 403) and for the ``pinned_always`` method (so that its
    invalid requests are invalid in their body and headers, not only in the path)."""
    if mode is GenerationMode.POSITIVE or operation.method.upper() == pinned_always:
        found = {name: value for name, value in names.items() if f"{{{name}}}" in operation.path}
        return {"path_parameters": found} if found else {}
    return {}


def check(figures: Any, probe: str) -> None:
    record(probe, **figures.as_dict(), failure_list=figures.failures)
    assert not figures.failures, "\n\n".join(figures.failures)
    assert figures.examples >= EXAMPLES * 5  # every operation ran, not only the first few
    assert figures.statuses[200] > figures.examples / 4  # the valid requests got through


@pytest.mark.parametrize("kind", PROVIDERS)
async def test_the_agent_api_conforms_to_its_document(provider, tmp_path, kind):
    secret = "agent-secret-" + new_key("agent")
    SECRETS.add(secret)
    settings = agent_settings(provider.url, tmp_path, agent_secret=secret, **deal_faults(provider, kind))
    async with open_agent(settings) as agent:

        def pin(operation: Any, mode: GenerationMode) -> dict[str, Any]:
            pinned = _real(operation, mode, {"id": AGENT}, "POST")
            if operation.method.upper() == "POST":  # the provider it may call: the test's
                pinned["headers"] = {"X-Provider-API-URL": provider.url}
            return pinned

        figures = await trio.to_thread.run_sync(partial(
            fuzz, f"{agent.url}/openapi.json", agent.url, max_examples=EXAMPLES, derandomize=not LONG,
            headers={"X-Atlas-Agent-Secret": secret}, fixed=pin, provider_faults=kind == "faulty",
        ))
    check(figures, f"schemathesis agent API, {kind} provider")


@asynccontextmanager
async def open_gateway(provider: Any, tmp_path: Any, agent: str, kind: str = "healthy") -> AsyncIterator[Any]:
    """The gateway with one user, ``alice``, and its agent in-process or remote (``atlas agent``
    behind ``ATLAS_AGENT_URL``, sharing a secret). No limit on failed tokens: the invalid requests
    send bad tokens from this one address."""
    faults = deal_faults(provider, kind)
    settings = {"users": {"alice": None}, "provider_url": provider.url, "auth_failures_per_minute": 0, **faults}
    if agent == "in-process":
        async with open_atlas(tmp_path, **settings) as server:
            yield server
        return
    secret = "agent-secret-" + new_key("gateway")
    SECRETS.add(secret)
    async with open_agent(agent_settings(provider.url, tmp_path / "agent", agent_secret=secret, **faults)) as remote:
        async with open_atlas(tmp_path, agent_url=remote.url, agent_secret=secret, **settings) as server:
            yield server


# A remote agent with a healthy provider adds little to the two below (the quick run is short).
@pytest.mark.parametrize(("agent", "kind"), [
    ("in-process", "healthy"), ("in-process", "faulty"), ("remote", "faulty"),
])
async def test_the_gateway_conforms_to_its_document(provider, tmp_path, agent, kind):
    async with open_gateway(provider, tmp_path, agent, kind) as server:

        def pin(operation: Any, mode: GenerationMode) -> dict[str, Any]:
            pinned = _real(operation, mode, {"room": "alice"}, "POST")
            if operation.method.upper() == "POST" and "{room}" in operation.path:
                # The proxied routes, one per mode: an event stream and JSON.
                route = "text" if mode is GenerationMode.NEGATIVE else "stream"
                pinned["query"] = {"proxy": f"/agents/{AGENT}/{route}"}
            return pinned

        figures = await trio.to_thread.run_sync(partial(
            fuzz, f"{server.url}/openapi.json", server.url, max_examples=EXAMPLES, derandomize=not LONG,
            headers={"Authorization": f"Bearer {server.tokens['alice']}"}, fixed=pin,
            provider_faults=kind == "faulty",
        ))
    check(figures, f"schemathesis gateway, {agent} agent, {kind} provider")


def check_cli(run: Any, probe: str) -> None:
    record(probe, cases=run.cases, returncode=run.returncode)
    assert run.returncode == 0, run.output
    assert run.cases > 50, run.output  # it ran: the count is of the cases it generated


@long_only
async def test_the_agent_api_passes_schemathesis_own_runner(provider, tmp_path):
    secret = "agent-secret-" + new_key("agent")
    SECRETS.add(secret)
    async with open_agent(agent_settings(provider.url, tmp_path, agent_secret=secret)) as agent:
        run = await run_cli(
            f"{agent.url}/openapi.json", f'[parameters]\n"path.id" = "{AGENT}"\n',
            headers={"X-Atlas-Agent-Secret": secret, "X-Provider-API-URL": provider.url},
            phases=CLI_PHASES, max_examples=CLI_EXAMPLES, directory=tmp_path,
        )
    check_cli(run, "schemathesis runner, agent API")


@long_only
@pytest.mark.parametrize("agent", ["in-process", "remote"])
async def test_the_gateway_passes_schemathesis_own_runner(provider, tmp_path, agent):
    async with open_gateway(provider, tmp_path, agent) as server:
        run = await run_cli(
            f"{server.url}/openapi.json",
            f'[parameters]\n"path.room" = "alice"\n"query.proxy" = "/agents/{AGENT}/stream"\n',
            headers={"Authorization": f"Bearer {server.tokens['alice']}"},
            # With ?proxy= a room route is the agent's resource, whose 405 lists the agent's
            # methods, not the room route's (tests/test_openapi.py checks the gateway's own Allow).
            exclude_checks=("allow_header_conformance",),
            phases=CLI_PHASES, max_examples=CLI_EXAMPLES, directory=tmp_path,
        )
    check_cli(run, f"schemathesis runner, gateway, {agent} agent")
