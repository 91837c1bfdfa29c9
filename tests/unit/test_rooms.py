"""Rooms (atlas/rooms.py) on an in-memory store: holding, idle eviction on the autojump clock,
failed loads, revocation, and the bounds on what a room writes.

The store's calls run in worker threads (as in production); the tests never have a deadline
pending while one runs, so the autojump clock only ever jumps to a room's idle timer or to a
test's own ``trio.sleep``."""

from __future__ import annotations

import json
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import msgspec
import pytest
import trio
import trio.testing

from atlas.protocol import CLOSE_INTERNAL, CLOSE_TRY_AGAIN, CLOSE_UNAUTHORIZED
from atlas.rooms import (
    MAX_CONVERSATION_CHARS, MAX_PREFS_BYTES, PrefsTooLarge, Room, RoomElsewhere, RoomRegistry, RoomSnapshot,
)
from atlas.store import (
    Identity, Lease, LocalLeases, RoomState, Store, StoreCorrupt, StoreUnavailable, TokenRecord, Turn, UserGone,
    UserRecord,
)
from atlas.store.base import Ledger
from atlas.store.records import UsageDay, UsageRecord, add_usage_days

IDLE = 30.0


class MemoryStore:
    """The store interface (atlas/store/base.py) in memory, counting loads and saves. A room
    load can be made to fail (``broken``) or to wait for the test (``hold_loads``). It says when a
    load has started (``load_started``): a worker thread runs when the OS schedules it, which
    ``wait_all_tasks_blocked`` cannot see."""

    def __init__(self) -> None:
        self.users: dict[str, UserRecord] = {}
        self.tokens: dict[str, TokenRecord] = {}
        self.rooms: dict[str, RoomState] = {}
        self.usage: dict[str, UsageRecord] = {}
        self.loads: list[str] = []
        self.saves: list[str] = []
        self.broken: set[str] = set()
        self.hold_loads: threading.Event | None = None
        self.load_started = threading.Event()

    @property
    def location(self) -> str:
        return "memory"

    def prepare(self) -> None:
        pass

    def close(self) -> None:
        pass

    async def read(self, fn, *args):  # type: ignore[no-untyped-def]
        return await trio.to_thread.run_sync(fn, *args)

    def load_user(self, user_id: str) -> UserRecord | None:
        return self.users.get(user_id)

    def save_user(self, user: UserRecord) -> None:
        self.users[user.id] = user

    def delete_user(self, user_id: str) -> None:
        self.users.pop(user_id, None)

    def user_ids(self) -> list[str]:
        return sorted(self.users)

    def has_users(self) -> bool:
        return bool(self.users)

    def load_token(self, token_hash: str) -> TokenRecord | None:
        return self.tokens.get(token_hash)

    def save_token(self, token_hash: str, user_id: str) -> None:
        if user_id not in self.users:
            raise UserGone(user_id)
        self.tokens[token_hash] = TokenRecord(user_id)

    def delete_token(self, token_hash: str) -> None:
        self.tokens.pop(token_hash, None)

    def load_room(self, room_id: str) -> RoomState:
        self.loads.append(room_id)
        self.load_started.set()
        if self.hold_loads is not None:
            self.hold_loads.wait(10)
        if room_id in self.broken:
            raise StoreCorrupt(f"memory:{room_id}", "not a room")
        # A copy, as a real backend decodes a new value each time.
        return msgspec.json.decode(msgspec.json.encode(self.rooms.get(room_id, RoomState())), type=RoomState)

    def room_leases(self) -> LocalLeases:
        return LocalLeases()

    def save_room(
        self, room_id: str, state: RoomState, *, owner_must_exist: bool = False, fence: int | None = None,
    ) -> None:
        if owner_must_exist and room_id not in self.users:
            raise UserGone(room_id)
        self.saves.append(room_id)
        self.rooms[room_id] = state

    def delete_room(self, room_id: str) -> None:
        self.rooms.pop(room_id, None)

    def remove_user(self, user_id: str) -> None:
        self.users.pop(user_id, None)
        self.rooms.pop(user_id, None)
        self.usage.pop(user_id, None)
        self.tokens = {h: t for h, t in self.tokens.items() if t.user_id != user_id}

    def load_usage(self, user_id: str) -> UsageRecord:
        return self.usage.get(user_id, UsageRecord())

    def add_usage(self, user_id: str, days: list[UsageDay], *, owner_must_exist: bool = False) -> None:
        if owner_must_exist and user_id not in self.users:
            raise UserGone(user_id)
        self.usage[user_id] = add_usage_days(self.load_usage(user_id), days)

    def usage_user_ids(self) -> list[str]:
        return sorted(self.usage)

    def usage_ledger(self, *, owner_must_exist: bool = False) -> Ledger:
        raise NotImplementedError("rooms never take the live ledger; the gateway's admission does")


