"""``--profile``: py-spy records the Atlas process during a measured phase (if py-spy is installed).

Samples only the thread holding the GIL (so waiting threads and epoll do not count as work). Writes collapsed stacks (``profile-*.txt``, for flamegraph.pl or speedscope) and a summary of the
hottest functions by own time and by inclusive time.
"""

from __future__ import annotations

import collections
import shutil
import signal
import subprocess
import sys
from pathlib import Path


class Profiler:
    def __init__(self, pid: int, out: Path, rate: int = 400) -> None:
        self.out = out
        self.proc: subprocess.Popen[bytes] | None = None
        exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        if not Path(exe).exists():
            print("profile skipped: py-spy is not installed (pip install py-spy)", file=sys.stderr)
            return
        self.proc = subprocess.Popen(
            [exe, "record", "-p", str(pid), "-o", str(out), "-f", "raw", "-r", str(rate), "--gil"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )

    def stop(self) -> dict[str, list[tuple[str, float]]] | None:
        if self.proc is None:
            return None
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return None
        return summarize(self.out) if self.out.exists() else None


def summarize(path: Path, top: int = 25) -> dict[str, list[tuple[str, float]]]:
    """Hottest frames: own samples (leaf) and inclusive samples, as shares of all samples."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if f and not f.startswith("process ") and not f.startswith("thread ")]
        if not frames:
            continue
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    if not total:
        return {"own": [], "inclusive": []}
    return {
        "samples": [("total", float(total))],
        "own": [(f, n / total) for f, n in own.most_common(top)],
        "inclusive": [(f, n / total) for f, n in inclusive.most_common(top)],
    }
