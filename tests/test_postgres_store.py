"""The PostgreSQL backend's own guarantees: a versioned schema migrated once whoever starts first,
a database that is down or unreachable (StoreUnavailable, and recovery once it is back), no
password in any message, and `atlas user` and `atlas serve` on ATLAS_DATABASE_URL, from the
command line to a server restart. What every backend guarantees is in test_store.py."""

from __future__ import annotations

import os
import subprocess
import threading
import time

import psycopg
import pytest
import trio
from trio_websocket import ConnectionClosed
from servers import (
    SECRETS, atlas_command, connect, free_port, new_key, open_atlas, ready, receive_json,
    send_json, start_atlas_process,
)

from atlas.store import RoomState, StoreError, StoreUnavailable, UserRecord
from atlas.store import postgres
from atlas.store.postgres import MIGRATIONS, PostgresStore, redact_database_url

PASSWORD = "pw-never-shown-7f3a9c"
SECRETS.add(PASSWORD)


def with_password(url: str) -> str:
    """The same URL with a password (the test cluster trusts every connection, so any works)."""
    return url.replace("postgresql://postgres@", f"postgresql://postgres:{PASSWORD}@", 1)


def atlas(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        atlas_command(*args), capture_output=True, text=True, timeout=60,
        env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL,
    )


def schema_version(url: str) -> int:
    with psycopg.connect(url) as conn:
        return conn.execute("SELECT version FROM schema_version").fetchone()[0]


@pytest.fixture
def store(postgres_url):
    store = PostgresStore(postgres_url)
    store.prepare()
    yield store
    store.close()


# --- Schema and migrations -----------------------------------------------------------------------

def test_the_schema_is_created_at_its_latest_version(store, postgres_url):
    assert schema_version(postgres_url) == len(MIGRATIONS)
    with psycopg.connect(postgres_url) as conn:
        columns = conn.execute(
            "SELECT table_name, column_name, data_type, is_nullable FROM information_schema.columns"
            " WHERE table_schema = 'public' AND table_name IN ('users', 'tokens', 'rooms')"
            " ORDER BY table_name, ordinal_position"
        ).fetchall()
    assert ("users", "limits", "jsonb", "YES") in columns  # for the per-user limits to come
    assert [c[1] for c in columns if c[0] == "users"] == [
        "id", "virtual_key", "provider_url", "token_hash", "created_at", "limits",
    ]
    assert [c[1] for c in columns if c[0] == "tokens"] == ["hash", "user_id"]
    assert [(c[1], c[2]) for c in columns if c[0] == "rooms"] == [("id", "text"), ("state", "json")]


def test_processes_starting_together_migrate_once(postgres_url):
    stores = [PostgresStore(postgres_url) for _ in range(6)]
    start = threading.Barrier(len(stores))
    failures: list[BaseException] = []

    def prepare(store: PostgresStore) -> None:
        start.wait()
        try:
            store.prepare()
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=prepare, args=(store,)) for store in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    for store in stores:
        store.close()
    assert failures == []
    assert schema_version(postgres_url) == len(MIGRATIONS)


def test_a_new_migration_is_applied_once_over_an_older_schema(store, postgres_url, monkeypatch):
    store.save_room("alice", RoomState(prefs={"kept": True}))
    monkeypatch.setattr(postgres, "MIGRATIONS", (*MIGRATIONS, ("ALTER TABLE rooms ADD COLUMN note text",)))
    newer = PostgresStore(postgres_url)
    newer.prepare()
    newer.prepare()  # already applied: not again (it would fail: the column exists)
    newer.close()
    assert schema_version(postgres_url) == len(MIGRATIONS) + 1
    assert store.load_room("alice").prefs == {"kept": True}


def test_a_failing_migration_leaves_the_schema_as_it_was(store, postgres_url, monkeypatch):
    broken = ("ALTER TABLE rooms ADD COLUMN note text", "ALTER TABLE nowhere ADD COLUMN x int")
    monkeypatch.setattr(postgres, "MIGRATIONS", (*MIGRATIONS, broken))
    newer = PostgresStore(postgres_url)
    with pytest.raises(StoreError):
        newer.prepare()
    newer.close()
    assert schema_version(postgres_url) == len(MIGRATIONS)
    with psycopg.connect(postgres_url) as conn:
        assert conn.execute(
            "SELECT count(*) FROM information_schema.columns WHERE table_name = 'rooms' AND column_name = 'note'"
        ).fetchone()[0] == 0  # one transaction: the first step is undone too


def test_a_database_of_a_newer_atlas_is_refused(store, postgres_url):
    with psycopg.connect(postgres_url) as conn:
        conn.execute("UPDATE schema_version SET version = 999")
    older = PostgresStore(postgres_url)
    with pytest.raises(StoreError, match="999.*upgrade Atlas"):
        older.prepare()
    older.close()


