"""Server CPU per request, Atlas against the minimal relay: what a request costs besides its deltas.

    python -m bench.request_cost                       # warm and cold, 1 delta a request
    python -m bench.request_cost --deltas 8 --seconds 10 --profile
    python -m bench.request_cost --only cold

C clients (``--clients``, 20) send ``agent:stream`` requests of D deltas (``--deltas``; the bench
provider sends them all at once) one after another for ``--seconds``, after a second of warm-up,
against a fresh ``atlas serve`` on the bench's user store and against ``bench.relay``. Reported:
the server's CPU time per request (``/proc``, every thread) and requests served. Two shapes:

- **warm**: each client keeps one connection and one user: a request's own cost (admission, the
  provider call, the durable usage write, the frames);
- **cold**: a new connection for a new user per request, as every stream of the streaming
  scenario is: the token check, the room's load, the usage ledger's load and a first usage log
  on top;
- **proxy**: Atlas alone (the minimal relay has no HTTP side): ``POST /party/USER?proxy=/agents/
  atlas-assistant/text`` on one keep-alive connection per client, as the proxy scenario sends.

With ``--profile`` (py-spy installed) each server is recorded while measured (``--gil``):
collapsed stacks under ``bench/results/runs/<time>/``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import httpx
import trio
import trio_websocket

from bench.procs import Proc, cpu_seconds, python_module, raise_fd_limit, start_atlas_serve
from bench.users import build_store

RESULTS = Path(__file__).resolve().parent / "results"
STORE_USERS = 10_000


class Load:
    def __init__(self, url: str, pairs: list[tuple[str, str]], *, ready: bool, deltas: int) -> None:
        self.url = url.replace("http", "ws", 1)
        self.pairs = pairs
        self.ready = ready  # Atlas says ``ready`` first; the relay does not
        self.spec = f"bench deltas={deltas} rate=0"
        self.counting = False
        self.served = 0
        self.errors: list[str] = []
        self._next_user = 0

    async def run(self, clients: int, shape: str, seconds: float, on_start: object) -> None:
        client = {"cold": self._cold_client, "warm": self._warm_client, "proxy": self._proxy_client}[shape]
        async with trio.open_nursery() as nursery:
            for index in range(clients):
                nursery.start_soon(client, index)
            await trio.sleep(1.0)  # warm-up: connections made, the provider's pool filled
            self.counting = True
            on_start()  # type: ignore[operator]
            await trio.sleep(seconds)
            self.counting = False
            nursery.cancel_scope.cancel()

    async def _warm_client(self, index: int) -> None:
        await self._requests(self.pairs[index], limit=None)

    async def _cold_client(self, index: int) -> None:
        while True:
            self._next_user += 1
            await self._requests(self.pairs[self._next_user % len(self.pairs)], limit=1)

    async def _proxy_client(self, index: int) -> None:
        user, token = self.pairs[index]
        url = self.url.replace("ws", "http", 1) + f"/party/{user}?proxy=/agents/atlas-assistant/text"
        body = json.dumps({"input": self.spec}).encode()
        async with httpx.AsyncClient(headers={"authorization": f"Bearer {token}"}) as client:
            while True:
                response = await client.post(url, content=body)
                if response.status_code != 200:
                    self.errors.append(f"{response.status_code} {response.text[:200]}")
                elif self.counting:
                    self.served += 1

    async def _requests(self, pair: tuple[str, str], limit: int | None) -> None:
        user, token = pair
        async with trio_websocket.open_websocket_url(f"{self.url}/party/{user}?token={token}") as ws:
            if self.ready:
                await ws.get_message()
            sent = 0
            while limit is None or sent < limit:
                await ws.send_message(json.dumps({"type": "agent:stream", "message": self.spec, "id": f"r{sent}"}))
                sent += 1
                while True:
                    frame = await ws.get_message()
                    if '"agent:done"' in frame:
                        break
                    if '"agent:error"' in frame or frame.startswith('{"type":"error"'):
                        self.errors.append(frame[:200])
                        break
                if self.counting:
                    self.served += 1


def measure(name: str, server: Proc, url: str, pairs: list[tuple[str, str]], args: argparse.Namespace,
            shape: str, run_dir: Path) -> dict[str, float]:
    load = Load(url, pairs, ready=name == "atlas", deltas=args.deltas)
    marks: dict[str, float] = {}
    profiler = None

    def start() -> None:
        nonlocal profiler
        marks["cpu"] = cpu_seconds(server.pid)
        if args.profile:
            from bench.profile import Profiler

            profiler = Profiler(server.pid, run_dir / f"profile-{name}-{shape}.txt", rate=1000)

    trio.run(load.run, args.clients, shape, args.seconds, start)
    cpu = cpu_seconds(server.pid) - marks["cpu"]
    if profiler is not None:
        profiler.stop()
    if load.errors:
        print(f"{name}: {len(load.errors)} errors, e.g. {load.errors[0]}", file=sys.stderr)
    return {"requests": load.served, "cpu_us_per_request": cpu / max(load.served, 1) * 1e6}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--deltas", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--only", choices=("warm", "cold", "proxy"))
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    raise_fd_limit()
    run_dir = RESULTS / "runs" / f"request-cost-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir.mkdir(parents=True, exist_ok=True)
    pairs = build_store(RESULTS / "cache" / f"store-{STORE_USERS}", STORE_USERS)
    provider = Proc("provider", python_module("bench.provider"), run_dir)
    servers: list[Proc] = [provider]
    try:
        provider_url = provider.wait_line("PROVIDER ", 15).split()[1]
        data_dir = run_dir / "data"
        shutil.copytree(RESULTS / "cache" / f"store-{STORE_USERS}", data_dir)
        atlas, atlas_url = start_atlas_serve("atlas", data_dir, provider_url, run_dir)
        servers.append(atlas)
        relay = Proc("relay", python_module("bench.relay") + ["--provider", provider_url], run_dir)
        servers.append(relay)
        relay_url = relay.wait_line("RELAY ", 30).split()[1]
        shapes = [args.only] if args.only else ["warm", "cold", "proxy"]
        for shape in shapes:
            # Cold users come from the far end of the store, so no warm run has touched them.
            users = pairs[len(pairs) // 2:] if shape == "cold" else pairs
            if shape == "proxy":
                a = measure("atlas", atlas, atlas_url, users, args, shape, run_dir)
                print(f"proxy: {args.clients} clients, {args.deltas} delta(s) a request: Atlas "
                      f"{a['cpu_us_per_request']:.0f} us CPU a request ({a['requests']} requests)")
                continue
            figures = {name: measure(name, proc, url, users, args, shape, run_dir)
                       for name, proc, url in (("atlas", atlas, atlas_url), ("relay", relay, relay_url))}
            a, r = figures["atlas"], figures["relay"]
            print(f"{shape}: {args.clients} clients, {args.deltas} delta(s) a request: Atlas "
                  f"{a['cpu_us_per_request']:.0f} us CPU a request ({a['requests']} requests), minimal relay "
                  f"{r['cpu_us_per_request']:.0f} us ({r['requests']}): x{a['cpu_us_per_request'] / r['cpu_us_per_request']:.2f}, "
                  f"+{a['cpu_us_per_request'] - r['cpu_us_per_request']:.0f} us")
    finally:
        for proc in reversed(servers):
            proc.stop()
    print(f"logs: {run_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
