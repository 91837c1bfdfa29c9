"""Crash loop: ``atlas serve`` is killed with SIGKILL at a random moment under load, again and again.

Each cycle: several users' connections write prefs and run agent requests that extend a
conversation, concurrently; the server is killed (``kill -9``) at a random moment; then every
JSON file in the data directory must decode, every prefs write a client saw acknowledged (the
``prefs`` reply) must be on disk, and so must every conversation turn whose ``agent:done`` a client
received (the turn is durable before ``agent:done``). The server restarts on the same directory,
no temporary file of an interrupted write may survive its start-up, and its usage ledger counts
at least every request whose ``agent:done`` arrived (usage is durable before ``agent:done`` too).

On both store backends. With PostgreSQL, every third cycle the database is killed (SIGKILL of the
postmaster and its processes) right after the server, so its crash recovery must keep every
acknowledged write too.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
import wsproto
from fake_provider import Reply
from probes import Closed, RawWebSocket, raw_http, record, scaled
from servers import AtlasProcess, add_user, start_atlas_process
from store_backends import Backend

from atlas.store import Store

CYCLES = scaled(3, 25)
USERS = ("ann", "ben", "cyd")
CONNECTIONS_PER_USER = 2
BROKEN = (Closed, trio.BrokenResourceError, trio.ClosedResourceError, OSError,
          wsproto.utilities.LocalProtocolError)


@dataclass
class Acks:
    prefs: dict[tuple[str, str], int] = field(default_factory=dict)  # (user, key) -> last value acked
    turns: dict[tuple[str, str], str] = field(default_factory=dict)  # (user, conversation) -> message
    requests: dict[str, int] = field(default_factory=dict)  # user -> agent:done received
    prefs_count: int = 0
    turns_count: int = 0


async def client(port: int, user: str, token: str, slot: int, acks: Acks, seq: list[int]) -> None:
    """Write prefs and extend a conversation until the server dies under us."""
    key, conversation = f"c{slot}", f"conv{slot}"
    try:
        ws = await RawWebSocket.open(port, f"/party/{user}?token={token}")
    except BROKEN:
        return
    try:
        assert (await ws.receive_json())["type"] == "ready"
        while True:
            seq[0] += 1
            value = seq[0]
            await ws.send_json({"type": "prefs:set", "prefs": {key: value}})
            reply = await ws.receive_json()
            assert reply["type"] == "prefs" and reply["prefs"][key] == value, reply
            acks.prefs[(user, key)] = value
            acks.prefs_count += 1
            message = f"turn {user} {slot} {value}"
            await ws.send_json({"type": "agent:text", "message": message, "conversationId": conversation})
            done = await ws.receive_json()
            assert done["type"] == "agent:done", done
            acks.turns[(user, conversation)] = message
            acks.turns_count += 1
            acks.requests[user] = acks.requests.get(user, 0) + 1
    except BROKEN:
        return
    finally:
        await ws.abort()


def check_files(data_dir: Path) -> int:
    """Every JSON file decodes; returns how many temporary files were left behind."""
    leftovers = 0
    for path in data_dir.rglob("*"):
        if path.name.endswith(".tmp"):
            leftovers += 1
        elif path.suffix == ".json":
            json.loads(path.read_bytes())  # raises on a torn file
    return leftovers


def check_acks(store: Store, acks: Acks) -> None:
    """Every acknowledged write is in the store, read back through its own interface."""
    for (user, key), value in acks.prefs.items():
        state = store.load_room(user)
        # A write may have reached the disk without its reply reaching the client: never less.
        assert state.prefs.get(key, -1) >= value, (user, key, value, state.prefs)
    for (user, conversation), message in acks.turns.items():
        contents = [turn.content for turn in store.load_room(user).conversations.get(conversation, [])]
        assert message in contents, (user, conversation, message, contents[-4:])


async def check_usage(port: int, tokens: dict[str, str], acks: Acks) -> int:
    """Every request whose agent:done arrived is in the usage ledger (it is durable before
    agent:done), read back through the restarted server. Returns the requests counted."""
    counted = 0
    for user, token in tokens.items():
        reply = await raw_http(port, b"GET", f"/party/{user}/usage".encode(),
                               [(b"authorization", f"Bearer {token}".encode())])
        assert reply is not None and reply.status == 200, reply
        requests = sum(day["requests"] for day in reply.json()["days"])
        assert requests >= acks.requests.get(user, 0), (user, requests, acks.requests.get(user))
        counted += requests
    return counted


async def test_no_acknowledged_write_is_lost_across_kill_9(tmp_path, provider, backend: Backend,
                                                          request: pytest.FixtureRequest):
    provider.behaviour = Reply(deltas=["a", "b", "c"])
    data_dir = backend.data_dir
    database: Any = None
    env = {"ATLAS_PROVIDER_URL": provider.url}
    if backend.database_url is not None:
        database = request.getfixturevalue("postgres_cluster")
        env["ATLAS_DATABASE_URL"] = backend.database_url
    tokens = {user: add_user(data_dir, user, database_url=backend.database_url) for user in USERS}
    rng = random.Random(14)
    acks = Acks()
    seq = [0]
    leftovers_after_kill = database_kills = 0
    process: AtlasProcess = await start_atlas_process(data_dir, env=env)
    processes = [process]
    try:
        for cycle in range(CYCLES):
            port = int(process.url.rsplit(":", 1)[1])
            with trio.fail_after(30):
                async with trio.open_nursery() as nursery:
                    for user in USERS:
                        for slot in range(CONNECTIONS_PER_USER):
                            nursery.start_soon(client, port, user, tokens[user], slot, acks, seq)
                    await trio.sleep(rng.uniform(0.2, 0.8))  # the random moment of the crash
                    process.kill()
                    if database is not None and cycle % 3 == 2:
                        await trio.to_thread.run_sync(database.kill)
                        database_kills += 1
            assert process.process.returncode == -9
            if database is not None:
                await trio.to_thread.run_sync(database.start)  # crash recovery, when it was killed
            leftovers_after_kill += check_files(data_dir)
            store = backend.open_store()
            try:
                check_acks(store, acks)
            finally:
                store.close()
            process = await start_atlas_process(data_dir, env=env)
            processes.append(process)
            assert check_files(data_dir) == 0, "a temporary file survived the start-up"
            ledger = await check_usage(int(process.url.rsplit(":", 1)[1]), tokens, acks)
    finally:
        if process.process.poll() is None:
            process.terminate()
    for each in processes:
        assert "Traceback" not in each.log(), each.log()[-3000:]
    record(f"crash loop ({backend.name})", cycles=CYCLES, database_kills=database_kills,
           acknowledged_prefs=acks.prefs_count, acknowledged_turns=acks.turns_count,
           requests_in_ledger=ledger, leftover_tmp_after_kill=leftovers_after_kill, lost=0)
    assert acks.prefs_count >= CYCLES and acks.turns_count >= 1
