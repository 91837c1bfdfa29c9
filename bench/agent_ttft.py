"""Time to first token added by the agent over a direct call to the same provider.

Starts the dev provider and an agent (``serve_agent``) in front of it, each in its own
subprocess, then makes N sequential streaming requests of each kind, alternating:

    direct:  POST {provider}/chat/completions (stream)  -> first chunk with content
    agent:   POST {agent}/agents/atlas-assistant/stream -> first text-delta event

and prints median and p99 of both and of the paired difference (agent minus the direct call
just before it). Run:

    .venv/bin/python bench/agent_ttft.py [-n 200]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import trio

KEY = "sk-bench"


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))
    return ordered[index]


async def first_token(client: httpx.AsyncClient, url: str, body: dict, headers: dict, marker: bytes) -> float:
    start = time.perf_counter()
    async with client.stream("POST", url, json=body, headers=headers) as response:
        response.raise_for_status()
        elapsed = None
        async for chunk in response.aiter_bytes():
            if elapsed is None and marker in chunk:
                elapsed = time.perf_counter() - start
    assert elapsed is not None, "no token seen"
    return elapsed


async def measure(provider_url: str, agent_url: str, n: int, warmup: int) -> None:
    direct_body = {"model": "bench", "stream": True, "stream_options": {"include_usage": True},
                   "messages": [{"role": "user", "content": "hello bench"}]}
    agent_headers = {"X-Provider-API-Key": KEY, "X-Provider-API-URL": provider_url, "X-User-ID": "bench"}
    direct, via_agent = [], []
    async with httpx.AsyncClient(timeout=30) as client:
        for index in range(warmup + n):
            d = await first_token(client, f"{provider_url}/chat/completions", direct_body,
                                  {"Authorization": f"Bearer {KEY}"}, b'"content":"T')
            a = await first_token(client, f"{agent_url}/agents/atlas-assistant/stream",
                                  {"input": "hello bench"}, agent_headers, b'"text-delta"')
            if index >= warmup:
                direct.append(d)
                via_agent.append(a)
    added = [a - d for a, d in zip(via_agent, direct)]
    ms = 1000
    print(f"requests: {n} sequential of each kind (after {warmup} warm-up), dev provider, loopback")
    for name, values in (("direct to provider", direct), ("through the agent", via_agent),
                         ("added by the agent", added)):
        print(f"{name:>20}: median {statistics.median(values) * ms:7.3f} ms   "
              f"p99 {percentile(values, 99) * ms:7.3f} ms")


def spawn(role: str, *args: str) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(
        [sys.executable, __file__, "--role", role, *args], stdout=subprocess.PIPE, text=True)
    line = process.stdout.readline().strip()
    if not line.startswith("http"):
        process.kill()
        raise SystemExit(f"{role} did not start")
    return process, line


async def run_role(role: str, provider_url: str | None) -> None:
    from atlas.agent_api.server import serve_agent
    from atlas.config import Bind, Settings
    from atlas.llm.devprovider import serve_dev_provider

    async with trio.open_nursery() as nursery:
        if role == "provider":
            url = await nursery.start(serve_dev_provider)
        else:
            settings = Settings(bind=Bind("127.0.0.1", 0), provider_url=provider_url,
                                data_dir=Path("/nonexistent-atlas-bench"), log_level="WARNING")
            url = await nursery.start(serve_agent, settings)
        print(url, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--role", choices=["provider", "agent"])
    parser.add_argument("--provider-url")
    args = parser.parse_args()
    if args.role:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        trio.run(run_role, args.role, args.provider_url)
        return
    provider, provider_url = spawn("provider")
    agent = None
    try:
        agent, agent_url = spawn("agent", "--provider-url", provider_url)
        trio.run(measure, provider_url, agent_url, args.n, args.warmup)
    finally:
        for process in (agent, provider):
            if process is not None:
                process.terminate()
                process.wait(timeout=10)


if __name__ == "__main__":
    main()
