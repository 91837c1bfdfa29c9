"""What admission and settlement cost, and what the OpenAI-compatible endpoint adds, in one run.

    .venv/bin/python -m bench.limits [-n 200] [--streams 50] [--deltas 100] [--rate 50]
                                     [--database-url postgresql://...]

Starts the bench provider (``bench.provider``) and one ``atlas serve`` in front of it, with two
users: ``free`` (no limits) and ``capped`` (every limit set, high enough never to refuse, so
every request goes through the whole admission step: the concurrency and per-minute counts, the
reservation against the day and the month, the lowered output cap, the settlement). Then, with
requests interleaved so that both sides see the same conditions:

1. time to first token through ``POST /v1/chat/completions`` (streamed) minus the same request
   straight to the provider just before it, for ``free`` and ``capped``;
2. time to first ``agent:delta`` over the WebSocket for ``capped`` minus ``free`` (the request
   just before), both also against the direct call;
3. Atlas's CPU per delta (``/proc``) while ``--streams`` WebSocket streams of ``--deltas`` deltas
   at ``--rate`` per second run for ``free`` users and then for ``capped`` ones, alternating
   rounds; the cost of starting and finishing each request (admission, settlement, the ledger's
   durable write) is included, spread over its deltas.

With ``--baseline-tree DIR`` (another checkout of Atlas, e.g. ``git worktree add --detach
/tmp/atlas-base main``), a second ``atlas serve`` runs that tree's code on a copy of the same data,
and the run also reports what this tree adds over it for a user without limits: first token over
the WebSocket (paired, alternating) and CPU per delta (alternating rounds). That is the cost of
the admission step itself, which every request now passes, limits or not.

With ``--database-url`` (a PostgreSQL database of the bench's own: its ``free*`` and ``capped*``
users are replaced), ``atlas serve`` keeps its store there, so ``capped`` requests are admitted
by the database's ledger (a transaction under a per-user lock) and every request is settled in
it: limits on minus off is then the cost of admission on PostgreSQL.

Prints a table and writes ``bench/results/limits-<time>.json``. Targets: /v1 adds <= 1 ms p50 to
the first token; limits on add <= 0.1 ms p50 to the first token.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

if __package__ in (None, ""):  # run as a file: python bench/limits.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "bench"

from bench import procs as bench_procs  # noqa: E402
from bench.netclient import HttpConnection, open_websocket  # noqa: E402
from bench.procs import REPO, Proc, atlas_command, cpu_seconds, python_module, raise_fd_limit  # noqa: E402

RESULTS = REPO / "bench" / "results"
STAMP = re.compile(rb"@([0-9]+\.[0-9]+);")
SPEC = "bench deltas=8 rate=0"
CAPPED_LIMITS = {
    "tokens_per_day": 10**12, "tokens_per_month": 10**12,
    "requests_per_minute": 10**6, "concurrent_requests": 10**4,
}


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))]


def summary(values: list[float]) -> dict[str, float]:
    return {"p50": pct(values, 50), "p90": pct(values, 90), "p99": pct(values, 99), "n": len(values)}


def make_users(
    data_dir: Path, streams: int, database_url: str | None = None
) -> dict[str, list[tuple[str, str]]]:
    from atlas.config import Settings
    from atlas.store import store_for
    from atlas.store.users import create_user, set_limits

    store = store_for(Settings(data_dir=data_dir, database_url=database_url))
    store.prepare()
    users: dict[str, list[tuple[str, str]]] = {"free": [], "capped": []}
    try:
        for kind in users:
            for index in range(max(1, streams // 10)):
                user = f"{kind}{index:03d}"
                store.remove_user(user)  # a database's users from an earlier run
                users[kind].append((user, create_user(store, user, f"bench-key-{user}", None)))
                if kind == "capped":
                    set_limits(store, user, dict(CAPPED_LIMITS))
    finally:
        store.close()
    return users


def ws_url(base: str, user: str, token: str) -> str:
    return f"ws://{urlsplit(base).netloc}/parties/main/{quote(user)}?token={quote(token)}"


async def wait_type(ws: Any, kind: str, timeout: float = 10.0) -> tuple[Any, float]:
    deadline = time.monotonic() + timeout
    while True:
        message, t = await ws.receive(max(0.001, deadline - time.monotonic()))
        if message.get("type") == kind:
            return message, t
        if message.get("type") in ("agent:error", "error"):
            raise RuntimeError(f"server error: {message}")


class Direct:
    """The same streamed request straight to the provider: time to its first body bytes."""

    def __init__(self, provider: str) -> None:
        parts = urlsplit(provider)
        self.path = parts.path + "/chat/completions"
        self.body = json.dumps({
            "model": "bench", "stream": True, "messages": [{"role": "user", "content": SPEC}],
        }).encode()
        self.connection = HttpConnection(parts.hostname or "127.0.0.1", parts.port or 80)

    async def first_ms(self) -> float:
        first: list[float] = []
        t0 = time.monotonic()
        status, _ = await self.connection.request("POST", self.path, self.body,
                                                  {"authorization": "Bearer bench"}, first.append)
        assert status == 200, status
        return (first[0] - t0) * 1000


async def v1_first_ms(connection: HttpConnection, token: str) -> float:
    first: list[float] = []
    body = json.dumps({"model": "bench", "stream": True,
                       "messages": [{"role": "user", "content": SPEC}]}).encode()
    t0 = time.monotonic()
    status, reply = await connection.request("POST", "/v1/chat/completions", body,
                                             {"authorization": f"Bearer {token}"}, first.append)
    if status != 200:
        raise RuntimeError(f"/v1 answered {status}: {reply[:200]!r}")
    return (first[0] - t0) * 1000


async def ws_first_ms(ws: Any, index: int) -> float:
    request = json.dumps({"type": "agent:stream", "message": SPEC, "id": f"r{index}"}).encode()
    t0 = time.monotonic()
    ws.send(request)
    _, t_delta = await wait_type(ws, "agent:delta")
    await wait_type(ws, "agent:done")
    return (t_delta - t0) * 1000


async def first_tokens(url: str, provider: str, users: dict[str, list[tuple[str, str]]],
                       count: int, warmup: int) -> dict[str, Any]:
    direct = Direct(provider)
    parts = urlsplit(url)
    http = {kind: HttpConnection(parts.hostname or "127.0.0.1", parts.port or 80) for kind in users}
    sockets = {}
    for kind, pairs in users.items():
        sockets[kind] = await open_websocket(ws_url(url, *pairs[0]))
        await wait_type(sockets[kind], "ready")
    samples: dict[str, list[float]] = {k: [] for k in (
        "direct_ms", "v1_free_ms", "v1_capped_ms", "ws_free_ms", "ws_capped_ms",
        "v1_free_added_ms", "v1_capped_added_ms", "ws_free_added_ms", "ws_capped_added_ms",
        "ws_limits_added_ms", "v1_limits_added_ms",
    )}
    for i in range(warmup + count):
        # Alternate which side goes first, so that neither always follows the other.
        order = ("free", "capped") if i % 2 else ("capped", "free")
        measured: dict[str, float] = {}
        for kind in order:
            base = await direct.first_ms()
            v1 = await v1_first_ms(http[kind], users[kind][0][1])
            base_ws = await direct.first_ms()
            ws = await ws_first_ms(sockets[kind], i)
            measured[f"v1_{kind}"] = v1 - base
            measured[f"ws_{kind}"] = ws - base_ws
            if i >= warmup:
                samples["direct_ms"] += [base, base_ws]
                samples[f"v1_{kind}_ms"].append(v1)
                samples[f"ws_{kind}_ms"].append(ws)
                samples[f"v1_{kind}_added_ms"].append(v1 - base)
                samples[f"ws_{kind}_added_ms"].append(ws - base_ws)
        if i >= warmup:
            samples["ws_limits_added_ms"].append(measured["ws_capped"] - measured["ws_free"])
            samples["v1_limits_added_ms"].append(measured["v1_capped"] - measured["v1_free"])
    for ws in sockets.values():
        ws.close()
    for connection in (*http.values(), direct.connection):
        connection.close()
    return samples


async def stream_round(url: str, pairs: list[tuple[str, str]], streams: int, deltas: int,
                       rate: float, pid: int) -> dict[str, float]:
    spec = f"bench deltas={deltas} rate={rate}"
    sockets = []
    for index in range(streams):
        ws = await open_websocket(ws_url(url, *pairs[index % len(pairs)]))
        await wait_type(ws, "ready")
        sockets.append(ws)
    received = 0

    async def one(ws: Any, index: int) -> None:
        nonlocal received
        ws.send(json.dumps({"type": "agent:stream", "message": spec, "id": f"s{index}"}).encode())
        while True:
            message, _ = await ws.receive(30)
            kind = message.get("type")
            if kind == "agent:delta":
                received += len(STAMP.findall(message["text"].encode()))
            elif kind == "agent:done":
                return
            elif kind in ("agent:error", "error"):
                raise RuntimeError(f"server error: {message}")

    cpu0, t0 = cpu_seconds(pid), time.monotonic()
    await asyncio.gather(*(one(ws, i) for i, ws in enumerate(sockets)))
    cpu1, t1 = cpu_seconds(pid), time.monotonic()
    for ws in sockets:
        ws.close()
    return {"cpu_us_per_delta": (cpu1 - cpu0) * 1e6 / max(1, received), "deltas": received,
            "seconds": t1 - t0}


def row(name: str, values: list[float], target: str = "") -> str:
    s = summary(values)
    return f"{name:<44} {s['p50']:>8.3f} {s['p90']:>8.3f} {s['p99']:>8.3f}  {target}"


async def against_baseline(url: str, base_url: str, provider: str, pair: tuple[str, str], count: int,
                           warmup: int) -> dict[str, list[float]]:
    """First token over the WebSocket, this tree and the baseline tree alternately (same user,
    no limits), each minus the direct call just before it."""
    direct = Direct(provider)
    sockets = {}
    for name, base in (("this", url), ("baseline", base_url)):
        sockets[name] = await open_websocket(ws_url(base, *pair))
        await wait_type(sockets[name], "ready")
    samples: dict[str, list[float]] = {"this_added_ms": [], "baseline_added_ms": [], "this_minus_baseline_ms": []}
    for i in range(warmup + count):
        added = {}
        for name in (("this", "baseline") if i % 2 else ("baseline", "this")):
            base = await direct.first_ms()
            added[name] = await ws_first_ms(sockets[name], i) - base
        if i >= warmup:
            samples["this_added_ms"].append(added["this"])
            samples["baseline_added_ms"].append(added["baseline"])
            samples["this_minus_baseline_ms"].append(added["this"] - added["baseline"])
    for ws in sockets.values():
        ws.close()
    direct.connection.close()
    return samples


async def run(args: argparse.Namespace, url: str, provider: str, users: dict[str, Any], pid: int,
              baseline: tuple[str, int] | None) -> dict[str, Any]:
    print(f"first token: {args.n} interleaved requests of each kind (+{args.warmup} warm-up)", file=sys.stderr)
    samples = await first_tokens(url, provider, users, args.n, args.warmup)
    if baseline is not None:
        print("first token against the baseline tree", file=sys.stderr)
        samples.update(await against_baseline(url, baseline[0], provider, users["free"][0], args.n, args.warmup))
    rounds: dict[str, list[dict[str, float]]] = {"free": [], "capped": []}
    sides: list[tuple[str, str, int]] = [("free", url, pid), ("capped", url, pid)]
    if baseline is not None:
        rounds["baseline"] = []
        sides.append(("baseline", baseline[0], baseline[1]))
    for index in range(args.rounds):
        for kind, base, server_pid in (sides if index % 2 == 0 else sides[::-1]):
            print(f"streams: round {index + 1}/{args.rounds}, {kind}", file=sys.stderr)
            pairs = users["free"] if kind == "baseline" else users[kind]
            rounds[kind].append(await stream_round(base, pairs, args.streams, args.deltas, args.rate, server_pid))
    return {"samples": samples, "rounds": rounds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", type=int, default=200, help="measured requests of each kind")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--streams", type=int, default=50)
    parser.add_argument("--deltas", type=int, default=100)
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--rounds", type=int, default=4, help="streaming rounds per side")
    parser.add_argument("--baseline-tree", type=Path, default=None, metavar="DIR",
                        help="another Atlas checkout to measure this tree against")
    parser.add_argument("--priority", type=int, metavar="NICE", nargs="?", const=-10, default=None,
                        help="run every bench process at this nice value (default -10; below 0 needs root)")
    parser.add_argument("--database-url", default=None, metavar="URL",
                        help="keep the store in this PostgreSQL database (the bench's own) instead of files")
    args = parser.parse_args(argv)
    if args.database_url and args.baseline_tree:
        parser.error("--baseline-tree runs on a copy of the data directory: not with --database-url")
    if args.priority is not None:
        bench_procs.NICE = args.priority
        os.setpriority(os.PRIO_PROCESS, 0, args.priority)
    raise_fd_limit()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    log_dir = RESULTS / "runs" / f"limits-{stamp}"
    log_dir.mkdir(parents=True, exist_ok=True)
    data_dir = Path(tempfile.mkdtemp(prefix="atlas-bench-limits-"))
    procs: list[Proc] = []
    try:
        provider_proc = Proc("provider", python_module("bench.provider"), log_dir)
        procs.append(provider_proc)
        provider = provider_proc.wait_line("PROVIDER ", 20).split()[1]
        users = make_users(data_dir, args.streams, args.database_url)
        if args.database_url:
            # For the server, through its environment: a flag shows in ps.
            os.environ["ATLAS_DATABASE_URL"] = args.database_url
        atlas = Proc("atlas", [*atlas_command(), "serve", "--bind", "127.0.0.1:0", "--data-dir",
                               str(data_dir), "--provider-url", provider, "--log-level", "warning"],
                     log_dir, stderr_lines=True)
        procs.append(atlas)
        url = atlas.wait_line("Atlas listening on ", 30, stderr=True).split("listening on ")[1].split()[0]
        baseline = None
        if args.baseline_tree is not None:
            base_dir = data_dir.with_name(data_dir.name + "-baseline")
            shutil.copytree(data_dir, base_dir)
            tree = str(args.baseline_tree.resolve())
            starter = f"import sys; sys.path.insert(0, {tree!r}); from atlas.cli.main import main; sys.exit(main())"
            base_proc = Proc("atlas-baseline", [sys.executable, "-c", starter, "serve", "--bind", "127.0.0.1:0",
                                                "--data-dir", str(base_dir), "--provider-url", provider,
                                                "--log-level", "warning"], log_dir, stderr_lines=True)
            procs.append(base_proc)
            line = base_proc.wait_line("Atlas listening on ", 30, stderr=True)
            baseline = (line.split("listening on ")[1].split()[0], base_proc.pid)
        result = asyncio.run(run(args, url, provider, users, atlas.pid, baseline))
    finally:
        for proc in reversed(procs):
            proc.stop()
        shutil.rmtree(data_dir, ignore_errors=True)
        shutil.rmtree(data_dir.with_name(data_dir.name + "-baseline"), ignore_errors=True)
    samples, rounds = result["samples"], result["rounds"]
    cpu = {kind: sorted(r["cpu_us_per_delta"] for r in rs) for kind, rs in rounds.items()}
    lines = [
        f"{'first token (ms)':<44} {'p50':>8} {'p90':>8} {'p99':>8}  target",
        row("direct to the provider", samples["direct_ms"]),
        row("/v1 added over direct, no limits", samples["v1_free_added_ms"], "<= 1 ms p50"),
        row("/v1 added over direct, limits on", samples["v1_capped_added_ms"], "<= 1 ms p50"),
        row("WebSocket added over direct, no limits", samples["ws_free_added_ms"]),
        row("WebSocket added over direct, limits on", samples["ws_capped_added_ms"]),
        row("limits on minus off, WebSocket (paired)", samples["ws_limits_added_ms"], "<= 0.1 ms p50"),
        row("limits on minus off, /v1 (paired)", samples["v1_limits_added_ms"], "<= 0.1 ms p50"),
        "",
        f"CPU per delta, {args.streams} streams x {args.deltas} deltas at {args.rate:g}/s, "
        f"{args.rounds} rounds each (µs, median of rounds; all rounds):",
        f"  no limits: {cpu['free'][len(cpu['free']) // 2]:.1f}   {[round(v, 1) for v in cpu['free']]}",
        f"  limits on: {cpu['capped'][len(cpu['capped']) // 2]:.1f}   {[round(v, 1) for v in cpu['capped']]}",
    ]
    if "baseline" in cpu:
        lines[8:8] = [
            row("baseline tree: WebSocket added over direct", samples["baseline_added_ms"]),
            row("this tree: WebSocket added over direct", samples["this_added_ms"]),
            row("this tree minus baseline, no limits (paired)", samples["this_minus_baseline_ms"]),
        ]
        lines.append(f"  baseline:  {cpu['baseline'][len(cpu['baseline']) // 2]:.1f}   "
                     f"{[round(v, 1) for v in cpu['baseline']]}")
    print("\n".join(lines))
    out = RESULTS / f"limits-{stamp}.json"
    recorded = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    if args.database_url:
        from atlas.store.postgres import redact_database_url

        recorded["database_url"] = redact_database_url(args.database_url)
    out.write_text(json.dumps({
        "args": recorded, "summary": {k: summary(v) for k, v in samples.items()},
        "cpu_us_per_delta": cpu, "rounds": rounds, "samples": samples,
    }, indent=1))
    print(f"\nwritten: {out.relative_to(REPO)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
