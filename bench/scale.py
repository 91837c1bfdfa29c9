"""``python -m bench --only scale``: Atlas as several processes on one PostgreSQL database.

Needs PostgreSQL's server binaries and HAProxy, as the tests do (``scripts/install-test-deps.sh``),
and reuses the tests' harness for them (``tests/pg_cluster.py``: a throwaway cluster in a temp
dir; ``tests/haproxy_proc.py``: HAProxy from ``deploy/haproxy.cfg`` with the ports put in). The
bench's users (the same ids and tokens as the JSON store) are copied into the database.

Measured in one run:
- start-up (spawn to the first ``/healthz`` answer) with every bench user in PostgreSQL, next to an
  empty database, and the first connection of cold users (token looked up in the database, room
  lease taken, room loaded) next to the same users warm;
- streaming capacity and server CPU per delta (the streaming scenario's method: levels in turns,
  then bisection) of one process alone, the same process behind HAProxy, and two processes behind
  HAProxy: what the balancer costs and what a second process buys on this machine. CPU per delta
  adds up the Atlas processes; HAProxy's own CPU per delta is shown beside it. Each configuration
  streams to users of its own, so no room is owned by a process of another configuration.
"""

from __future__ import annotations

import shutil
import sys
import time
import urllib.error
import urllib.request
from typing import TYPE_CHECKING, Any

from bench.procs import REPO, BenchError, Proc, start_atlas_serve

if TYPE_CHECKING:
    from bench.run import Bench

CONFIGS = {  # kind -> how the table names it
    "alone": "1 process",
    "haproxy-1": "1 process behind HAProxy",
    "haproxy-2": "2 processes behind HAProxy",
}
HEALTH_CHECK = "inter 2s fall 2 rise 2"  # deploy/haproxy.cfg's own


