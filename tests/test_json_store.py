"""The JSON store's own guarantees: private files, atomic durable writes, files of older versions,
a corrupt file failing its user only, and a kill -9 of the server mid-write. What every backend
guarantees is tested on both in test_store.py."""

from __future__ import annotations

import json
import os
import stat

import pytest
import trio
from servers import (
    add_user,
    connect,
    open_atlas,
    ready,
    receive_json,
    send_json,
    start_atlas_process,
)

from atlas.store import JsonStore, RoomState, StoreCorrupt, UserRecord, mask_key


def test_writes_are_private_and_leave_no_temporary_files(tmp_path):
    store = JsonStore(tmp_path / "data")
    store.prepare()
    store.save_room("alice", RoomState(prefs={"a": 1}))
    store.save_room("alice", RoomState(prefs={"a": 2}))
    path = store.room_path("alice")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(store.data_dir).st_mode) == 0o700
    assert os.listdir(store.rooms_dir) == ["alice.json"]
    assert json.loads(path.read_bytes()) == {"prefs": {"a": 2}}


def test_old_files_without_new_fields_still_load(tmp_path):
    store = JsonStore(tmp_path / "data")
    store.prepare()
    store.user_path("old").write_text('{"id": "old", "virtualKey": "k"}')
    store.room_path("old").write_text("{}")
    assert store.load_user("old") == UserRecord(id="old", virtual_key="k")
    assert store.load_room("old") == RoomState()


@pytest.mark.parametrize("content", [b"{not json", b'{"prefs": []}', b"\xff\xfe"])
def test_corrupt_file_names_its_path_and_is_left_alone(tmp_path, content):
    store = JsonStore(tmp_path / "data")
    store.prepare()
    path = store.room_path("alice")
    path.write_bytes(content)
    with pytest.raises(StoreCorrupt) as caught:
        store.load_room("alice")
    assert str(path) in str(caught.value)
    assert path.read_bytes() == content


def test_ids_cannot_escape_the_data_directory(tmp_path):
    store = JsonStore(tmp_path / "data")
    for bad in ("../x", "a/b", "", "x" * 129):
        with pytest.raises(ValueError):
            store.room_path(bad)


def test_mask_shows_only_the_last_four():
    assert mask_key("sk-live-abcdef123456") == "…3456"
    assert mask_key("short") == "…"
    assert mask_key("") == ""


async def test_corrupt_room_file_fails_that_user_only(tmp_path):
    async with open_atlas(tmp_path, users={"alice": None, "bob": None}) as server:
        corrupt = server.data_dir / "rooms" / "alice.json"
        corrupt.write_bytes(b'{"prefs": {"theme": "da')
        async with connect(server.ws_url("alice", server.tokens["alice"])) as ws:
            frame = await receive_json(ws)
            assert frame["type"] == "error" and frame["error"]["code"] == "internal"
            assert "unreadable" in frame["error"]["message"]
        async with connect(server.ws_url("bob", server.tokens["bob"])) as ws:
            await ready(ws)
            await send_json(ws, {"type": "prefs:set", "prefs": {"ok": 1}})
            assert (await receive_json(ws))["prefs"] == {"ok": 1}
        assert corrupt.read_bytes() == b'{"prefs": {"theme": "da'


async def test_kill_9_during_concurrent_prefs_writes_leaves_valid_files(tmp_path):
    data_dir = tmp_path / "data"
    users = [f"user{n}" for n in range(4)]
    writers = [f"w{n}" for n in range(3)]  # each writer owns one prefs key of its user's room
    tokens = {user: add_user(data_dir, user) for user in users}
    atlas = await start_atlas_process(data_dir, "--provider-url", "http://127.0.0.1:9/v1")
    acknowledged = {(user, writer): -1 for user in users for writer in writers}
    sent = dict(acknowledged)
    killed = trio.Event()

    async def write_forever(user: str, writer: str) -> None:
        url = atlas.url.replace("http://", "ws://") + f"/party/{user}?token={tokens[user]}"
        try:
            async with connect(url) as ws:
                await ready(ws)
                for n in range(1_000_000):
                    sent[user, writer] = n
                    await send_json(ws, {"type": "prefs:set", "prefs": {writer: n, "pad": "p" * 2000}})
                    reply = await receive_json(ws)
                    acknowledged[user, writer] = reply["prefs"][writer]
        except Exception:
            if not killed.is_set():
                raise

    async with trio.open_nursery() as nursery:
        for user in users:
            for writer in writers:
                nursery.start_soon(write_forever, user, writer)
        with trio.fail_after(30):
            while min(acknowledged.values()) < 50:
                await trio.sleep(0.01)  # until every writer has had many durable writes
        atlas.process.kill()  # SIGKILL, mid-write
        killed.set()
        atlas.process.wait()
        nursery.cancel_scope.cancel()

    for user in users:
        state = json.loads((data_dir / "rooms" / f"{user}.json").read_bytes())  # valid JSON
        for writer in writers:
            # Never older than what the server acknowledged, never newer than what was sent.
            assert acknowledged[user, writer] <= state["prefs"][writer] <= sent[user, writer]
            assert acknowledged[user, writer] >= 50


def test_records_holding_keys_never_show_them_in_repr():
    from atlas.store import Identity

    key = "sk-test-repr-0123456789abcdef"
    for record in (UserRecord(id="a", virtual_key=key), Identity(id="a", virtual_key=key)):
        assert key not in repr(record) and key not in str(record) and "…cdef" in repr(record)
