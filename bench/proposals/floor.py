"""PROPOSAL support: the floor of the WebSocket stacks: CPU per delta and delay when a bare server
(``bench.echo``, Hypercorn or trio-websocket) writes N streams' timer-paced deltas itself.

    .venv/bin/python -m bench.proposals.floor 500 200 hypercorn,trio-websocket
"""
import sys, os
from pathlib import Path
import bench.run as R
from bench import procs
from bench.procs import Proc, python_module
procs.NICE = -10
procs.raise_fd_limit()
n = int(sys.argv[1]); deltas = int(sys.argv[2])
plan = R.Plan("x", 10, 1, (n,), deltas, 30, 2, 1.0, 0, 25, 10, 1, 1, 1, 10_000, 1)
work = R.RESULTS / 'floor'; work.mkdir(parents=True, exist_ok=True)
b = R.Bench(plan, work, work)
b.start_provider(); b.prepare_users()
for impl in sys.argv[3].split(","):
    echo = Proc(f"echo-{impl}", python_module("bench.echo") + ["--impl", impl], work)
    try:
        url = echo.wait_line("ECHO ", 30).split()[1]
        lv = b.stream_level("bare", url, n, echo.pid)
    finally:
        echo.stop()
    print(f"{impl}: {n} streams: {lv['cpu_us_per_delta']:.1f} us CPU/delta, p50 {lv['delay_ms']['p50']:.1f} p99 {lv['delay_ms']['p99']:.1f} ms, others {lv['others_cpu_share']:.0%}", flush=True)
b.provider.stop()
