"""A throwaway PostgreSQL cluster for the tests, and the fixtures that share one per session.

    with PostgresCluster(find_bin_dir()) as cluster:   # initdb into a fresh temp dir, then start
        psycopg.connect(cluster.url)                    # postgresql://postgres@127.0.0.1:PORT/atlas_test
        cluster.restart()                               # fast shutdown, then start
        cluster.kill()                                  # SIGKILL, as in a crash; start() recovers
    # stopped, and the temp dir removed

The cluster listens on 127.0.0.1 only (a port that was free, and a Unix socket inside its temp dir)
with trust authentication. fsync stays on, since crash tests need real durability; what is cut for
speed loses nothing on a crash (small buffers, no JIT, minimal WAL, no sync of initdb's files).

As root, the server's commands run as the ``postgres`` OS user (initdb and postgres refuse root),
which owns the temp dir. The postmaster is this process's own child, not pg_ctl's orphan, so that
it is reaped when it dies: a zombie postmaster still holds the data directory's lock file, and
PID 1 reaps orphans late or never where it is no real init (as on our machines).

The session fixture stops the cluster even when a test fails, atexit if nothing else did, and a
reaper (reaper.py) if the test process is killed. Its processes are found by their working
directory, which every PostgreSQL process sets to the data directory.

Fixtures, for a conftest to import (``from pg_cluster import postgres_cluster, postgres_url``):
    postgres_cluster   session: the one PostgresCluster of the session, started
    postgres_url       per test: the URL of a fresh, empty database of the test's own
Without PostgreSQL binaries they skip, or fail on CI (see optional.py).
"""

from __future__ import annotations

import atexit
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from optional import unavailable
from reaper import Started, processes_under, start_reaper, stop_reaper
from servers import free_port

PG_MAJOR = "15"
OWNER = "postgres"
WAIT = 60.0  # seconds a start (crash recovery included), a stop or an initdb may take

SETTINGS = """\
# Written by tests/pg_cluster.py
listen_addresses = '127.0.0.1'
port = {port}
unix_socket_directories = '{socket_dir}'
max_connections = 50
shared_buffers = 16MB
fsync = on
synchronous_commit = on
full_page_writes = on
wal_level = minimal
max_wal_senders = 0
jit = off
"""


class PostgresError(Exception):
    """A server command failed; the message holds its output and the server log's tail."""


def find_bin_dir() -> Path | None:
    """$ATLAS_TEST_PG_BIN, else Debian's PostgreSQL 15, else its newest other version, else PATH."""
    candidates = []
    if configured := os.environ.get("ATLAS_TEST_PG_BIN"):
        candidates.append(Path(configured))
    candidates.append(Path("/usr/lib/postgresql") / PG_MAJOR / "bin")
    versions = [path for path in Path("/usr/lib/postgresql").glob("*/bin") if path.parent.name.isdigit()]
    candidates += sorted(versions, key=lambda path: int(path.parent.name), reverse=True)
    if on_path := shutil.which("initdb"):
        candidates.append(Path(on_path).parent)
    for bin_dir in candidates:
        if all((bin_dir / tool).is_file() for tool in ("initdb", "postgres", "createdb", "dropdb")):
            return bin_dir
    return None


