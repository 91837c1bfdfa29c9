"""Processes the harness starts (Atlas, the provider, the echo server, load clients) and what the
OS says about them (CPU time and resident memory, from ``/proc``)."""

from __future__ import annotations

import json
import os
import queue
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, IO

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
REPO = Path(__file__).resolve().parent.parent


class BenchError(Exception):
    pass


# ``--priority``: nice value for every process the bench starts (root may go below 0), so that other
# work on a shared machine disturbs the measurement less.
NICE: int | None = None


def _child_setup() -> None:
    if NICE is not None:
        os.setpriority(os.PRIO_PROCESS, 0, NICE)


def raise_fd_limit() -> int:
    """Soft open-files limit up to the hard one; children inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of every thread of ``pid`` so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime (fields 14, 15)


def machine_busy_seconds() -> float:
    """CPU seconds all processes of the machine have used (every core), from ``/proc/stat``."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / CLOCK_TICKS


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE_SIZE


class Proc:
    """A child process whose stdout lines are collected by a thread; stderr goes to a log file."""

    def __init__(self, name: str, argv: list[str], log_dir: Path, *, stdin: bool = False,
                 stderr_lines: bool = False) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log: IO[bytes] = open(self.log_path, "ab")
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.err_lines: queue.Queue[str | None] = queue.Queue()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        self.popen = subprocess.Popen(
            argv, cwd=REPO, env=env,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE if stderr_lines else self._log,
            start_new_session=True, preexec_fn=_child_setup if NICE is not None else None,
        )
        self.started = time.monotonic()
        threading.Thread(target=self._pump, args=(self.popen.stdout, self.lines), daemon=True).start()
        if stderr_lines:
            threading.Thread(target=self._pump, args=(self.popen.stderr, self.err_lines, True),
                             daemon=True).start()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def _pump(self, stream: IO[bytes], into: queue.Queue[str | None], log: bool = False) -> None:
        for raw in stream:
            if log:
                self._log.write(raw)
                self._log.flush()
            into.put(raw.decode(errors="replace").rstrip("\n"))
        into.put(None)

    def wait_line(self, prefix: str, timeout: float, *, stderr: bool = False) -> str:
        """The first line starting with ``prefix`` (other lines are skipped)."""
        source = self.err_lines if stderr else self.lines
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"{self.name}: no {prefix!r} line within {timeout:.0f} s (log: {self.log_path})")
            try:
                line = source.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                raise BenchError(f"{self.name} exited ({self.popen.wait()}) before {prefix!r} (log: {self.log_path})")
            if line.startswith(prefix):
                return line

    def send(self, message: dict[str, Any]) -> None:
        assert self.popen.stdin is not None
        self.popen.stdin.write((json.dumps(message) + "\n").encode())
        self.popen.stdin.flush()

    def event(self, timeout: float, on_progress: Any = None) -> dict[str, Any]:
        """The next JSON event from a worker; ``progress`` events go to ``on_progress``."""
        deadline = time.monotonic() + timeout
        while True:
            line = self.wait_line("{", max(0.0, deadline - time.monotonic()) or 0.001)
            message = json.loads(line)
            if message.get("event") == "failed":
                raise BenchError(f"{self.name} failed: {message.get('error')} (log: {self.log_path})")
            if message.get("event") == "progress":
                if on_progress is not None:
                    on_progress(message)
                continue
            return message

    def stop(self, timeout: float = 5.0) -> None:
        if self.popen.poll() is None:
            try:
                self.popen.send_signal(signal.SIGTERM)
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
            except ProcessLookupError:
                pass
        if self.popen.stdin is not None:
            try:
                self.popen.stdin.close()
            except OSError:
                pass
        self._log.close()


def atlas_command() -> list[str]:
    script = Path(sys.executable).with_name("atlas")
    if script.exists():
        return [str(script)]
    found = shutil.which("atlas")
    return [found] if found else [sys.executable, "-m", "atlas"]


def start_atlas_serve(
    name: str, data_dir: Path, provider_url: str, log_dir: Path, *extra: str, timeout: float = 30.0,
) -> tuple[Proc, str]:
    """``atlas serve`` on a free loopback port, on ``data_dir``, with ``provider_url`` as its
    default and only allowed provider and warnings-only logs (plus ``extra`` arguments): the
    process and its URL, once it listens."""
    argv = atlas_command() + [
        "serve", "--bind", "127.0.0.1:0", "--data-dir", str(data_dir),
        "--provider-url", provider_url, "--provider-urls", provider_url, "--log-level", "warning", *extra,
    ]
    proc = Proc(name, argv, log_dir, stderr_lines=True)
    return proc, proc.wait_line("Atlas listening on ", timeout, stderr=True).rsplit(" ", 1)[1]


def python_module(module: str) -> list[str]:
    return [sys.executable, "-m", module]