class FakeConnection:
    """What a room needs of a connection (``atlas.rooms.Connection``), recording what it is told."""

    def __init__(self) -> None:
        self.frames: list[dict] = []
        self.closed: tuple[int, str] | None = None
        self.closed_after_pending: tuple[int, str] | None = None

    def send_nowait(self, frame: str) -> bool:
        self.frames.append(json.loads(frame))
        return True

    def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)

    def close_after_pending(self, code: int, reason: str) -> None:
        self.closed_after_pending = (code, reason)


def check_protocol(store: MemoryStore) -> Store:
    return store  # type-checks MemoryStore against the Protocol


@asynccontextmanager
async def open_registry(store: MemoryStore, **options) -> AsyncIterator[RoomRegistry]:
    """A registry whose room tasks run in a nursery of the test's, as ``serve_rooms`` runs them."""
    options.setdefault("idle_seconds", IDLE)
    async with trio.open_nursery() as nursery:
        yield RoomRegistry(check_protocol(store), nursery, **options)
        nursery.cancel_scope.cancel()


async def test_open_room_loads_once_and_holds_the_room(autojump_clock):
    store = MemoryStore()
    store.rooms["alice"] = RoomState(prefs={"theme": "dark"})
    async with open_registry(store) as registry:
        async with registry.open_room("alice") as room, registry.open_room("alice") as again:
            assert again is room
            assert room.prefs == {"theme": "dark"}
            assert store.loads == ["alice"]
            await trio.sleep(100 * IDLE)  # held: never evicted, however long
            assert registry.rooms == {"alice": room}
            assert registry.busy()


async def test_an_idle_room_is_evicted_after_idle_seconds_and_loaded_again(autojump_clock):
    store = MemoryStore()
    async with open_registry(store) as registry:
        async with registry.open_room("alice") as first:
            pass
        released = trio.current_time()
        await trio.sleep(IDLE - 0.001)
        assert registry.rooms == {"alice": first}
        await trio.sleep(0.002)
        assert registry.rooms == {}
        assert trio.current_time() - released == pytest.approx(IDLE + 0.001)
        async with registry.open_room("alice") as second:
            assert second is not first
        assert store.loads == ["alice", "alice"]


async def test_each_use_restarts_the_idle_timer(autojump_clock):
    async with open_registry(MemoryStore()) as registry:
        async with registry.open_room("alice") as room:
            pass
        for _ in range(3):
            await trio.sleep(IDLE - 1)
            async with registry.open_room("alice") as again:
                assert again is room
        await trio.sleep(IDLE - 1)
        assert "alice" in registry.rooms
        await trio.sleep(2)
        assert registry.rooms == {}


async def test_a_request_in_flight_keeps_the_room(autojump_clock):
    async with open_registry(MemoryStore()) as registry:
        finish = trio.Event()
        async with registry.open_room("alice") as room:
            room.start_request(finish.wait)
        await trio.sleep(10 * IDLE)
        assert registry.rooms == {"alice": room}  # no holder left: the request alone keeps it
        assert registry.busy()
        finish.set()
        await trio.sleep(IDLE - 0.001)
        assert registry.rooms == {"alice": room} and not registry.busy()
        await trio.sleep(0.002)
        assert registry.rooms == {}


async def test_a_failing_request_is_logged_and_releases_the_room(autojump_clock, caplog):
    async with open_registry(MemoryStore()) as registry:
        async with registry.open_room("alice") as room:
            async def fail() -> None:
                raise RuntimeError("boom")

            room.start_request(fail)
        await trio.testing.wait_all_tasks_blocked()
        assert not room.busy
        assert "agent request in room alice failed" in caplog.text and "boom" in caplog.text
        await trio.sleep(IDLE + 0.001)
        assert registry.rooms == {}


