"""Several `atlas serve` processes on one PostgreSQL database behind HAProxy (deploy/haproxy.cfg,
health checks every 200 ms): the contract's "Several processes, one database", with the real
things. Users are added with `atlas user add --database-url`; clients reconnect as partysocket
does (fleet.Client). Each test starts its own processes and balancer on a database of its own.
"""

from __future__ import annotations

from collections import Counter
from contextlib import AsyncExitStack

import httpx
import psycopg
import pytest
import trio
from fake_provider import Reply
from fleet import (
    WAIT, Client, Proxy, cli_add_user, health, open_client, owner_of, start_fleet, start_proxy, stop_fleet,
    wait_for,
)
from haproxy_proc import require_haproxy
from servers import AtlasProcess


@pytest.fixture
async def fleet(tmp_path, postgres_url, provider):
    """``await fleet(n, proxy=True, env={...})``: n processes on the test's database (calling
    the fake provider), and HAProxy in front of them; all stopped after the test."""
    started: list[AtlasProcess] = []
    proxies: list[Proxy] = []

    async def start(count: int, *, proxy: bool = True, env: dict[str, str] | None = None):
        if proxy:
            require_haproxy()
        processes = await start_fleet(
            tmp_path, postgres_url, count, env={"ATLAS_PROVIDER_URL": provider.url, **(env or {})},
        )
        started.extend(processes)
        balancer = start_proxy(tmp_path, processes) if proxy else None
        if balancer is not None:
            proxies.append(balancer)
        return processes, balancer

    try:
        yield start
    finally:
        for balancer in proxies:
            balancer.haproxy.close()
        stop_fleet(started)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def ws_url(process: AtlasProcess, room: str, token: str) -> str:
    return f"{process.url.replace('http://', 'ws://')}/parties/main/{room}?token={token}"


def stored_prefs(database_url: str, room: str) -> dict:
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT state->'prefs' FROM rooms WHERE id = %s", (room,)).fetchone()
    return row[0] if row else {}


def assert_clean_logs(processes: list[AtlasProcess], proxy: Proxy | None, tokens: list[str]) -> None:
    for process in processes:
        log = process.log()
        assert "Traceback" not in log, log
    if proxy is not None:
        log = proxy.log()
        assert "/parties/main/" in log  # it logs requests...
        assert not [token for token in tokens if token in log]  # ...never their tokens


async def test_users_on_different_processes_work_through_haproxy_and_cli_users_reach_every_process(
    fleet, postgres_url, provider,
):
    processes, proxy = await fleet(3)
    # Added from the command line while the processes run: every process knows them at once.
    tokens = {f"user{n}": cli_add_user(postgres_url, f"user{n}") for n in range(6)}
    async with httpx.AsyncClient(timeout=WAIT) as http, AsyncExitStack() as stack:
        for process in processes:
            for user, token in tokens.items():
                response = await http.get(f"{process.url}/party/{user}", headers=bearer(token))
                assert response.status_code == 200, (process.url, user, response.text)
        clients: dict[str, Client] = {}
        for user, token in tokens.items():
            clients[user] = await stack.enter_async_context(open_client(proxy.ws_url(user, token)))
            assert (await clients[user].connect())["userId"] == user
        owners = {user: await owner_of(http, processes, user, token) for user, token in tokens.items()}
        assert None not in owners.values(), owners
        assert len({owner.url for owner in owners.values()}) >= 2, "every room landed on one process"

        first = "user0"
        second = next(user for user in tokens if owners[user] is not owners[first])
        for user in (first, second):
            done = await clients[user].ask("hello", "r1")
            assert done is not None and done["type"] == "agent:done", done
            assert done["text"] == "Hello, world"
        assert len({request.api_key for request in provider.requests}) == 2  # each user's own key
    assert_clean_logs(processes, proxy, list(tokens.values()))


async def test_the_same_room_on_two_processes_is_served_by_one_and_no_acknowledged_write_is_lost(
    fleet, postgres_url,
):
    # The owner keeps its room however often the other process is asked for it (no hand-off).
    (one, two), _ = await fleet(2, proxy=False, env={"ATLAS_ROOM_HANDOFF_SECONDS": "3600"})
    token = cli_add_user(postgres_url, "alice")
    async with httpx.AsyncClient(timeout=WAIT) as http, \
            open_client(ws_url(one, "alice", token)) as first, \
            open_client(ws_url(two, "alice", token)) as second:
        await first.connect()
        assert await second.attempt() is None
        assert second.refusals == [("room_elsewhere", 1013)]
        assert await first.write_prefs({"color": "blue"}) == ("ok", {"color": "blue"})
        # A second connection to the owner shares the room, broadcasts included.
        async with open_client(ws_url(one, "alice", token)) as also:
            await also.connect()
            await also.send({"type": "broadcast", "data": "hi"})
            assert (await first.next_frame(("broadcast",)))["data"] == "hi"
        # HTTP may be answered by any process: the other one reads the database.
        status = (await http.get(f"{two.url}/party/alice", headers=bearer(token))).json()
        assert status["prefs"] == {"color": "blue"} and status["connections"] == 0
        assert await second.attempt() is None
        assert second.refusals[-1] == ("room_elsewhere", 1013)

        one.kill()  # failover
        ready = await second.connect()
        assert ready["prefs"] == {"color": "blue"}
        assert await second.write_prefs({"size": 2}) == ("ok", {"color": "blue", "size": 2})
    assert stored_prefs(postgres_url, "alice") == {"color": "blue", "size": 2}
    assert_clean_logs([two], None, [token])