# --- Unavailable, recovery, and no password anywhere ---------------------------------------------

def test_location_and_errors_never_show_the_password():
    port = free_port()  # nothing listens there
    for url in (
        f"postgresql://atlas:{PASSWORD}@127.0.0.1:{port}/atlas",
        f"postgresql://atlas@127.0.0.1:{port}/atlas?password={PASSWORD}&sslmode=disable",
        f"postgresql://atlas:{PASSWORD.replace('-', '%2D')}@127.0.0.1:{port}/atlas",
    ):
        store = PostgresStore(url, timeout=1.0)
        assert PASSWORD not in store.location and "%2D" not in store.location
        assert store.location.startswith(f"database postgresql://atlas@127.0.0.1:{port}/atlas")
        with pytest.raises(StoreUnavailable) as caught:
            store.prepare()
        message = str(caught.value)
        assert PASSWORD not in message and "%2D" not in message
        assert "unavailable" in message and str(port) in message
        with pytest.raises(StoreUnavailable) as caught:
            store.load_user("alice")  # through the pool, after its timeout
        assert PASSWORD not in str(caught.value)
        store.close()
    assert redact_database_url("postgres://u:p@h/d") == "postgres://u@h/d"


def test_a_database_that_goes_away_is_unavailable_then_used_again(postgres_cluster, postgres_url):
    store = PostgresStore(postgres_url, timeout=2.0)
    store.prepare()
    store.save_user(UserRecord(id="alice", virtual_key="sk-test-pg-alice-0123"))
    postgres_cluster.stop()
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            store.load_user("alice")
        assert time.monotonic() - started < 10  # bounded by the store's timeout
        with pytest.raises(StoreUnavailable):
            store.save_room("alice", RoomState(prefs={"a": 1}), owner_must_exist=True)
    finally:
        postgres_cluster.start()
    # The same store, without a restart: the pool replaces its dead connections.
    assert store.load_user("alice") is not None
    store.save_room("alice", RoomState(prefs={"a": 1}), owner_must_exist=True)
    assert store.load_room("alice").prefs == {"a": 1}
    store.close()


# --- The command line ------------------------------------------------------------------------------

def test_help_of_serve_and_user_names_the_database_url():
    for command in (["serve"], ["user", "add"], ["user", "list"], ["user", "remove"]):
        shown = atlas(*command, "--help")
        assert "--database-url" in shown.stdout and "ATLAS_DATABASE_URL" in shown.stdout, command


def test_a_database_url_that_is_not_postgresql_is_one_line_without_the_value(tmp_path):
    result = atlas("serve", "--data-dir", str(tmp_path / "data"),
                   env={"ATLAS_DATABASE_URL": f"mysql://atlas:{PASSWORD}@db/atlas"})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "ATLAS_DATABASE_URL" in lines[0] and PASSWORD not in result.stderr


@pytest.mark.parametrize("command", [["serve", "--bind", "127.0.0.1:0"], ["user", "list"]])
def test_an_unreachable_database_is_one_line_and_exit_1(tmp_path, command):
    url = f"postgresql://atlas:{PASSWORD}@127.0.0.1:{free_port()}/atlas"
    result = atlas(*command, "--data-dir", str(tmp_path / "data"), env={"ATLAS_DATABASE_URL": url})
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "unavailable" in lines[0], result.stderr
    assert PASSWORD not in result.stderr + result.stdout


def test_user_commands_on_postgresql(tmp_path, postgres_url):
    data_dir = tmp_path / "data"
    db = ["--data-dir", str(data_dir), "--database-url", postgres_url]
    key = new_key("pgcli")
    added = atlas("user", "add", "carol", "--virtual-key", key, *db)
    assert added.returncode == 0, added.stderr
    token = added.stdout.strip().splitlines()[-1]
    SECRETS.add(token)
    with psycopg.connect(postgres_url) as conn:
        stored = conn.execute("SELECT hash, user_id FROM tokens").fetchall()
    assert len(stored) == 1 and stored[0][1] == "carol" and token not in stored[0][0]
    assert not (data_dir / "users").exists()  # nothing went to the data directory

    listed = atlas("user", "list", *db)
    assert "carol" in listed.stdout and key[-4:] in listed.stdout and key not in listed.stdout
    assert atlas("user", "add", "carol", "--virtual-key", key, *db).returncode == 1
    assert atlas("user", "rotate-token", "carol", *db).returncode == 0
    removed = atlas("user", "remove", "carol", *db)
    assert removed.returncode == 0, removed.stderr
    assert "No users" in atlas("user", "list", *db).stdout
    with psycopg.connect(postgres_url) as conn:
        assert conn.execute("SELECT count(*) FROM tokens").fetchone()[0] == 0


