"""The test infrastructure for the PostgreSQL store and the scale-out layout, tested on its own:
a throwaway PostgreSQL cluster (pg_cluster.py), HAProxy as a subprocess (haproxy_proc.py), and
deploy/haproxy.cfg routing rooms by their id in front of three tiny HTTP servers.
"""

from __future__ import annotations

import csv
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType

import httpx
import pytest

from haproxy_proc import HAProxy, check_config, deploy_config, require_haproxy
from optional import require_module
from pg_cluster import PostgresCluster, require_bin_dir
from servers import free_port

ROOT = Path(__file__).resolve().parent.parent
WAIT = 10.0


@pytest.fixture(scope="module")
def psycopg() -> ModuleType:
    return require_module("psycopg")


def processes_naming(text: str) -> list[int]:
    """Live processes whose command line or working directory mentions ``text``, but for the
    reapers (reaper.py) that watch them."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = str((entry / "cwd").readlink())
        except OSError:
            continue
        if (text in cmdline or text in cwd) and "reaper.py" not in cmdline:
            found.append(int(entry.name))
    return found


# --- PostgreSQL ---------------------------------------------------------------------------------

def test_cluster_accepts_connections_with_durable_settings(postgres_cluster, psycopg):
    with psycopg.connect(postgres_cluster.url) as conn:
        settings = dict(conn.execute(
            "SELECT name, setting FROM pg_settings WHERE name IN "
            "('fsync', 'synchronous_commit', 'listen_addresses', 'full_page_writes')"
        ).fetchall())
        database = conn.execute("SELECT current_database()").fetchone()[0]
    assert settings == {
        "fsync": "on", "synchronous_commit": "on", "full_page_writes": "on",
        "listen_addresses": "127.0.0.1",
    }
    assert database == "atlas_test"
    assert postgres_cluster.url == f"postgresql://postgres@127.0.0.1:{postgres_cluster.port}/atlas_test"


def test_each_test_gets_an_empty_database_of_its_own(postgres_url, postgres_cluster, psycopg):
    assert postgres_url != postgres_cluster.url
    with psycopg.connect(postgres_url) as conn:
        tables = conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'").fetchone()[0]
    assert tables == 0


def test_a_table_survives_a_restart(postgres_url, postgres_cluster, psycopg):
    with psycopg.connect(postgres_url) as conn:
        conn.execute("CREATE TABLE rooms (id text PRIMARY KEY)")
        conn.execute("INSERT INTO rooms VALUES ('alice')")
    postgres_cluster.restart()
    with psycopg.connect(postgres_url) as conn:
        assert conn.execute("SELECT id FROM rooms").fetchall() == [("alice",)]


def test_after_a_kill_committed_rows_are_recovered_and_uncommitted_ones_are_not(
    postgres_url, postgres_cluster, psycopg,
):
    with psycopg.connect(postgres_url) as conn:
        conn.execute("CREATE TABLE turns (n int)")
    committed = psycopg.connect(postgres_url, autocommit=True)
    committed.execute("INSERT INTO turns VALUES (1)")
    open_transaction = psycopg.connect(postgres_url)
    open_transaction.execute("INSERT INTO turns VALUES (2)")
    old_pids = postgres_cluster.processes()

    postgres_cluster.kill()

    assert postgres_cluster.pid is None
    assert postgres_cluster.processes() == []
    assert not set(old_pids) & set(processes_naming(str(postgres_cluster.data_dir)))
    committed.close()
    open_transaction.close()
    postgres_cluster.start()  # crash recovery
    with psycopg.connect(postgres_url) as conn:
        assert conn.execute("SELECT n FROM turns").fetchall() == [(1,)]
    assert "database system was interrupted" in postgres_cluster.log_path.read_text()


def test_stop_leaves_no_process_and_start_brings_the_cluster_back(postgres_cluster, psycopg):
    data_dir = str(postgres_cluster.data_dir)
    assert postgres_cluster.processes()

    postgres_cluster.stop()

    assert postgres_cluster.processes() == []
    assert processes_naming(data_dir) == []
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(postgres_cluster.url, connect_timeout=2)
    postgres_cluster.start()
    with psycopg.connect(postgres_cluster.url) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_a_failing_block_leaves_neither_process_nor_directory():
    with pytest.raises(RuntimeError):
        with PostgresCluster(require_bin_dir()) as cluster:
            root, data_dir = cluster.root, str(cluster.data_dir)
            assert processes_naming(data_dir)
            raise RuntimeError("a test fails")
    assert processes_naming(data_dir) == []
    assert not root.exists()


CHILD = """
import sys
from haproxy_proc import HAProxy
from pg_cluster import PostgresCluster, find_bin_dir
from servers import free_port

