"""Limits across processes: several ``atlas serve`` subprocesses sharing one PostgreSQL database,
one user's requests spread over all of them at once. The paths are those any process may serve
(``/v1/chat/completions`` and ``?proxy=`` to the agent): no room is owned by one process.

The provider (tests/fake_provider.py, ``Bill``) bills like a real one and honours the output cap,
so what it billed is what the user spent."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import psycopg
import trio
from fake_provider import Bill
from servers import WAIT, AtlasProcess, add_user, start_atlas_process
from usage_helpers import AGENT_CAP, write_agents

V1_CAP = AGENT_CAP  # the /v1 requests ask for as many tokens as the test agent's cap


@asynccontextmanager
async def open_processes(
    tmp_path: Path, count: int, database_url: str, provider_url: str, limits: dict[str, str]
) -> AsyncIterator[list[AtlasProcess]]:
    """``count`` ``atlas serve`` processes on one database, each with a data directory of its own
    (its agents file), stopped at the end."""
    env = {"ATLAS_DATABASE_URL": database_url, "ATLAS_PROVIDER_URL": provider_url,
           "ATLAS_PROVIDER_RETRIES": "0", **limits}
    processes: list[AtlasProcess] = []
    try:
        for n in range(count):
            data_dir = tmp_path / f"process{n}" / "data"
            write_agents(data_dir)
            processes.append(await start_atlas_process(data_dir, env=env))
        yield processes
    finally:
        for process in processes:
            if process.process.poll() is None:
                process.terminate()


def ledger_days(database_url: str, user: str) -> list[tuple[int, int]]:
    with psycopg.connect(database_url) as conn:
        return conn.execute("SELECT requests, total_tokens FROM usage_days WHERE user_id = %s",
                            (user,)).fetchall()


def v1_body(n: int, *, stream: bool) -> dict:
    return {"model": "test-model", "messages": [{"role": "user", "content": f"hello {n}"}],
            "max_tokens": V1_CAP, "stream": stream}


async def test_a_token_budget_shared_by_requests_over_three_processes_is_never_overspent(
    tmp_path, provider, postgres_url
):
    """60 requests at once, round robin over three processes and three kinds (/v1 streamed, /v1
    whole, proxied /text), against a daily budget worth about ten of them."""
    provider.behaviour = Bill(tokens=40)  # cut at the cap (16) by max_tokens
    token = add_user(tmp_path / "users", "alice", database_url=postgres_url)
    budget = 10 * 30  # a request here bills 25 to 40 tokens
    # Waits long enough that a busy machine cannot turn a wait into a rate_limited refusal: the
    # outcome is the budget's alone.
    limits = {"ATLAS_LIMIT_TOKENS_PER_DAY": str(budget), "ATLAS_LIMIT_WAIT_SECONDS": "30"}
    outcomes: list[tuple[int, int, dict]] = []  # (process, status, error or {})
    async with open_processes(tmp_path, 3, postgres_url, provider.url, limits) as processes:
        headers = {"Authorization": f"Bearer {token}"}

        async def one(http: httpx.AsyncClient, n: int) -> None:
            base = processes[n % 3].url
            kind = (n // 3) % 3
            if kind == 2:
                response = await http.post(f"{base}/party/alice?proxy=/agents/atlas-assistant/text",
                                           json={"input": f"hello {n}"}, headers=headers)
            else:
                response = await http.post(f"{base}/v1/chat/completions", json=v1_body(n, stream=kind == 0),
                                           headers=headers)
            error = {}
            if response.status_code != 200:
                error = response.json()["error"]
            elif kind == 0:
                assert response.text.rstrip().endswith("data: [DONE]"), response.text
            outcomes.append((n % 3, response.status_code, error))

        async with httpx.AsyncClient(timeout=60) as http, trio.open_nursery() as nursery:
            for n in range(60):
                nursery.start_soon(one, http, n)

    served = [o for o in outcomes if o[1] == 200]
    refused = [o for o in outcomes if o[1] != 200]
    assert len(outcomes) == 60
    assert all((status, error["code"]) == (402, "quota_exceeded") for _, status, error in refused), refused
    assert provider.billed() <= budget
    assert len(served) >= 1
    assert len(provider.completions()) == len(served)  # no refused request reached the provider
    assert provider.billed() > budget - 2 * 160  # used, not wasted: less than two worst cases left
    assert ledger_days(postgres_url, "alice") == [(len(served), provider.billed())]
    with psycopg.connect(postgres_url) as conn:  # nothing left held
        assert conn.execute("SELECT count(*) FROM reservations").fetchone() == (0,)


async def test_request_counts_hold_across_two_processes(tmp_path, provider, postgres_url):
    gate = trio.Event()
    provider.behaviour = Bill(tokens=5, gate=gate, hold_after=1)
    token = add_user(tmp_path / "users", "alice", database_url=postgres_url)
    headers = {"Authorization": f"Bearer {token}"}
    limits = {"ATLAS_LIMIT_CONCURRENT_REQUESTS": "1", "ATLAS_LIMIT_REQUESTS_PER_MINUTE": "3"}
    async with open_processes(tmp_path, 2, postgres_url, provider.url, limits) as (first, second), \
            httpx.AsyncClient(timeout=WAIT) as http:

        async def ask(process: AtlasProcess, n: int) -> httpx.Response:
            return await http.post(f"{process.url}/v1/chat/completions", json=v1_body(n, stream=True),
                                   headers=headers)

        held: list[httpx.Response] = []

        async def held_request() -> None:
            held.append(await ask(first, 0))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(held_request)
            await provider.wait_requests(1)  # in flight on the first process
            over = await ask(second, 1)
            assert over.status_code == 429 and over.headers["retry-after"] == "1"
            error = over.json()["error"]
            assert error["code"] == "rate_limited" and "at once" in error["message"]
            proxied = await http.post(f"{second.url}/party/alice?proxy=/agents/atlas-assistant/text",
                                      json={"input": "hi"}, headers=headers)
            assert proxied.status_code == 429
            gate.set()
        assert held[0].status_code == 200

        # Per minute: three admitted in this minute, by either process (the refused ones do not
        # count); the fourth is refused by whichever process gets it.
        assert (await ask(second, 2)).status_code == 200
        assert (await ask(first, 3)).status_code == 200
        over = await ask(second, 4)
        assert over.status_code == 429 and 1 <= int(over.headers["retry-after"]) <= 60
        assert "per minute" in over.json()["error"]["message"]
        assert (await ask(first, 5)).status_code == 429
        with psycopg.connect(postgres_url, autocommit=True) as conn:  # a minute passes
            conn.execute("UPDATE admissions SET at = at - interval '61 seconds'")
        assert (await ask(second, 6)).status_code == 200
    assert len(provider.completions()) == 4
    assert ledger_days(postgres_url, "alice")[0][0] == 4
