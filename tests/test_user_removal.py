"""A removed user's data is gone for good, also while the server runs (issue 9).

The reproduction: alice stores a private pref, the operator removes her with ``atlas user remove``
and adds a new ``alice``; the new person must not see the previous person's prefs, whatever was
open or in flight during the removal, and nothing a crash left behind may keep them either.
Each test runs on both store backends (the ``backend`` fixture: JSON files, PostgreSQL).
"""

from __future__ import annotations

import subprocess

import trio
from fake_provider import Reply, open_fake_provider
from servers import (
    SECRETS, WAIT, atlas_command, connect, open_atlas, ready, receive_json, receive_until, send_json,
)
from test_websocket import closed_with

from atlas.store import JsonStore


def atlas_user(backend, *args: str) -> str:
    """``atlas user ...`` as the operator runs it: another process on the same store."""
    done = subprocess.run(
        atlas_command("user", *args, *backend.cli_args()),
        capture_output=True, text=True, timeout=WAIT * 3,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def add_again(backend, user_id: str) -> str:
    token = atlas_user(backend, "add", user_id, "--virtual-key", "sk-test-k2-0123456789").splitlines()[-1]
    SECRETS.add(token)
    SECRETS.add("sk-test-k2-0123456789")
    return token


async def store_diary(ws) -> None:
    await send_json(ws, {"type": "prefs:set", "prefs": {"diary": "private"}})
    assert (await receive_json(ws)) == {"type": "prefs", "prefs": {"diary": "private"}}


def leftovers(data_dir, user_id: str) -> list[str]:
    return sorted(p.name for p in data_dir.rglob("*") if user_id in p.name)


async def test_a_new_user_with_a_removed_users_id_starts_empty(tmp_path, backend):
    async with open_atlas(tmp_path, users={"alice": None}, auth_cache_seconds=60, **backend.settings) as server:
        async with connect(server.ws_url("alice", server.tokens["alice"])) as ws:
            await ready(ws)
            await store_diary(ws)
        atlas_user(backend, "remove", "alice")
        assert backend.leftovers("alice") == []
        token = add_again(backend, "alice")
        async with connect(server.ws_url("alice", token)) as ws:
            assert (await ready(ws))["prefs"] == {}


async def test_a_connection_held_open_through_the_removal_cannot_write_back(tmp_path, backend):
    """The auth cache still vouches for the old token (60 s): the store's own check refuses the
    write, the room is revoked, and its connection is closed with 4001."""
    async with open_atlas(tmp_path, users={"alice": None}, auth_cache_seconds=60, **backend.settings) as server:
        async with connect(server.ws_url("alice", server.tokens["alice"])) as held:
            await ready(held)
            await store_diary(held)
            atlas_user(backend, "remove", "alice")
            await send_json(held, {"type": "prefs:set", "prefs": {"diary": "written after removal"}})
            frames, code = await closed_with(held)
        assert code == 4001
        assert frames[-1]["type"] == "error" and frames[-1]["error"]["code"] == "unauthorized", frames
        assert backend.leftovers("alice") == []
        token = add_again(backend, "alice")
        async with connect(server.ws_url("alice", token)) as ws:
            assert (await ready(ws))["prefs"] == {}


async def test_an_idle_connection_is_closed_once_its_user_is_removed(tmp_path, backend):
    async with open_atlas(tmp_path, users={"alice": None}, auth_cache_seconds=0.2, **backend.settings) as server:
        async with connect(server.ws_url("alice", server.tokens["alice"])) as held:
            await ready(held)
            await store_diary(held)
            atlas_user(backend, "remove", "alice")
            frames, code = await closed_with(held)
        assert code == 4001
        assert [f["error"]["code"] for f in frames] == ["unauthorized"]
        assert backend.leftovers("alice") == []


async def test_a_stream_in_flight_during_removal_is_cancelled_and_writes_nothing(tmp_path, backend):
    async with open_fake_provider() as provider:
        gate = trio.Event()
        provider.behaviour = Reply(deltas=["one ", "two ", "three"], gate=gate, hold_after=1)
        async with open_atlas(
            tmp_path, users={"alice": None}, auth_cache_seconds=0.2, provider_url=provider.url,
            **backend.settings,
        ) as server:
            async with connect(server.ws_url("alice", server.tokens["alice"])) as ws:
                await ready(ws)
                await store_diary(ws)
                await send_json(ws, {
                    "type": "agent:stream", "id": "s", "message": "hi", "conversationId": "c1",
                })
                await receive_until(ws, "agent:delta")
                atlas_user(backend, "remove", "alice")
                frames, code = await closed_with(ws)
            assert code == 4001
            assert not any(f["type"] == "agent:done" for f in frames), frames
            with trio.fail_after(WAIT):
                await provider.wait_disconnect()
            gate.set()
            assert backend.leftovers("alice") == []
            token = add_again(backend, "alice")
            async with connect(server.ws_url("alice", token)) as ws:
                assert (await ready(ws))["prefs"] == {}


async def test_leftover_temporary_files_are_removed_at_start_up_and_with_their_user(tmp_path):
    data_dir = tmp_path / "data"
    store = JsonStore(data_dir)
    store.prepare()
    (store.rooms_dir / ".bob.json.0123456789ab.tmp").write_text('{"prefs": {"diary": "private"}}')
    (store.users_dir / ".carol.json.0123456789ab.tmp").write_text("{}")
    async with open_atlas(tmp_path, users={"alice": None}):
        assert leftovers(data_dir, "bob") == [] and leftovers(data_dir, "carol") == []
    # A crash leftover of alice's, seen by the removal.
    (store.rooms_dir / ".alice.json.0123456789ab.tmp").write_text('{"prefs": {"diary": "private"}}')
    subprocess.run(atlas_command("user", "remove", "alice", "--data-dir", str(data_dir)), check=True,
                   capture_output=True, timeout=WAIT * 3)
    assert leftovers(data_dir, "alice") == []
