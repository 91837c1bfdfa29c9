"""PROPOSAL support: A/B of Atlas variants (copies of the ``atlas`` package) on the bench's
first-token, proxy and streaming scenarios, alternating, in one run.

    .venv/bin/python -m bench.proposals.ab cur,lean,cur,lean 250 120 [ft,proxy,streams]

Each variant name maps to a directory holding an ``atlas/`` package (ATLAS_AB_<NAME>=DIR adds or
overrides one; ``cur`` is this checkout). PROFILE=1 records py-spy profiles into the work directory.
"""
import sys, time, json, os
from pathlib import Path
import bench.run as R
from bench import procs
from bench.procs import raise_fd_limit
procs.NICE = -10
raise_fd_limit()
variants = {"cur": str(Path(__file__).resolve().parents[2]), "lean": "/tmp/prof/exp_atlas"}
variants.update({k[len("ATLAS_AB_"):].lower(): v for k, v in os.environ.items() if k.startswith("ATLAS_AB_")})
order = sys.argv[1].split(","); levels = [int(x) for x in sys.argv[2].split(",")]; deltas = int(sys.argv[3])
what = sys.argv[4] if len(sys.argv) > 4 else "ft,proxy,streams"
plan = R.Plan("ab", 200, 20, tuple(levels), deltas, 30, 2, 1.0, 0, 25, 10, 1, 1, 1, 10_000, 1)
work = R.RESULTS / 'ab' / time.strftime('%Y%m%d-%H%M%S'); work.mkdir(parents=True, exist_ok=True)
b = R.Bench(plan, work, work, profile=bool(os.environ.get("PROFILE")))
b.start_provider(); b.prepare_users()
for name in order:
    root = variants[name]
    procs.atlas_command = lambda root=root: [sys.executable, "-c", f"import sys; sys.path.insert(0, {root!r}); from atlas.cli.main import main; sys.exit(main())"]
    if "ft" in what:
        b.rows = []; b.first_token()
        ft = b.data["first_token"]
        print(f"{name}: first token added p50 {ft['atlas_ms']['p50']-ft['direct_ms']['p50']:.2f} p99 {ft['atlas_ms']['p99']-ft['direct_ms']['p99']:.2f} ms, cpu/request {ft['atlas_cpu_us_per_request']:.0f} us", flush=True)
    if "proxy" in what:
        b.proxy()
        px = b.data["proxy"]
        print(f"{name}: proxy added p50 {px['atlas_ms']['p50']-px['direct_ms']['p50']:.2f} ms, cpu/request {px['atlas_cpu_us_per_request']:.0f} us", flush=True)
    if "streams" in what:
        atlas, url, _ = b.start_atlas(b.data_dir(), name)
        try:
            for n in levels:
                lv = b.stream_level("atlas", url, n, atlas.pid)
                print(f"{name}: {n} streams p50 {lv['delay_ms']['p50']:.1f} p99 {lv['delay_ms']['p99']:.1f} ms, {lv['cpu_us_per_delta']:.1f} us/delta, errors {lv['errors']} deltas {lv['deltas']}/{lv['expected_deltas']}, others {lv['others_cpu_share']:.0%}", flush=True)
        finally:
            atlas.stop()
b.provider.stop()