class PostgresCluster(Started):
    """One cluster in a temp dir of its own: created by the first ``start()``, removed by ``close()``."""

    def __init__(self, bin_dir: Path, *, database: str = "atlas_test") -> None:
        self.bin_dir = bin_dir
        self.database = database
        self.port = 0
        self.root: Path | None = None
        self._postmaster: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._reaper: subprocess.Popen[bytes] | None = None
        atexit.register(self.close)

    @property
    def data_dir(self) -> Path:
        return self._root() / "data"

    @property
    def socket_dir(self) -> Path:
        return self._root() / "socket"

    @property
    def log_path(self) -> Path:
        return self._root() / "postgres.log"

    @property
    def url(self) -> str:
        return self.url_for(self.database)

    def url_for(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    @property
    def pid(self) -> int | None:
        """The postmaster's pid while it runs."""
        if self._postmaster is None or self._postmaster.poll() is not None:
            return None
        return self._postmaster.pid

    def processes(self) -> list[int]:
        """Every live process of this cluster: the postmaster and all its children (no zombies)."""
        return [] if self.root is None else processes_under(os.path.realpath(self.data_dir))

    def start(self) -> None:
        """Create the cluster on the first call; start it if it is not running (after a kill(), this
        is crash recovery, and it returns once recovery is over)."""
        if self.root is None:
            self._init()
            self._start_on_a_free_port()
            self._client("createdb", self.database)
        elif self.pid is None:
            self._start_postmaster()

    def stop(self) -> None:
        """Fast shutdown: clients are disconnected, and the postmaster checkpoints and exits."""
        if (postmaster := self._postmaster) is not None:
            if postmaster.poll() is None:
                postmaster.send_signal(signal.SIGINT)
            try:
                postmaster.wait(WAIT)
            except subprocess.TimeoutExpired:
                self.kill()
                raise PostgresError(f"no fast shutdown in {WAIT} s; killed\n{self._log_tail()}") from None
        self._forget_postmaster()
        self._kill_leftovers()

    def kill(self) -> None:
        """SIGKILL the postmaster, then every process it left: the next start recovers from a crash."""
        if (postmaster := self._postmaster) is not None:
            postmaster.kill()
            postmaster.wait(WAIT)
        self._forget_postmaster()
        self._kill_leftovers()

    def restart(self) -> None:
        self.stop()
        self.start()

    def create_database(self, name: str) -> str:
        self._client("createdb", name)
        return self.url_for(name)

    def drop_database(self, name: str) -> None:
        self._client("dropdb", "--force", "--if-exists", name)

    def close(self) -> None:
        """Stop (kill if that fails) and remove the temp dir. Safe to call again."""
        if self.root is None:
            return
        try:
            self.stop()
        except PostgresError:
            pass  # stop() killed it
        finally:
            self.kill()
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None
            if self._reaper is not None:
                stop_reaper(self._reaper)
                self._reaper = None
            atexit.unregister(self.close)

    def _root(self) -> Path:
        if self.root is None:
            raise PostgresError("the cluster has not been started")
        return self.root

    def _init(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="atlas-pg-"))
        self._reaper = start_reaper(self.root)
        self.socket_dir.mkdir()
        if os.geteuid() == 0:
            for path in (self.root, self.socket_dir):
                shutil.chown(path, OWNER, OWNER)
        self._run([
            str(self.bin_dir / "initdb"), "-D", str(self.data_dir), "-U", "postgres", "--auth=trust",
            "--encoding=UTF8", "--no-locale", "--no-sync",
        ], as_owner=True)
        with open(self.data_dir / "postgresql.conf", "a") as conf:
            conf.write("\ninclude 'atlas_test.conf'\n")

    def _start_on_a_free_port(self) -> None:
        settings = self.data_dir / "atlas_test.conf"
        # The port was free a moment ago; if something has taken it since, try another.
        for attempt in range(3):
            self.port = free_port()
            settings.write_text(SETTINGS.format(port=self.port, socket_dir=self.socket_dir))
            try:
                self._start_postmaster()
                return
            except PostgresError:
                if attempt == 2 or "could not bind" not in self._log_tail():
                    raise

    def _start_postmaster(self) -> None:
        self._log = open(self.log_path, "ab")
        self._postmaster = subprocess.Popen(
            [str(self.bin_dir / "postgres"), "-D", str(self.data_dir)],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C in the terminal is for pytest, not for the server
            **self._owner_args(),
        )
        deadline = time.monotonic() + WAIT
        while not self._ready():
            if self._postmaster.poll() is not None:
                self._forget_postmaster()
                raise PostgresError(f"postgres exited while starting\n{self._log_tail()}")
            if time.monotonic() > deadline:
                self.kill()
                raise PostgresError(f"postgres not ready in {WAIT} s\n{self._log_tail()}")
            time.sleep(0.01)

    def _ready(self) -> bool:
        # The lock file's 8th line is the postmaster's status (what pg_ctl -w waits for), "ready"
        # once it accepts connections, which after a crash is once recovery is over.
        try:
            lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
        except OSError:
            return False
        return len(lines) >= 8 and lines[0] == str(self.pid) and lines[7].strip() == "ready"

    def _forget_postmaster(self) -> None:
        self._postmaster = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def _kill_leftovers(self) -> None:
        # After a clean stop there are none; after a SIGKILL the postmaster's children remain
        # until they notice, and a new postmaster cannot start while they hold its shared memory.
        deadline = time.monotonic() + WAIT
        while pids := self.processes():
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if time.monotonic() > deadline:
                raise PostgresError(f"processes {pids} of {self.data_dir} outlived SIGKILL")
            time.sleep(0.01)

    def _client(self, tool: str, *args: str) -> None:
        self._run([str(self.bin_dir / tool), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", *args])

    def _owner_args(self) -> dict[str, Any]:
        return {"user": OWNER, "group": OWNER, "extra_groups": []} if os.geteuid() == 0 else {}

    def _run(self, command: list[str], *, as_owner: bool = False) -> None:
        # From the temp dir: the postgres user may not enter the caller's working directory.
        result = subprocess.run(
            command, cwd=self.root, stdin=subprocess.DEVNULL, capture_output=True, text=True,
            timeout=WAIT, **(self._owner_args() if as_owner else {}),
        )
        if result.returncode != 0:
            raise PostgresError(
                f"{' '.join(command)} exited with {result.returncode}:\n{result.stdout}{result.stderr}"
                f"\n--- server log (tail) ---\n{self._log_tail()}"
            )

    def _log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except (OSError, PostgresError):
            return "(no server log)"


def require_bin_dir() -> Path:
    """The PostgreSQL binaries, or skip (fail on CI) saying what is missing."""
    bin_dir = find_bin_dir()
    if bin_dir is None:
        unavailable("PostgreSQL server binaries (initdb, postgres) not found in $ATLAS_TEST_PG_BIN, "
                    "/usr/lib/postgresql/*/bin or PATH")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(OWNER)
        except KeyError:
            unavailable(f"as root, PostgreSQL must run as the {OWNER!r} OS user, which does not exist")
    return bin_dir


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster]:
    """The session's cluster. A test that stops or kills it may leave it so: ``postgres_url``
    starts it again before the next test that uses it."""
    with PostgresCluster(require_bin_dir()) as cluster:
        yield cluster


@pytest.fixture
def postgres_url(postgres_cluster: PostgresCluster) -> Iterator[str]:
    """A fresh, empty database for one test, dropped after it."""
    postgres_cluster.start()
    name = f"test_{secrets.token_hex(6)}"
    url = postgres_cluster.create_database(name)
    yield url
    postgres_cluster.start()
    postgres_cluster.drop_database(name)
