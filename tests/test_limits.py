"""Limits under load, on a real server: no concurrency can make the provider bill past the
budget, the budget is used up, no exit path leaks a reservation, and a crash loses no usage a
client was told about."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from functools import partial

import httpx
import pytest
import trio
from fake_provider import Bill, Cut, Stall, Status, prompt_tokens
from servers import SECRETS, WAIT, add_user, atlas_command, open_atlas, start_atlas_process
from usage_helpers import (
    AGENT_CAP,
    INSTRUCTIONS,
    Clock,
    ledger_file,
    open_requests,
    proxy_text,
    write_agents,
)

from atlas.agent_api.server import serve_agent
from atlas.config import Settings, parse_bind
from atlas.gateway.admission import PER_MESSAGE_TOKENS, PER_REQUEST_TOKENS


PROXIED_HELLO = b'{"input": "hello"}'
AGENT_SECRET = "agent-secret-for-limit-tests-0123456789"
SECRETS.add(AGENT_SECRET)


def worst_case(message: str) -> int:
    """What admission reserves for one test-agent request of ``message`` (see usage_helpers)."""
    return (len(message.encode()) + len(INSTRUCTIONS.encode()) + 2 * PER_MESSAGE_TOKENS
            + PER_REQUEST_TOKENS + AGENT_CAP)


def billed_per_request(provider) -> int:
    body = provider.completions()[0].body
    return prompt_tokens(body) + AGENT_CAP


async def test_100_concurrent_requests_never_bill_past_the_budget(tmp_path, provider):
    """Five WebSocket connections (16 requests each) and 20 proxied requests, all at once."""
    provider.behaviour = Bill(tokens=40)  # cut at the agent's cap (16) by max_tokens
    write_agents(tmp_path / "data")
    budget = 10 * 46  # about ten requests' real usage (30 prompt + 16 completion)
    # Requests that find the budget held by others wait for it (long enough here that a busy
    # machine cannot turn the wait into rate_limited refusals: the outcome is the budget's alone).
    async with open_atlas(tmp_path, users={"alice": None}, provider_url=provider.url, provider_retries=0,
                          limit_tokens_per_day=budget, max_requests_per_connection=32,
                          limit_wait_seconds=WAIT) as server:
        token = server.tokens["alice"]
        finals: list[dict] = []
        statuses: list[int] = []

        async def websocket_burst() -> None:
            async with open_requests(server.ws_url("alice", token)) as client:
                ids = [await client.send(f"hello {n}") for n in range(16)]
                for request_id in ids:
                    finals.append(await client.wait(request_id))

        async def proxied(http: httpx.AsyncClient) -> None:
            response = await proxy_text(http, server.url, "alice", token)
            statuses.append(response.status_code)
            if response.status_code != 200:
                error = response.json()["error"]
                assert error["code"] in ("quota_exceeded", "rate_limited"), error
                if error["code"] == "quota_exceeded":
                    assert response.status_code == 402 and error["resetAt"]
                else:
                    assert response.status_code == 429 and response.headers["retry-after"]

        async with httpx.AsyncClient(timeout=WAIT) as http, trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(websocket_burst)
            for _ in range(20):
                nursery.start_soon(proxied, http)

    served = sum(f["type"] == "agent:done" for f in finals) + statuses.count(200)
    refused = [f["error"] for f in finals if f["type"] == "agent:error"]
    assert len(finals) + len(statuses) == 100
    assert all(e["code"] in ("quota_exceeded", "rate_limited") for e in refused), refused
    assert provider.billed() <= budget
    assert served >= 1
    assert len(provider.completions()) == served  # no refused request reached the provider
    assert provider.billed() > budget - 2 * worst_case("hello 99")  # the budget is used, not wasted
    assert all(e["code"] == "quota_exceeded" for e in refused)  # refused only once it was spent
    day = ledger_file(server.data_dir, "alice")["days"][0]
    assert day["requests"] == served and day["totalTokens"] == provider.billed()


async def test_sequential_requests_use_the_budget_up_and_never_more(tmp_path, provider):
    provider.behaviour = Bill(tokens=40)
    write_agents(tmp_path / "data")
    budget = 1000
    async with open_atlas(tmp_path, users={"alice": None}, provider_url=provider.url,
                          limit_tokens_per_day=budget) as server:
        async with open_requests(server.ws_url("alice", server.tokens["alice"])) as client:
            for _ in range(100):
                final = await client.ask("hello")
                if final["type"] != "agent:done":
                    break
    error = final["error"]
    assert error["code"] == "quota_exceeded", error
    assert error["resetAt"].endswith("T00:00:00Z")
    assert error["limit"] == "tokensPerDay"
    billed = provider.billed()
    assert billed <= budget
    assert budget - billed < worst_case("hello") + billed_per_request(provider)  # within a request or two
    caps = [r.body["max_tokens"] for r in provider.completions()]
    assert caps[0] == AGENT_CAP and min(caps) >= 1  # the last ones may have had a lowered cap


async def test_a_lowered_cap_is_what_the_provider_is_sent(tmp_path, provider):
    provider.behaviour = Bill(tokens=40)
    write_agents(tmp_path / "data")
    budget = worst_case("hi") - 10  # room for the prompt and AGENT_CAP - 10 tokens of reply
    async with open_atlas(tmp_path, users={"alice": None}, provider_url=provider.url,
                          limit_tokens_per_day=budget) as server:
        async with open_requests(server.ws_url("alice", server.tokens["alice"])) as client:
            assert (await client.ask("hi"))["type"] == "agent:done"
    assert provider.completions()[0].body["max_tokens"] == AGENT_CAP - 10


async def test_limits_hold_with_a_remote_agent(tmp_path, provider):
    """The two-process layout: admission learns the agent's prompt size and output cap from its
    description, and the proxied stream's usage is read from its finish event."""
    provider.behaviour = Bill(tokens=40)
    agents_file = write_agents(tmp_path / "agent-data")
    agent_settings = Settings(data_dir=tmp_path / "agent-data", bind=parse_bind("127.0.0.1:0"),
                              provider_url=provider.url, agents_file=agents_file, agent_secret=AGENT_SECRET)
    async with trio.open_nursery() as nursery:
        agent_url = await nursery.start(partial(serve_agent, agent_settings))
        first_bill = prompt_tokens({"messages": [{"content": INSTRUCTIONS}, {"content": "hello"}]}) + AGENT_CAP
        # A proxied request's prompt is bounded by its whole body; leave 5 tokens less than the
        # second request's worst case, so that its cap must be lowered by 5.
        budget = first_bill + worst_case("hello") + len(PROXIED_HELLO) - len(b"hello") - 5
        async with open_atlas(tmp_path, users={"alice": None}, agent_url=agent_url, agent_secret=AGENT_SECRET,
                              provider_urls=(provider.url,), limit_tokens_per_day=budget) as server:
            token = server.tokens["alice"]
            async with open_requests(server.ws_url("alice", token)) as client:
                assert (await client.ask())["type"] == "agent:done"
            async with httpx.AsyncClient(timeout=WAIT) as http:
                response = await http.post(
                    f"{server.url}/party/alice?proxy=/agents/atlas-assistant/stream", content=PROXIED_HELLO,
                    headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
                assert response.status_code == 200 and '"finish"' in response.text
                usage = (await http.get(f"{server.url}/party/alice/usage",
                                        headers={"Authorization": f"Bearer {token}"})).json()
        nursery.cancel_scope.cancel()
    first, second = provider.completions()
    assert first.body["max_tokens"] == AGENT_CAP  # the agent's own cap, learned from its description
    assert second.body["max_tokens"] == AGENT_CAP - 5  # lowered: the settled budget left less
    assert usage["days"][0]["requests"] == 2
    assert usage["days"][0]["totalTokens"] == provider.billed() <= budget


async def test_no_reservation_leaks_whatever_ends_a_request(tmp_path, provider):
    """Cancel and fail requests at every stage, then a request that needs the whole remaining
    budget is admitted at once (no wait allowed): nothing is still held."""
    write_agents(tmp_path / "data")
    clock = Clock()
    budget = 5000
    async with open_atlas(tmp_path, users={"alice": None}, provider_url=provider.url, provider_retries=0,
                          provider_timeout=30.0, limit_tokens_per_day=budget, limit_wait_seconds=0,
                          clock=clock) as server:
        token = server.tokens["alice"]
        url = server.ws_url("alice", token)
        async with open_requests(url) as client, httpx.AsyncClient(timeout=WAIT) as http:
            # 1. The provider refuses (429, 500): never answered, costs nothing.
            provider.script(Status(429), Status(500))
            for _ in range(2):
                assert (await client.ask())["error"]["code"] in ("provider_rate_limited", "provider_error")
            # 2. The provider never answers; the client cancels.
            provider.script(Stall(after_headers=False))
            request_id = await client.send()
            await provider.wait_requests(3)
            await client.ws.send_message(json.dumps({"type": "agent:cancel", "id": request_id}))
            assert (await client.wait(request_id))["error"]["code"] == "cancelled"
            # 3. Cancelled mid-stream.
            gate = trio.Event()
            provider.script(Bill(tokens=10, gate=gate, hold_after=2))
            request_id = await client.send()
            await client.wait_frame(lambda f: f.get("id") == request_id and f["type"] == "agent:delta")
            await client.ws.send_message(json.dumps({"type": "agent:cancel", "id": request_id}))
            assert (await client.wait(request_id))["error"]["code"] == "cancelled"
            # 4. The stream breaks mid-way.
            provider.script(Cut(after=2))
            assert (await client.ask())["error"]["code"] == "provider_error"
            # 5. A bad option: refused by the agent before any provider call.
            bad = await client.ask(options={"temperature": "hot"})
            assert bad["error"]["code"] == "bad_message"
            # 6. The connection drops mid-stream.
            gate2 = trio.Event()
            provider.script(Bill(tokens=10, gate=gate2, hold_after=2))
            async with open_requests(url) as doomed:
                request_id = await doomed.send()
                await doomed.wait_frame(lambda f: f.get("id") == request_id and f["type"] == "agent:delta")
            await provider.wait_disconnect()
            # 7. A proxied stream whose client goes away mid-stream, and a proxied /text
            #    refused by the provider.
            gate3 = trio.Event()
            provider.script(Bill(tokens=10, gate=gate3, hold_after=2), Status(401))
            async with http.stream(
                "POST", f"{server.url}/party/alice?proxy=/agents/atlas-assistant/stream",
                content=PROXIED_HELLO,
                headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
            ) as response:
                async for chunk in response.aiter_bytes():
                    if b"text-delta" in chunk:
                        break
            streamed = provider.completions()[-1]
            await provider.wait_until(lambda: streamed.disconnected)
            assert (await proxy_text(http, server.url, "alice", token)).status_code == 401

            # Four requests were answered and then interrupted (3, 4, 6, 7): each costs its
            # worst case, as no usage was reported; everything else costs nothing. Settlement
            # follows the provider's close, so wait for the ledger to say so. (A proxied
            # request's prompt is bounded by its whole body.)
            proxied_extra = len(PROXIED_HELLO) - len(b"hello")
            expected = 4 * worst_case("hello") + proxied_extra
            with trio.fail_after(WAIT):
                while True:
                    usage = await client.usage()
                    if usage["days"] and usage["days"][0]["totalTokens"] >= expected:
                        break
            assert usage["days"][0]["totalTokens"] == expected
            assert usage["days"][0]["requests"] == 4
            remaining = budget - expected
            assert usage["remaining"] == {"tokensToday": remaining}
            provider.behaviour = Bill(tokens=40)
            want = remaining - (worst_case("hello") - AGENT_CAP)
            final = await client.ask(options={"maxOutputTokens": want})
            assert final["type"] == "agent:done", final  # with wait 0, any leak is rate_limited
    assert provider.completions()[-1].body["max_tokens"] == want


async def test_rate_and_concurrency_limits_over_every_path(tmp_path, provider):
    write_agents(tmp_path / "data")
    clock = Clock()
    gate = trio.Event()
    provider.behaviour = Bill(tokens=5, gate=gate, hold_after=1)
    async with open_atlas(tmp_path, users={"alice": None}, provider_url=provider.url,
                          limit_concurrent_requests=1, limit_requests_per_minute=3, clock=clock) as server:
        token = server.tokens["alice"]
        async with open_requests(server.ws_url("alice", token)) as client, \
                httpx.AsyncClient(timeout=WAIT) as http:
            first = await client.send()
            await provider.wait_requests(1)
            second = await client.ask()
            assert second["error"]["code"] == "rate_limited" and second["error"]["retryAfter"] == 1
            proxied = await proxy_text(http, server.url, "alice", token)
            assert proxied.status_code == 429 and proxied.headers["retry-after"] == "1"
            assert proxied.json()["error"]["code"] == "rate_limited"
            gate.set()
            assert (await client.wait(first))["type"] == "agent:done"
            # Per minute: 3 admitted in this minute (the refused ones do not count).
            assert (await client.ask())["type"] == "agent:done"
            assert (await proxy_text(http, server.url, "alice", token)).status_code == 200
            over = await client.ask()
            assert over["error"]["code"] == "rate_limited" and 1 <= over["error"]["retryAfter"] <= 60
            clock.advance(61)
            assert (await client.ask())["type"] == "agent:done"
    assert len(provider.completions()) == 4


async def test_kill_9_mid_burst_loses_no_usage_a_client_saw(tmp_path, provider):
    """``atlas serve`` as a process, killed with SIGKILL while requests stream: after a restart,
    the ledger holds every request whose agent:done reached a client."""
    provider.behaviour = Bill(tokens=8)
    data_dir = tmp_path / "data"
    write_agents(data_dir)
    token = add_user(data_dir, "alice")
    env = {"ATLAS_PROVIDER_URL": provider.url, "ATLAS_LIMIT_TOKENS_PER_DAY": "1000000"}
    process = await start_atlas_process(data_dir, env=env)
    url = process.url.replace("http://", "ws://") + f"/parties/main/alice?token={token}"
    seen: list[dict] = []
    enough = trio.Event()
    try:
        async with trio.open_nursery() as nursery:
            async def burst() -> None:
                try:
                    async with open_requests(url) as client:
                        for n in range(40):
                            final = await client.ask(f"message {n}")
                            if final["type"] == "agent:done":
                                seen.append(final)
                                if len(seen) >= 30:
                                    enough.set()
                except Exception:
                    pass  # the server died under us: that is the point

            for _ in range(4):
                nursery.start_soon(burst)
            with trio.fail_after(WAIT):
                await enough.wait()
            os.kill(process.process.pid, signal.SIGKILL)
    finally:
        process.process.wait(WAIT)
    assert process.process.returncode == -signal.SIGKILL
    told = len(seen)
    told_tokens = sum(f["usage"]["totalTokens"] for f in seen)

    restarted = await start_atlas_process(data_dir, env=env)
    try:
        result = subprocess.run(atlas_command("usage", "alice", "--json", "--since", "2000-01-01",
                                              "--data-dir", str(data_dir)),
                                capture_output=True, text=True, timeout=30)
        async with httpx.AsyncClient(timeout=WAIT) as http:
            served = (await http.get(f"{restarted.url}/party/alice/usage",
                                     headers={"Authorization": f"Bearer {token}"})).json()
    finally:
        restarted.terminate()
    day = json.loads(result.stdout)["days"][0]
    assert day == served["days"][0]
    assert day["requests"] >= told and day["totalTokens"] >= told_tokens
    # Everything in the ledger reached the provider; nothing was invented.
    assert day["totalTokens"] <= provider.billed()


@pytest.mark.parametrize("bad", ["--tokens-per-day=lots", "--limit-wait-seconds=-1"])
def test_bad_limit_settings_are_named(tmp_path, bad):
    flag = bad.replace("--tokens-per-day", "--limit-tokens-per-day")
    result = subprocess.run(atlas_command("serve", "--data-dir", str(tmp_path), flag),
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert flag.split("=")[0] in result.stderr