# --- The whole server on PostgreSQL ----------------------------------------------------------------

async def test_prefs_survive_a_server_restart_on_postgresql(tmp_path, postgres_url):
    """Users made by `atlas user add` (another process), a server on the database, a restart."""
    data_dir = tmp_path / "data"
    added = atlas("user", "add", "alice", "--virtual-key", new_key("alice"),
                  "--data-dir", str(data_dir), "--database-url", postgres_url)
    assert added.returncode == 0, added.stderr
    token = added.stdout.strip().splitlines()[-1]
    SECRETS.add(token)

    for run in range(2):
        async with open_atlas(tmp_path, database_url=postgres_url) as server:
            async with connect(server.ws_url("alice", token)) as ws:
                frame = await ready(ws)
                if run == 0:
                    assert frame["prefs"] == {}
                    await send_json(ws, {"type": "prefs:set", "prefs": {"theme": "dark"}})
                    assert (await receive_json(ws))["prefs"] == {"theme": "dark"}
                else:
                    assert frame["prefs"] == {"theme": "dark"}  # read back from the database
    assert not (data_dir / "rooms").exists()


async def test_atlas_serve_on_postgresql_logs_the_database_without_its_password(tmp_path, postgres_url):
    url = with_password(postgres_url)
    data_dir = tmp_path / "data"
    SECRETS.add(url)
    server = await start_atlas_process(
        data_dir, "--provider-url", "http://127.0.0.1:9/v1", env={"ATLAS_DATABASE_URL": url},
    )
    try:
        token = atlas("user", "add", "dave", "--virtual-key", new_key("dave"),
                      env={"ATLAS_DATABASE_URL": url}).stdout.strip().splitlines()[-1]
        SECRETS.add(token)
        async with connect(server.url.replace("http://", "ws://") + f"/party/dave?token={token}") as ws:
            await ready(ws)
    finally:
        assert server.terminate() == 0
    log = server.log()
    assert f"database {postgres_url}" in log  # where the data is, password left out
    assert PASSWORD not in log


async def test_a_database_outage_is_store_unavailable_then_the_room_works_again(
    tmp_path, postgres_url, postgres_cluster,
):
    store = PostgresStore(postgres_url, timeout=1.0)
    store.prepare()
    try:
        async with open_atlas(
            tmp_path, users={"alice": None}, database_url=postgres_url, store=store, auth_cache_seconds=60,
        ) as server:
            url = server.ws_url("alice", server.tokens["alice"])
            async with connect(url) as ws:
                await ready(ws)
                await send_json(ws, {"type": "prefs:set", "prefs": {"a": 1}})
                assert (await receive_json(ws))["prefs"] == {"a": 1}
                await trio.to_thread.run_sync(postgres_cluster.stop)
                try:
                    # The room's lease went with the database session: the room is given up.
                    frame = await receive_json(ws)
                    assert frame["type"] == "error" and frame["error"]["code"] == "store_unavailable"
                    assert PASSWORD not in frame["error"]["message"]
                    await closed(ws)
                    assert ws.closed.code == 1011
                    # While the database is down the room is not served here (the token is cached).
                    async with connect(url) as refused:
                        frame = await receive_json(refused)
                        assert frame["type"] == "error" and frame["error"]["code"] == "store_unavailable"
                        await closed(refused)
                        assert refused.closed.code == 1011
                finally:
                    await trio.to_thread.run_sync(postgres_cluster.start)
            # Back: the room is served again (its lease taken again), with what was acknowledged.
            with trio.fail_after(10):
                while True:
                    async with connect(url) as ws:
                        frame = await receive_json(ws)
                        if frame["type"] == "ready":
                            assert frame["prefs"] == {"a": 1}
                            await send_json(ws, {"type": "prefs:set", "prefs": {"b": 3}})
                            assert (await receive_json(ws))["prefs"] == {"a": 1, "b": 3}
                            break
                        assert frame["error"]["code"] == "store_unavailable", frame
                    await trio.sleep(0.1)  # a client's reconnect delay, not a synchronisation
    finally:
        store.close()
    with psycopg.connect(postgres_url) as conn:
        stored = conn.execute("SELECT state->'prefs' FROM rooms WHERE id = 'alice'").fetchone()[0]
    assert stored == {"a": 1, "b": 3}


async def closed(ws) -> None:
    """Wait until the server closed ``ws`` (frames still arriving are skipped)."""
    with trio.fail_after(10):
        try:
            while True:
                await ws.get_message()
        except ConnectionClosed:
            return