async def test_kill_9_of_the_serving_process_moves_its_room_within_seconds_and_keeps_every_acknowledged_write(
    fleet, postgres_url, provider,
):
    processes, proxy = await fleet(3)
    token = cli_add_user(postgres_url, "alice")
    provider.behaviour = Reply(deltas=["one ", "two ", "three"], gate=trio.Event(), hold_after=1)
    acknowledged: dict[str, int] = {}
    async with httpx.AsyncClient(timeout=WAIT) as http, open_client(proxy.ws_url("alice", token)) as client:
        await client.connect()
        owner = await wait_for("alice's room is served", lambda: owner_of(http, processes, "alice", token))
        # A stream in the middle (the provider holds it after its first delta)...
        assert await client.send({"type": "agent:stream", "id": "s1", "message": "count"})
        assert (await client.next_frame(("agent:delta",), "s1"))["text"] == "one "
        # ...and prefs writes, one after another, the last one in flight when the process dies.
        for n in range(1, 6):
            outcome, prefs = await client.write_prefs({f"w{n}": n})
            assert outcome == "ok", (outcome, prefs)
            acknowledged[f"w{n}"] = n
        assert await client.send({"type": "prefs:set", "prefs": {"w6": 6}})
        owner.kill()
        killed = trio.current_time()
        outcome, prefs = await client.prefs_reply()
        if outcome == "ok":  # answered before the kill took effect
            acknowledged["w6"] = 6

        ready = await client.connect()
        moved_in = trio.current_time() - killed
        assert moved_in < 5, f"the client was served again only after {moved_in:.1f} s"
        assert ready["prefs"].items() >= acknowledged.items(), (ready["prefs"], acknowledged)
        new_owner = await wait_for("alice's room is served again", lambda: owner_of(http, processes, "alice", token))
        assert new_owner is not owner
        for n in range(7, 12):
            outcome, prefs = await client.write_prefs({f"w{n}": n})
            assert outcome == "ok", (outcome, prefs)
            acknowledged[f"w{n}"] = n
        # The stream died with its process: never finished, the provider saw its request end.
        assert not [frame for frame in client.frames if frame["type"] == "agent:done"]
        await wait_for("the provider saw the killed process's request end", lambda: provider.requests[0].disconnected)
        provider.behaviour = Reply()
        done = await client.ask("again", "r2")
        assert done is not None and done["type"] == "agent:done", done
    assert stored_prefs(postgres_url, "alice").items() >= acknowledged.items()
    survivors = [process for process in processes if process is not owner]
    assert all(process.process.poll() is None for process in survivors)
    assert_clean_logs(survivors, proxy, [token])


