"""HAProxy as a subprocess for the tests, from a config text the test writes (or a deploy/ file
with its ports put in).

    with HAProxy(config_text, port) as proxy:   # haproxy -f CFG -db; returns once PORT accepts
        httpx.get(proxy.url + "/healthz")
        proxy.command("show servers state")      # the runtime API, if the config has "stats socket"

    deploy_config(port, [port1, port2], socket)  # deploy/haproxy.cfg in front of those ports

haproxy runs in a temp dir of its own, removed by ``close()``; if the test process is killed
instead, a reaper (reaper.py) stops haproxy and removes the directory. Without haproxy the tests
that need it skip, or fail on CI (``require_haproxy``, see optional.py).
"""

from __future__ import annotations

import atexit
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from optional import unavailable
from reaper import Started, start_reaper, stop_reaper

WAIT = 10.0  # seconds haproxy may take to start, to stop, or to answer a runtime command
DEPLOY_CONFIG = Path(__file__).resolve().parent.parent / "deploy" / "haproxy.cfg"
DEPLOY_SERVERS = 3  # atlas1..atlas3 on 127.0.0.1:2001..2003


def deploy_config(
    port: int, server_ports: list[int], stats_socket: Path, *, check: str = "inter 100ms fall 2 rise 2",
) -> str:
    """deploy/haproxy.cfg with the test's addresses, ``check`` for its health-check timing, and
    a runtime API on ``stats_socket``. With fewer than three ports, the other servers are left
    out. Every replaced text must be there, so a change to the file cannot silently escape the
    tests."""
    text = DEPLOY_CONFIG.read_text()
    replacements = {
        "bind :8080": f"bind 127.0.0.1:{port}",
        "inter 2s fall 2 rise 2": check,
        "\nglobal\n": f"\nglobal\n    stats socket {stats_socket} level admin\n",
    }
    for n, server_port in enumerate(server_ports, start=1):
        replacements[f"127.0.0.1:200{n}"] = f"127.0.0.1:{server_port}"
    for old, new in replacements.items():
        assert old in text, f"deploy/haproxy.cfg no longer has {old!r}"
        text = text.replace(old, new)
    for n in range(len(server_ports) + 1, DEPLOY_SERVERS + 1):
        lines = [line for line in text.splitlines() if f" atlas{n} " not in line]
        assert len(lines) < len(text.splitlines()), f"deploy/haproxy.cfg has no server atlas{n}"
        text = "\n".join(lines) + "\n"
    return text


class HAProxyError(Exception):
    """haproxy rejected its config, exited, or did not listen; the message holds its output."""


def require_haproxy() -> str:
    """The haproxy executable, or skip (fail on CI)."""
    if (path := shutil.which("haproxy")) is None:
        unavailable("haproxy is not installed")
    return path


def check_config(config: str) -> str:
    """``haproxy -c``: raises HAProxyError with haproxy's own words if it rejects the config."""
    with tempfile.TemporaryDirectory(prefix="atlas-haproxy-") as directory:
        path = Path(directory) / "haproxy.cfg"
        path.write_text(config)
        return _check(path)


def _check(path: Path) -> str:
    result = subprocess.run(
        [require_haproxy(), "-c", "-f", str(path)], capture_output=True, text=True, timeout=WAIT,
    )
    if result.returncode != 0:
        raise HAProxyError(f"haproxy -c rejected {path}:\n{result.stdout}{result.stderr}")
    return result.stdout + result.stderr


class HAProxy(Started):
    """One haproxy process in the foreground (``-db``) with its config and log in a temp dir."""

    def __init__(self, config: str, port: int) -> None:
        self.config = config
        self.port = port
        self.directory = Path(tempfile.mkdtemp(prefix="atlas-haproxy-"))
        self.config_path = self.directory / "haproxy.cfg"
        self.log_path = self.directory / "haproxy.log"
        self.process: subprocess.Popen[bytes] | None = None
        atexit.register(self.close)  # if no test got to it
        self._reaper = start_reaper(self.directory)  # if the test process is killed

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self) -> None:
        self.config_path.write_text(self.config)
        _check(self.config_path)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [require_haproxy(), "-f", str(self.config_path), "-db"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                cwd=self.directory,  # what the reaper looks for
            )
        deadline = time.monotonic() + WAIT
        while not _accepts(self.port):
            if self.process.poll() is not None:
                raise HAProxyError(f"haproxy exited with {self.process.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                self.stop()
                raise HAProxyError(f"haproxy did not listen on {self.port} in {WAIT} s:\n{self.log()}")
            time.sleep(0.01)

    def stop(self) -> None:
        """SIGTERM (haproxy's hard stop: it closes every connection), SIGKILL if it lingers."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(WAIT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(WAIT)
        self.process = None

    def command(self, line: str, socket_path: str | Path | None = None) -> str:
        """One command on the runtime API; the socket is the config's ``stats socket`` by default."""
        path = str(socket_path or self._stats_socket())
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(WAIT)
            sock.connect(path)
            sock.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)
        atexit.unregister(self.close)
        if self._reaper is not None:
            stop_reaper(self._reaper)
            self._reaper = None

    def _stats_socket(self) -> str:
        for line in self.config.splitlines():
            words = line.split()
            if words[:2] == ["stats", "socket"] and len(words) > 2:
                return words[2]
        raise HAProxyError("the config has no 'stats socket'")


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False
