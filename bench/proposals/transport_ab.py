"""PROPOSAL support: CPU per delta of reading a provider's SSE stream through the old transport
(``lean_http.LeanTransport``, hand parsing) and the new one (``atlas.llm.transport``, h11).

    .venv/bin/python -m bench.proposals.transport_ab [--streams 50] [--deltas 150] [--rate 30] [--rounds 5] [--httpcore]

``bench.provider`` (a separate process, so only the reader's CPU is counted) serves every stream:
small chunked deltas, ``--rate`` per second each, so that nearly every socket read carries one
delta, as with a real provider. Each round reads ``--streams`` concurrent streams through each
transport in turn (the order alternates between rounds), timing ``time.process_time()`` around
the read loop; the bytes are only counted, not parsed, so the transports are all that differ.
Prints the median µs of CPU per delta of each, and new / old. ``--httpcore`` adds httpx's own
transport (``httpx.AsyncHTTPTransport``) as a third, for reference.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import trio

from atlas.llm.transport import ProviderTransport

from bench.proposals.lean_http_baseline import LeanTransport  # the hand-parsing transport h11 replaced

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = httpx.Timeout(60.0).as_dict()


async def read_stream(transport: httpx.AsyncBaseTransport, url: str, body: bytes, counts: list[int]) -> None:
    request = httpx.Request("POST", f"{url}/chat/completions", content=body, extensions={"timeout": TIMEOUT},
                            headers={"Authorization": "Bearer k", "Content-Type": "application/json"})
    response = await transport.handle_async_request(request)
    try:
        async for chunk in response.stream:  # type: ignore[union-attr]
            counts[0] += chunk.count(b"@")  # every delta's text is one "@<stamp>;"
    finally:
        await response.aclose()


async def one_round(transport: httpx.AsyncBaseTransport, url: str, body: bytes, streams: int) -> float:
    """µs of CPU per delta for ``streams`` concurrent streams, started 1/streams s apart."""
    counts = [0]
    cpu = time.process_time()
    async with trio.open_nursery() as nursery:
        for _ in range(streams):
            nursery.start_soon(read_stream, transport, url, body, counts)
            await trio.sleep(1.0 / streams)
    cpu = time.process_time() - cpu
    return cpu / max(1, counts[0]) * 1e6


async def main(args: argparse.Namespace) -> None:
    provider = await trio.lowlevel.open_process(
        [sys.executable, "-m", "bench.provider"], stdout=subprocess.PIPE, cwd=str(REPO))
    try:
        line = b""
        while not line.endswith(b"\n"):
            line += await provider.stdout.receive_some(100)  # type: ignore[union-attr]
        url = line.split()[1].decode()
        body = json.dumps({"model": "m", "stream": True, "messages": [
            {"role": "user", "content": f"bench deltas={args.deltas} rate={args.rate}"}]}).encode()
        makers: dict[str, Callable[[], httpx.AsyncBaseTransport]] = {
            "old": LeanTransport, "new": lambda: ProviderTransport(trust_env=False)}
        if args.httpcore:
            makers["httpcore"] = lambda: httpx.AsyncHTTPTransport(trust_env=False, limits=httpx.Limits(
                max_connections=1000, max_keepalive_connections=100))
        results: dict[str, list[float]] = {name: [] for name in makers}
        for name, make in makers.items():  # warm-up: imports, first connections
            async with make() as transport:
                await one_round(transport, url, body, 2)
        for index in range(args.rounds):
            order = list(makers) if index % 2 == 0 else list(reversed(makers))
            for name in order:
                async with makers[name]() as transport:
                    results[name].append(await one_round(transport, url, body, args.streams))
            print(f"round {index + 1}: " + ", ".join(f"{n} {results[n][-1]:.1f}" for n in makers),
                  flush=True)
        old, new = (statistics.median(results[name]) for name in ("old", "new"))
        print(f"{args.streams} streams x {args.deltas} deltas at {args.rate}/s, {args.rounds} rounds, "
              f"median µs CPU/delta: old (lean_http) {old:.1f}, new (h11) {new:.1f}, new/old {new / old:.2f}"
              + (f", httpcore {statistics.median(results['httpcore']):.1f}" if args.httpcore else ""))
    finally:
        provider.kill()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=50)
    parser.add_argument("--deltas", type=int, default=150)
    parser.add_argument("--rate", type=float, default=30.0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--httpcore", action="store_true", help="also httpx's own transport")
    trio.run(main, parser.parse_args())