async def test_a_database_restart_under_load_fails_cleanly_then_rooms_are_served_again(
    fleet, postgres_url, postgres_cluster,
):
    processes, proxy = await fleet(2)
    tokens = {user: cli_add_user(postgres_url, user) for user in ("alice", "bob", "carol")}
    acknowledged: dict[str, dict[str, int]] = {user: {} for user in tokens}
    seen: Counter[str] = Counter()  # what the clients were told, by code
    failed: Counter[str] = Counter()  # by user: requests that failed, connections refused
    clients: dict[str, Client] = {}
    stop = trio.Event()

    async def load(user: str, token: str) -> None:
        """Writes and agent requests, one after another, reconnecting whenever cut off."""
        async with open_client(proxy.ws_url(user, token)) as client:
            clients[user] = client
            n = 0
            while not stop.is_set():
                if not client.connected:
                    await client.connect(within=60)
                    seen["ready"] += 1
                n += 1
                outcome, value = await client.write_prefs({f"w{n}": n})
                if outcome == "ok":
                    acknowledged[user][f"w{n}"] = n
                else:
                    failed[user] += 1
                seen[value if outcome == "error" else outcome] += 1
                done = await client.ask(f"message {n}", f"r{n}")
                outcome = "cut" if done is None else done["type"] if done["type"] == "agent:done" else done["error"]["code"]
                failed[user] += outcome != "agent:done"
                seen[outcome] += 1
            seen.update(code for code, _ in client.refusals)

    def saw_the_outage(user: str) -> bool:
        return failed[user] + len(clients[user].refusals) > 0

    def served(count: int) -> bool:
        return all(len(writes) >= count for writes in acknowledged.values())

    async with httpx.AsyncClient(timeout=WAIT) as http, trio.open_nursery() as nursery:
        for user, token in tokens.items():
            nursery.start_soon(load, user, token)
        await wait_for("every user is served", lambda: served(3))

        await trio.to_thread.run_sync(postgres_cluster.kill)
        try:
            await wait_for(
                "every process reports the outage on /healthz",
                lambda: _all_status(http, processes, 503),
            )
            # Asked directly, a process refuses cleanly what needs the database.
            process, token = processes[0], tokens["alice"]
            status = await http.get(f"{process.url}/party/alice", headers=bearer(token))
            assert (status.status_code, status.json()["error"]["code"]) == (503, "store_unavailable")
            proxied = await http.post(
                f"{process.url}/party/alice?proxy=/agents/atlas-assistant/text", headers=bearer(token),
                json={"input": "hello"},
            )
            assert (proxied.status_code, proxied.json()["error"]["code"]) == (503, "store_unavailable")
            completion = await http.post(
                f"{process.url}/v1/chat/completions", headers=bearer(token),
                json={"model": "atlas-dev", "messages": [{"role": "user", "content": "hello"}]},
            )
            assert (completion.status_code, completion.json()["error"]["code"]) == (503, "store_unavailable")
            async with open_client(ws_url(process, "alice", token)) as direct:
                assert await direct.attempt() is None
                assert direct.refusals == [("store_unavailable", 1011)]
            # Every client has met the outage (a request cut or refused, a reconnect refused).
            await wait_for("every client saw the outage", lambda: all(saw_the_outage(user) for user in tokens))
            before = {user: len(writes) for user, writes in acknowledged.items()}
        finally:
            await trio.to_thread.run_sync(postgres_cluster.start)

        await wait_for("every process is healthy again", lambda: _all_status(http, processes, 200))
        await wait_for(
            "every user's room is served again (leases taken again)",
            lambda: all(len(acknowledged[user]) >= before[user] + 3 for user in tokens),
            timeout=30,
        )
        stop.set()

    assert all(process.process.poll() is None for process in processes), "a process died"
    # Clean failures only: cut off, refused by the balancer (no process up) or by a process
    # (store_unavailable while down; room_elsewhere while the processes come back one by one
    # and the balancer moves rooms between them), never "internal", never a hang.
    unexpected = {code for code in seen if code not in {
        "ok", "agent:done", "ready", "cut", "store_unavailable", "room_elsewhere", "closed",
        "ConnectionRejected",
    }}
    assert not unexpected, seen
    for user in tokens:
        assert stored_prefs(postgres_url, user).items() >= acknowledged[user].items(), user
    assert_clean_logs(processes, proxy, list(tokens.values()))


async def _all_status(http: httpx.AsyncClient, processes: list[AtlasProcess], status: int) -> bool:
    return all([await health(http, process) == status for process in processes])


async def test_a_process_added_behind_the_balancer_takes_its_rooms_over_once(fleet, postgres_url):
    (one, two), proxy = await fleet(2, env={"ATLAS_ROOM_HANDOFF_SECONDS": "0"})
    proxy.set_state("atlas2", "maint")  # as if the second process were not there yet
    tokens = {f"user{n}": cli_add_user(postgres_url, f"user{n}") for n in range(8)}
    async with httpx.AsyncClient(timeout=WAIT) as http, AsyncExitStack() as stack:
        first_tabs: dict[str, Client] = {}
        for user, token in tokens.items():
            first_tabs[user] = await stack.enter_async_context(open_client(proxy.ws_url(user, token)))
            await first_tabs[user].connect()
            assert await owner_of(http, [one, two], user, token) is one

        proxy.set_state("atlas2", "ready")
        await wait_for("atlas2 is up", lambda: _server_up(proxy, "atlas2"))
        moved = []
        for user, token in tokens.items():
            second_tab = await stack.enter_async_context(open_client(proxy.ws_url(user, token)))
            await second_tab.connect()
            if ("room_elsewhere", 1013) in second_tab.refusals:
                moved.append(user)
        assert 0 < len(moved) < len(tokens), moved  # consistent hashing moves some rooms, not all

        for user in tokens:
            tab = first_tabs[user]
            if user in moved:
                # Told once, and its reconnect lands on the new owner.
                frame = await tab.next_frame(("error",))
                assert frame is not None and frame["error"]["code"] == "room_elsewhere"
                assert await tab.next_frame(("error",)) is None
                assert tab.ws.closed.code == 1013
                await tab.connect()
                assert await owner_of(http, [one, two], user, tokens[user]) is two
            else:
                assert await tab.write_prefs({"still": "here"}) == ("ok", {"still": "here"})
                assert await owner_of(http, [one, two], user, tokens[user]) is one
    assert_clean_logs([one, two], proxy, list(tokens.values()))


def _server_up(proxy: Proxy, server: str) -> bool:
    for line in proxy.haproxy.command("show servers state atlas_rooms").splitlines():
        words = line.split()
        if len(words) > 5 and words[3] == server:
            return words[5] == "2"  # srv_op_state: 2 is running
    return False