async def test_a_failed_load_is_not_cached(autojump_clock):
    store = MemoryStore()
    store.broken.add("alice")
    store.hold_loads = threading.Event()
    async with open_registry(store) as registry:
        errors = []

        async def open_alice() -> None:
            with pytest.raises(StoreCorrupt) as caught:
                async with registry.open_room("alice"):
                    pytest.fail("a room that cannot be loaded was opened")
            errors.append(str(caught.value))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(open_alice)
            await trio.to_thread.run_sync(store.load_started.wait)  # the first opener is loading
            nursery.start_soon(open_alice)  # the second waits for that same load
            await trio.testing.wait_all_tasks_blocked()
            assert store.loads == ["alice"]
            store.hold_loads.set()
        assert errors == ["stored memory:alice is unreadable: not a room"] * 2
        assert registry.rooms == {} and not registry.busy()

        store.broken.clear()  # an operator repaired it: the next open loads again
        store.rooms["alice"] = RoomState(prefs={"ok": 1})
        async with registry.open_room("alice") as room:
            assert room.prefs == {"ok": 1}
        assert store.loads == ["alice", "alice"]


async def test_revoke_closes_connections_cancels_requests_and_never_writes_again(autojump_clock):
    store = MemoryStore()
    store.users["alice"] = UserRecord(id="alice")
    async with open_registry(store, users_are_stored=True) as registry:
        one, two = FakeConnection(), FakeConnection()
        cancelled = trio.Event()

        async def request() -> None:
            try:
                await trio.sleep_forever()
            finally:
                cancelled.set()

        async with registry.open_room("alice") as room:
            room.attach(one)
            room.attach(two)
            room.start_request(request)
            await trio.testing.wait_all_tasks_blocked()
            room.revoke("this user was removed")
            room.revoke("again")  # a second revoke changes nothing
            await trio.testing.wait_all_tasks_blocked()
            assert cancelled.is_set()
            assert room.gone and registry.rooms == {}
            for connection in (one, two):
                assert connection.frames == [{"type": "error", "error": {
                    "code": "unauthorized", "message": "this user was removed"}}]
                assert connection.closed_after_pending == (CLOSE_UNAUTHORIZED, "this user was removed")
            with pytest.raises(UserGone):
                await room.merge_prefs({"after": "revoke"})
        assert store.saves == []
        async with registry.open_room("alice") as fresh:
            assert fresh is not room and not fresh.gone


async def test_a_write_for_a_removed_user_revokes_the_room(autojump_clock):
    store = MemoryStore()
    store.users["alice"] = UserRecord(id="alice")
    async with open_registry(store, users_are_stored=True) as registry:
        connection = FakeConnection()
        async with registry.open_room("alice") as room:
            room.attach(connection)
            await room.merge_prefs({"a": 1})
            store.remove_user("alice")  # from another process: only the store knows
            with pytest.raises(UserGone):
                await room.merge_prefs({"a": 2})
            assert room.prefs == {"a": 1} and room.gone
            assert connection.closed_after_pending == (CLOSE_UNAUTHORIZED, "this user no longer exists")
        assert store.saves == ["alice"] and "alice" not in store.rooms


def test_belongs_to_another():
    registry = RoomRegistry(MemoryStore(), None, idle_seconds=IDLE)  # type: ignore[arg-type]

    def room_of(created_at: float | None) -> Room:
        room = Room("alice", registry)
        room.set_identity(Identity("alice", created_at=created_at))
        return room

    assert room_of(1.0).belongs_to_another(Identity("alice", created_at=2.0))
    assert not room_of(1.0).belongs_to_another(Identity("alice", created_at=1.0))
    # Without a creation time on either side (external auth) nobody can tell: the same person.
    assert not room_of(None).belongs_to_another(Identity("alice", created_at=2.0))
    assert not room_of(1.0).belongs_to_another(Identity("alice"))
    assert not Room("alice", registry).belongs_to_another(Identity("alice", created_at=2.0))


async def test_a_user_created_again_gets_a_fresh_room(autojump_clock):
    store = MemoryStore()
    store.rooms["alice"] = RoomState(prefs={"diary": "private"})
    async with open_registry(store) as registry:
        connection = FakeConnection()
        async with registry.open_room("alice", Identity("alice", virtual_key="k1", created_at=1.0)) as old:
            old.attach(connection)
            assert old.has_credentials
        store.rooms.pop("alice")  # removed, then created again under the same id
        async with registry.open_room("alice", Identity("alice", created_at=2.0)) as new:
            assert new is not old and new.prefs == {} and not new.has_credentials
        assert old.gone
        assert connection.closed_after_pending == (CLOSE_UNAUTHORIZED, "this user was removed")
        async with registry.open_room("alice", Identity("alice", created_at=2.0)) as same:
            assert same is new  # the same person again: the same room