def _harness() -> tuple[Any, Any, Any, Any]:
    tests = str(REPO / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    from haproxy_proc import HAProxy, deploy_config
    from pg_cluster import PostgresCluster, find_bin_dir

    return PostgresCluster, find_bin_dir, HAProxy, deploy_config


def load_users(url: str, pairs: list[tuple[str, str]]) -> float:
    """The bench users into the database (schema first); seconds taken."""
    import psycopg

    from atlas.store import hash_token
    from atlas.store.postgres import PostgresStore

    started = time.monotonic()
    store = PostgresStore(url)
    store.prepare()
    store.close()
    now = time.time()
    with psycopg.connect(url) as conn, conn.cursor() as cursor:
        with cursor.copy("COPY users (id, virtual_key, provider_url, token_hash, created_at) FROM STDIN") as copy:
            for index, (user, token) in enumerate(pairs):
                copy.write_row((user, f"bench-key-{index:06d}", None, hash_token(token), now))
        with cursor.copy("COPY tokens (hash, user_id) FROM STDIN") as copy:
            for user, token in pairs:
                copy.write_row((hash_token(token), user))
        cursor.execute("ANALYZE")
    return time.monotonic() - started


def start_atlas(bench: Bench, database_url: str, label: str) -> tuple[Proc, str, float]:
    """``atlas serve`` on the database; it, its URL, and the seconds until ``/healthz`` answered."""
    data_dir = bench.work / f"data-{label}"
    data_dir.mkdir(exist_ok=True)
    proc, url = start_atlas_serve(f"atlas-scale-{label}", data_dir, bench.provider_url, bench.log_dir,
                                  "--database-url", database_url, timeout=60)
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=10) as response:
                response.read()
            break
        except urllib.error.HTTPError as exc:  # 503 until its database session is up
            if time.monotonic() > deadline:
                raise BenchError(f"{proc.name}: /healthz still answers {exc.code}") from None
            time.sleep(0.01)
    return proc, url, time.monotonic() - proc.started


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def run_scale(bench: Bench) -> None:
    from bench.run import SERVER_NAMES, Row, progress, summary

    PostgresCluster, find_bin_dir, HAProxy, deploy_config = _harness()
    from servers import free_port

    bin_dir = find_bin_dir()
    if bin_dir is None or shutil.which("haproxy") is None:
        raise BenchError("needs PostgreSQL's server binaries and haproxy: run scripts/install-test-deps.sh")
    plan = bench.plan
    SERVER_NAMES.update(CONFIGS)
    # Users: each configuration streams to its own; cold users come after all of them.
    span = max(plan.stream_levels) + 100
    if len(bench.pairs) < 3 * span + plan.cold_samples:
        raise BenchError(f"scale needs at least {3 * span + plan.cold_samples} bench users")
    result: dict[str, Any] = {}
    with PostgresCluster(bin_dir) as cluster:
        users_url = cluster.create_database("atlas_scale")
        empty_url = cluster.create_database("atlas_empty")
        progress(f"scale: PostgreSQL on port {cluster.port}; copying {len(bench.pairs):,} users")
        result["load_users_seconds"] = load_users(users_url, bench.pairs)
        load_users(empty_url, [])
        progress(f"scale: users copied in {result['load_users_seconds']:.1f}s")

        # Start-up and cold users.
        atlas, _, ready_empty = start_atlas(bench, empty_url, "empty")
        atlas.stop()
        atlas, url, ready = start_atlas(bench, users_url, "cold")
        try:
            step = max(1, (len(bench.pairs) - 3 * span) // plan.cold_samples)
            users = [list(p) for p in bench.pairs[3 * span::step][: plan.cold_samples]]
            cold = bench.run_worker("client-scale-cold", {"kind": "cold", "url": url, "users": users}, timeout=180)
        finally:
            atlas.stop()
        sc, sw = summary(cold["cold_ms"]), summary(cold["warm_ms"])
        bench.samples["first connection, PostgreSQL"] = {"cold user": cold["cold_ms"], "warm user": cold["warm_ms"]}
        result["cold"] = {"ready_seconds": ready, "ready_seconds_empty": ready_empty, "users": len(bench.pairs),
                          "cold_ms": sc, "warm_ms": sw}
        bench.rows.append(Row(
            "scale", f"ready to serve, {len(bench.pairs):,} users in PostgreSQL", f"{ready:.2f} s",
            f"{ready_empty:.2f} s empty", f"{ready - ready_empty:+.2f} s", "-", None,
        ))
        bench.rows.append(Row(
            "scale", "first connection of a cold user p99, PostgreSQL", f"{sc['p99']:.2f} ms",
            f"{sw['p99']:.2f} ms warm", f"{sc['p99'] - sw['p99']:+.2f} ms", "-", None,
        ))
        progress(f"scale: ready in {ready:.2f}s ({ready_empty:.2f}s empty); cold connect p99 "
                 f"{sc['p99']:.2f} ms (warm {sw['p99']:.2f})")

        # Streaming: one process alone, behind HAProxy, two behind HAProxy.
        procs: list[Proc] = []
        proxies: list[Any] = []
        try:
            first, first_url, _ = start_atlas(bench, users_url, "streams-1")
            procs.append(first)
            second, second_url, _ = start_atlas(bench, users_url, "streams-2")
            procs.append(second)
            balancers = {}
            for name, backends in (("haproxy-1", [first_url]), ("haproxy-2", [first_url, second_url])):
                port = free_port()
                config = deploy_config(port, [port_of(u) for u in backends], bench.work / f"{name}.sock",
                                       check=HEALTH_CHECK)
                proxy = HAProxy(config, port)
                proxies.append(proxy)
                proxy.start()
                balancers[name] = proxy
            servers = {
                "alone": ((first.pid,), first_url, 0, {}),
                "haproxy-1": ((first.pid,), balancers["haproxy-1"].url, span,
                              {"haproxy": balancers["haproxy-1"].process.pid}),
                "haproxy-2": ((first.pid, second.pid), balancers["haproxy-2"].url, 2 * span,
                              {"haproxy": balancers["haproxy-2"].process.pid}),
            }
            measured, capacity, bounded = bench.stream_capacities(servers)
            cpu_n = min(capacity.values()) or min(plan.stream_levels)
            for kind in servers:
                if cpu_n not in measured[kind]:
                    measured[kind][cpu_n] = bench.measure_streams(kind, servers[kind], cpu_n)
        finally:
            for proxy in proxies:
                proxy.close()
            for proc in procs:
                proc.stop()

    result["streaming"] = {kind: {"levels": list(measured[kind].values()), "capacity": capacity[kind],
                                  "capacity_is_lower_bound": bounded[kind]} for kind in servers}
    result["cpu_streams"] = cpu_n
    bench.data["scale"] = result

    def shown(kind: str) -> str:
        return f">= {capacity[kind]}" if bounded[kind] else f"{capacity[kind]}"

    alone_cpu = measured["alone"][cpu_n]["cpu_us_per_delta"] or float("nan")
    for kind in servers:
        level = measured[kind][cpu_n]
        cpu = level["cpu_us_per_delta"] or float("nan")
        haproxy = level["extra_cpu_us_per_delta"].get("haproxy")
        ratio = capacity[kind] / capacity["alone"] if capacity["alone"] else float("nan")
        bench.rows.append(Row(
            "scale", f"streams with p99 delay <= 50 ms, {CONFIGS[kind]}", shown(kind), shown("alone") + " alone",
            f"x{ratio:.2f}", "-", None,
        ))
        bench.rows.append(Row(
            "scale", f"Atlas CPU per delta @{cpu_n}, {CONFIGS[kind]}"
            + (f" (+ HAProxy {haproxy:.1f} us)" if haproxy is not None else ""),
            f"{cpu:.1f} us", f"{alone_cpu:.1f} us alone", f"x{cpu / alone_cpu:.2f}", "-", None,
            {"haproxy_us_per_delta": haproxy, "p99_delay_ms": level["delay_ms"]["p99"]},
        ))
    progress("scale: capacity " + ", ".join(f"{CONFIGS[k]} {shown(k)}" for k in servers)
             + f"; CPU per delta @{cpu_n}: " + ", ".join(
                 f"{CONFIGS[k]} {measured[k][cpu_n]['cpu_us_per_delta'] or 0:.1f} us" for k in servers))


if __name__ == "__main__":
    from bench.run import main

    sys.exit(main(["--only", "scale", *sys.argv[1:]]))