cluster = PostgresCluster(find_bin_dir())
cluster.start()
port = free_port()
proxy = HAProxy(
    "defaults\\n  mode http\\n  timeout connect 5s\\n  timeout client 5s\\n  timeout server 5s\\n"
    f"frontend web\\n  bind 127.0.0.1:{port}\\n  http-request return status 200\\n",
    port,
)
proxy.start()
print(cluster.root, proxy.directory, flush=True)
sys.stdin.read()
"""


def test_a_killed_test_process_leaves_neither_process_nor_directory():
    require_bin_dir()
    require_haproxy()
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD], cwd=Path(__file__).parent,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        directories = child.stdout.readline().split()
        assert len(directories) == 2, "the child did not start its servers"
        assert all(processes_naming(directory) for directory in directories)
    finally:
        child.kill()  # no atexit, no finalizer: only the reapers are left to clean up
        child.wait()
        child.stdin.close()
        child.stdout.close()
    deadline = time.monotonic() + WAIT
    while any(processes_naming(directory) or Path(directory).exists() for directory in directories):
        assert time.monotonic() < deadline, {d: processes_naming(d) for d in directories}
        time.sleep(0.02)


# --- HAProxy ------------------------------------------------------------------------------------

class NamedServer(ThreadingHTTPServer):
    """Answers every GET with its own name; /healthz with ``health`` (200 unless a test sets it)."""

    daemon_threads = True

    def __init__(self, name: str) -> None:
        super().__init__(("127.0.0.1", 0), _AnswerName)
        self.name = name
        self.health = 200

    @property
    def port(self) -> int:
        return self.server_address[1]


class _AnswerName(BaseHTTPRequestHandler):
    server: NamedServer

    def do_GET(self) -> None:
        status = self.server.health if self.path == "/healthz" else 200
        body = self.server.name.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def named_servers() -> Iterator[list[NamedServer]]:
    servers = [NamedServer(f"atlas{n}") for n in (1, 2, 3)]
    threads = [threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True) for server in servers]
    for thread in threads:
        thread.start()
    yield servers
    for server in servers:
        server.shutdown()
        server.server_close()


def test_haproxy_proxies_a_request_to_a_backend(named_servers):
    require_haproxy()
    port = free_port()
    config = f"""
defaults
    mode http
    timeout connect 5s
    timeout client 10s
    timeout server 10s
frontend web
    bind 127.0.0.1:{port}
    default_backend one
backend one
    server only 127.0.0.1:{named_servers[0].port}
"""
    with HAProxy(config, port) as proxy:
        response = httpx.get(f"{proxy.url}/anything", timeout=WAIT)
        pid = proxy.process.pid
    assert (response.status_code, response.text) == (200, "atlas1")
    assert pid not in processes_naming("haproxy")


def test_deploy_haproxy_cfg_is_valid():
    require_haproxy()
    assert "Configuration file is valid" in check_config((ROOT / "deploy" / "haproxy.cfg").read_text())


@pytest.fixture
def deployed(named_servers, tmp_path_factory) -> Iterator[HAProxy]:
    require_haproxy()
    port = free_port()
    socket_path = tmp_path_factory.mktemp("haproxy") / "admin.sock"
    config = deploy_config(port, [server.port for server in named_servers], socket_path)
    with HAProxy(config, port) as proxy:
        yield proxy


def server_status(proxy: HAProxy, backend: str, server: str) -> str:
    rows = csv.reader(proxy.command("show stat").lstrip("# ").splitlines())
    header = next(rows)
    for row in rows:
        record = dict(zip(header, row))
        if (record.get("pxname"), record.get("svname")) == (backend, server):
            return record["status"]
    raise AssertionError(f"{backend}/{server} not in show stat")


def wait_status(proxy: HAProxy, backend: str, server: str, status: str) -> None:
    deadline = time.monotonic() + WAIT
    while (current := server_status(proxy, backend, server)) != status:
        assert time.monotonic() < deadline, f"{backend}/{server} stayed {current}, not {status}"
        time.sleep(0.02)


def backend_of(client: httpx.Client, path: str) -> str:
    response = client.get(path)
    assert response.status_code == 200, (path, response.status_code, response.text)
    return response.text


ROOM_IDS = [f"room-{n}" for n in range(50)]


def test_both_room_prefixes_reach_the_same_backend_by_room_id(deployed):
    with httpx.Client(base_url=deployed.url, timeout=WAIT) as client:
        homes = {room: backend_of(client, f"/party/{room}") for room in ROOM_IDS}
        for room in ROOM_IDS:
            assert backend_of(client, f"/parties/main/{room}") == homes[room], room
            assert backend_of(client, f"/party/{room}?proxy=/agents/atlas-assistant/text") == homes[room], room
        # The room id as Atlas decodes it: an escaped letter is the same room.
        assert backend_of(client, "/parties/main/room-%31") == homes["room-1"]
    assert len(set(homes.values())) >= 2, homes


def test_v1_goes_to_every_backend_in_turn(deployed):
    with httpx.Client(base_url=deployed.url, timeout=WAIT) as client:
        answered = [backend_of(client, "/v1/models") for _ in range(6)]
    assert sorted(answered) == ["atlas1", "atlas1", "atlas2", "atlas2", "atlas3", "atlas3"], answered


def test_a_backend_failing_healthz_is_taken_out_and_only_its_rooms_move(deployed, named_servers):
    with httpx.Client(base_url=deployed.url, timeout=WAIT) as client:
        before = {room: backend_of(client, f"/party/{room}") for room in ROOM_IDS}
        assert "atlas2" in before.values()

        named_servers[1].health = 503
        wait_status(deployed, "atlas_rooms", "atlas2", "DOWN")
        wait_status(deployed, "atlas_any", "atlas2", "DOWN")

        after = {room: backend_of(client, f"/party/{room}") for room in ROOM_IDS}
        answered = {backend_of(client, "/v1/models") for _ in range(6)}
    assert "atlas2" not in after.values()
    assert answered == {"atlas1", "atlas3"}
    assert {room: home for room, home in before.items() if home != "atlas2"} == {
        room: after[room] for room, home in before.items() if home != "atlas2"
    }