async def test_merge_prefs_merges_deletes_and_is_durable(autojump_clock):
    store = MemoryStore()
    store.rooms["alice"] = RoomState(prefs={"theme": "dark", "n": 1})
    async with open_registry(store) as registry:
        async with registry.open_room("alice") as room:
            merged = await room.merge_prefs({"n": None, "lang": "fr", "missing": None})
            assert merged == {"theme": "dark", "lang": "fr"}
            assert room.prefs == merged
            assert store.rooms["alice"].prefs == merged


async def test_merge_prefs_size_limit_is_exact_and_a_refusal_changes_nothing(autojump_clock):
    store = MemoryStore()
    async with open_registry(store) as registry:
        async with registry.open_room("alice") as room:
            overhead = len(msgspec.json.encode({"k": ""}))
            at_limit = {"k": "x" * (MAX_PREFS_BYTES - overhead)}
            assert len(msgspec.json.encode(at_limit)) == MAX_PREFS_BYTES
            assert await room.merge_prefs(at_limit) == at_limit
            with pytest.raises(PrefsTooLarge) as caught:
                await room.merge_prefs({"k": "x" * (MAX_PREFS_BYTES - overhead + 1)})
            assert str(caught.value) == "preferences are limited to 64 KiB"
            with pytest.raises(PrefsTooLarge):
                await room.merge_prefs({"more": 1})  # the merged whole counts, not the patch
            assert room.prefs == at_limit and store.rooms["alice"].prefs == at_limit
            assert store.saves == ["alice"]


def turns(*contents: str) -> list[Turn]:
    return [Turn("user" if n % 2 == 0 else "assistant", text) for n, text in enumerate(contents)]


async def test_append_turns_keeps_the_last_messages(autojump_clock):
    store = MemoryStore()
    async with open_registry(store) as registry:
        async with registry.open_room("alice") as room:
            for n in range(5):
                await room.append_turns("c1", turns(f"q{n}", f"a{n}"), keep=4)
            assert [t.content for t in room.conversation("c1")] == ["q3", "a3", "q4", "a4"]
            assert [t.content for t in store.rooms["alice"].conversations["c1"]] == ["q3", "a3", "q4", "a4"]
            assert room.conversation("elsewhere") == []


