"""Room leases on a real PostgreSQL (atlas/store/pg_leases.py): one owner per room among the
sessions of several "processes" (two PostgresLeases on one database here), what happens when a
session is lost, the fence on room writes, and hand-off notifications. The whole gateway with
several processes behind HAProxy is in test_scale.py."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import psycopg
import pytest
import trio

from atlas.store import LeaseLost, LocalLeases, RoomState, StoreUnavailable
from atlas.store.pg_leases import PostgresLeases, room_key
from atlas.store.postgres import PostgresStore

WAIT = 10.0


@pytest.fixture
def store(postgres_url):
    store = PostgresStore(postgres_url, timeout=1.0)
    store.prepare()
    yield store
    store.close()


@asynccontextmanager
async def serving(store: PostgresStore, count: int = 2) -> AsyncIterator[list[PostgresLeases]]:
    async with trio.open_nursery() as nursery:
        leases = [store.room_leases() for _ in range(count)]
        for lease in leases:
            await nursery.start(lease.serve)
        yield leases
        nursery.cancel_scope.cancel()


def lease_backends(url: str) -> list[int]:
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = 'atlas leases' AND datname = current_database()"
        ).fetchall()
    return [row[0] for row in rows]


def terminate(url: str, pid: int) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(%s)", (pid,))


async def acquired(leases: PostgresLeases, room_id: str):
    """The lease once it can be taken (a release is asynchronous; a session is opened again
    with backoff), within WAIT seconds."""
    with trio.fail_after(WAIT):
        while True:
            try:
                if (lease := await leases.acquire(room_id)) is not None:
                    return lease
            except StoreUnavailable:
                pass
            await trio.sleep(0.01)  # polling for the lock or the session, not a timing guess


def test_room_keys_are_64_bit_and_stable():
    assert room_key("alice") == room_key("alice")
    assert room_key("alice") != room_key("alicf")
    keys = {room_key(f"user-{n}") for n in range(100_000)}
    assert len(keys) == 100_000
    assert all(-(2**63) <= key < 2**63 for key in keys)


async def test_one_owner_per_room_until_it_releases(store):
    async with serving(store) as (a, b):
        lease = await a.acquire("alice")
        assert lease is not None and lease.fence is not None
        assert await b.acquire("alice") is None
        other = await b.acquire("bob")  # another room is free
        assert other is not None
        a.release(lease)
        taken = await acquired(b, "alice")
        assert taken.fence > lease.fence
        assert await a.acquire("alice") is None


async def test_the_fence_refuses_a_write_from_an_owner_that_lost_the_room(store):
    async with serving(store) as (a, b):
        old = await a.acquire("alice")
        store.save_room("alice", RoomState(prefs={"v": 1}), fence=old.fence)
        # a's session ends behind its back; b takes the room over and writes.
        a.release(old)
        new = await acquired(b, "alice")
        store.save_room("alice", RoomState(prefs={"v": 2}), fence=new.fence)
        with pytest.raises(LeaseLost):
            store.save_room("alice", RoomState(prefs={"v": "stale"}), fence=old.fence)
        assert store.load_room("alice").prefs == {"v": 2}


async def test_a_takeover_racing_writes_loads_every_write_that_was_acknowledged(store):
    """The old owner keeps writing while the room is taken over: every write that returned is in
    what the new owner loads, and every write after the takeover is refused."""
    async with serving(store) as (a, b):
        old = await a.acquire("alice")
        acknowledged: list[int] = []
        refused: list[int] = []
        stop = False

        def write_until_stopped() -> None:
            n = 0
            while not stop:
                n += 1
                try:
                    store.save_room("alice", RoomState(prefs={"n": n}), fence=old.fence)
                    acknowledged.append(n)
                except LeaseLost:
                    refused.append(n)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, write_until_stopped)
            with trio.fail_after(WAIT):
                while len(acknowledged) < 20:
                    await trio.sleep(0.005)
            a.release(old)
            new = await acquired(b, "alice")
            loaded = await trio.to_thread.run_sync(store.load_room, "alice")
            with trio.fail_after(WAIT):
                while len(refused) < 5:
                    await trio.sleep(0.005)
            stop = True
        assert new.fence > old.fence
        assert loaded.prefs == {"n": acknowledged[-1]}
        assert min(refused) > acknowledged[-1]


async def test_a_lost_session_loses_every_lease_and_a_new_one_takes_rooms_again(store, postgres_url):
    async with serving(store, 1) as (leases,):
        first, second = await leases.acquire("alice"), await leases.acquire("bob")
        assert await leases.healthy()
        (pid,) = await trio.to_thread.run_sync(lease_backends, postgres_url)
        await trio.to_thread.run_sync(terminate, postgres_url, pid)
        with trio.fail_after(WAIT):
            await first.lost.wait()
        assert second.lost.is_set()
        # The locks went with the session: another session can take the rooms at once.
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            assert conn.execute("SELECT pg_try_advisory_lock(%s)", (room_key("alice"),)).fetchone()[0]
            conn.execute("SELECT pg_advisory_unlock(%s)", (room_key("alice"),))
        # ... and this process connects again by itself.
        again = await acquired(leases, "alice")
        assert not again.lost.is_set() and again.fence > first.fence
        assert await leases.healthy()
        assert leases.sessions == 2


async def test_while_the_database_is_down_nothing_is_granted_and_health_says_so(store, postgres_cluster):
    async with serving(store, 1) as (leases,):
        lease = await leases.acquire("alice")
        await trio.to_thread.run_sync(postgres_cluster.kill)
        try:
            with trio.fail_after(WAIT):
                await lease.lost.wait()
            assert not await leases.healthy()
            with pytest.raises(StoreUnavailable) as caught:
                await leases.acquire("bob")
            assert "postgres@" in str(caught.value)  # the location, without a password
        finally:
            await trio.to_thread.run_sync(postgres_cluster.start)
        await acquired(leases, "alice")
        with trio.fail_after(WAIT):
            while not await leases.healthy():
                await trio.sleep(0.05)


async def test_a_want_reaches_every_session(store):
    async with serving(store) as (a, b):
        await b.want("alice")
        with trio.fail_after(WAIT):
            assert await a.wait_wanted() == "alice"
            assert await b.wait_wanted() == "alice"


async def test_a_session_ends_with_its_service(store, postgres_url):
    async with serving(store, 1) as (leases,):
        lease = await leases.acquire("alice")
    assert lease.lost.is_set()
    with trio.fail_after(WAIT):
        while await trio.to_thread.run_sync(lease_backends, postgres_url):
            await trio.sleep(0.02)


async def test_local_leases_grant_everything_and_never_lose():
    leases = LocalLeases()
    first, second = await leases.acquire("alice"), await leases.acquire("alice")
    assert first is not None and second is not None and first.fence is None
    leases.release(first)
    assert not first.lost.is_set() and await leases.healthy()


def test_acquire_needs_a_session():
    leases = PostgresLeases(
        "postgresql://nobody@127.0.0.1:9/none", location="database x", scrub=str, connect_timeout=1,
    )

    async def main():
        with pytest.raises(StoreUnavailable):
            await leases.acquire("alice")
        assert not await leases.healthy()

    trio.run(main)