async def test_append_turns_bounds_the_characters_but_keeps_the_newest_turn(autojump_clock):
    async with open_registry(MemoryStore()) as registry:
        async with registry.open_room("alice") as room:
            half = "x" * (MAX_CONVERSATION_CHARS // 2)
            await room.append_turns("c1", turns("a", half), keep=40)
            await room.append_turns("c1", turns(half), keep=40)
            assert [t.content for t in room.conversation("c1")] == [half, half]  # exactly at the bound
            await room.append_turns("c1", turns("b"), keep=40)
            assert [t.content for t in room.conversation("c1")] == [half, "b"]
            huge = "y" * (MAX_CONVERSATION_CHARS + 1)
            await room.append_turns("c1", turns(huge), keep=40)
            assert [t.content for t in room.conversation("c1")] == [huge]  # alone over the bound, kept


async def test_append_turns_drops_the_least_recently_used_conversation(autojump_clock):
    store = MemoryStore()
    async with open_registry(store, max_conversations=3) as registry:
        async with registry.open_room("alice") as room:
            for name in ["c1", "c2", "c3"]:
                await room.append_turns(name, turns(name), keep=10)
            await room.append_turns("c1", turns("c1 again"), keep=10)  # c1 is now the most recent
            await room.append_turns("c4", turns("c4"), keep=10)
            assert list(room.state.conversations) == ["c3", "c1", "c4"]
            assert list(store.rooms["alice"].conversations) == ["c3", "c1", "c4"]


async def test_wait_drained_returns_once_nothing_holds_a_room(autojump_clock):
    async with open_registry(MemoryStore()) as registry:
        connection = FakeConnection()
        drained = trio.Event()

        async def wait() -> None:
            await registry.wait_drained()
            drained.set()

        async with trio.open_nursery() as nursery:
            async with registry.open_room("alice") as room:
                room.attach(connection)
                nursery.start_soon(wait)
                await trio.testing.wait_all_tasks_blocked()
            await trio.testing.wait_all_tasks_blocked()
            assert not drained.is_set()  # a connection is still there
            registry.close_all(1001, "shutting down")
            assert connection.closed == (1001, "shutting down")
            room.detach(connection)
            await trio.testing.wait_all_tasks_blocked()
            assert drained.is_set()


class FakeLeases(LocalLeases):
    """Room leases as several processes see them: rooms held ``elsewhere`` are refused, a lease
    can be lost (``lose``), and hand-over requests are fed in by the test (``wanted``)."""

    def __init__(self) -> None:
        super().__init__()
        self.elsewhere: set[str] = set()
        self.taken: list[str] = []
        self.released: list[str] = []
        self.session = trio.Event()
        self.down = False
        self.wanted_send, self.wanted_receive = trio.open_memory_channel[str](10)

    async def acquire(self, room_id: str) -> Lease | None:
        if self.down:
            raise StoreUnavailable("memory is unavailable")
        if room_id in self.elsewhere:
            return None
        self.taken.append(room_id)
        return Lease(room_id, len(self.taken), self.session)

    def release(self, lease: Lease) -> None:
        self.released.append(lease.room_id)

    def lose(self) -> None:
        self.session.set()
        self.session = trio.Event()

    async def healthy(self) -> bool:
        return not self.down

    async def wait_wanted(self) -> str:
        return await self.wanted_receive.receive()


async def test_a_room_owned_elsewhere_is_not_loaded_here(autojump_clock):
    store, leases = MemoryStore(), FakeLeases()
    leases.elsewhere.add("alice")
    async with open_registry(store, leases=leases) as registry:
        with pytest.raises(RoomElsewhere):
            async with registry.open_room("alice"):
                pass
        assert store.loads == [] and "alice" not in registry.rooms
        # A request that only reads the room is answered from the store, without the lease.
        store.rooms["alice"] = RoomState(prefs={"a": 1})
        async with registry.visit_room("alice") as view:
            assert isinstance(view, RoomSnapshot) and view.prefs == {"a": 1} and not view.connections
        assert leases.taken == []


async def test_a_room_gives_itself_up_when_its_lease_is_lost(autojump_clock):
    store, leases = MemoryStore(), FakeLeases()
    async with open_registry(store, leases=leases) as registry:
        connection = FakeConnection()
        async with registry.open_room("alice") as room:
            room.attach(connection)
            leases.lose()
            await trio.testing.wait_all_tasks_blocked()
            assert room.gone and not room.owned and "alice" not in registry.rooms
            assert connection.frames[-1]["error"]["code"] == "store_unavailable"
            assert connection.closed_after_pending[0] == CLOSE_INTERNAL
            # A connection joining now is told the same.
            late = FakeConnection()
            room.attach(late)
            assert late.closed_after_pending == connection.closed_after_pending
        await trio.testing.wait_all_tasks_blocked()
        assert leases.released == ["alice"]
        # The next use takes a new lease.
        async with registry.open_room("alice") as again:
            assert again is not room and again.owned and leases.taken == ["alice", "alice"]


async def test_while_leases_cannot_be_taken_rooms_are_refused_and_visits_fail_at_once(autojump_clock):
    store, leases = MemoryStore(), FakeLeases()
    leases.down = True
    async with open_registry(store, leases=leases) as registry:
        with pytest.raises(StoreUnavailable):
            async with registry.open_room("alice"):
                pass
        with pytest.raises(StoreUnavailable):
            async with registry.visit_room("alice"):
                pass
        assert store.loads == []


async def test_a_wanted_room_is_handed_over_once_owned_long_enough_or_at_once_when_idle(autojump_clock):
    store, leases = MemoryStore(), FakeLeases()
    async with open_registry(store, leases=leases, handoff_seconds=10) as registry:
        registry._nursery.start_soon(registry.serve_handoffs)
        connection = FakeConnection()
        async with registry.open_room("alice") as room:
            room.attach(connection)
            await leases.wanted_send.send("alice")
            await trio.testing.wait_all_tasks_blocked()
            assert not room.gone  # owned for less than 10 s, with a connection: kept
            await trio.sleep(10)
            await leases.wanted_send.send("alice")
            await trio.testing.wait_all_tasks_blocked()
            assert room.gone
            assert connection.frames[-1]["error"]["code"] == "room_elsewhere"
            assert connection.closed_after_pending[0] == CLOSE_TRY_AGAIN
        async with registry.open_room("bob") as idle:
            pass
        await leases.wanted_send.send("bob")  # no connection: handed over at once
        await trio.testing.wait_all_tasks_blocked()
        assert idle.gone and leases.released.count("bob") == 1
