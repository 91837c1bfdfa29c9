"""What every store backend guarantees (atlas/store/base.py), tested on each: the JSON files and
PostgreSQL. Round trips, missing values, corrupt values, removal, the owner check, concurrent
writers in threads and in two stores at once (two processes), a crash in the middle of writes, and
the live usage ledger (reserve, settle, release, quota against busy, the lowered cap, request
counts; on PostgreSQL, across processes and after one dies). Each backend's own details are in
test_json_store.py and test_postgres_store.py.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date, timedelta
from pathlib import Path

import pytest
import trio
from usage_helpers import Clock

from atlas.gateway.admission import Admission, Refused
from atlas.store import (
    Charge, Hold, Limits, RoomState, StoreCorrupt, StoreUnavailable, TokenRecord, Turn, UsageDay, UsageRecord,
    UserGone, UserRecord, hash_token, new_token,
)
from atlas.store.records import KEEP_USAGE_DAYS
from atlas.store.usage import Busy, OverQuota, ResolvedLimits
from atlas.store.users import create_user, set_limits

WRITER = Path(__file__).with_name("store_writer.py")
WAIT = 30.0


def user(user_id: str, **fields) -> UserRecord:
    fields.setdefault("virtual_key", f"sk-test-store-{user_id}-0123")
    return UserRecord(id=user_id, **fields)


# --- Round trips and missing values ------------------------------------------------------------

def test_users_round_trip_and_missing_ones_are_none(backend):
    store = backend.open_store()
    assert store.load_user("alice") is None
    assert store.user_ids() == [] and store.has_users() is False

    alice = user("alice", provider_url="https://llm.example/v1", token_hash="a" * 64, created_at=1712.25)
    store.save_user(alice)
    store.save_user(user("Bob"))
    store.save_user(user("_x.y@z-1"))
    assert store.load_user("alice") == alice
    assert store.load_user("Bob") == user("Bob")  # defaults: no provider URL, no token, time 0
    assert store.user_ids() == sorted(["alice", "Bob", "_x.y@z-1"])  # byte order on both
    assert store.has_users() is True

    changed = user("alice", virtual_key="sk-test-store-new-4567", provider_url=None, created_at=1712.25)
    store.save_user(changed)
    assert store.load_user("alice") == changed
    store.delete_user("alice")
    store.delete_user("alice")  # already gone: no error
    assert store.load_user("alice") is None
    assert store.user_ids() == sorted(["Bob", "_x.y@z-1"])


def test_tokens_round_trip_and_need_their_user(backend):
    store = backend.open_store()
    token_hash = hash_token(new_token())
    assert store.load_token(token_hash) is None
    with pytest.raises(UserGone):
        store.save_token(token_hash, "alice")  # no such user: refused, nothing written
    assert store.load_token(token_hash) is None

    store.save_user(user("alice", token_hash=token_hash))
    store.save_token(token_hash, "alice")
    store.save_token(token_hash, "alice")  # again: same result
    assert store.load_token(token_hash) == TokenRecord(user_id="alice")
    store.delete_token(token_hash)
    store.delete_token(token_hash)
    assert store.load_token(token_hash) is None


def test_rooms_round_trip_and_a_missing_room_is_empty(backend):
    store = backend.open_store()
    assert store.load_room("alice") == RoomState()
    state = RoomState(
        prefs={"theme": "dark", "n": 3, "nested": {"a": [1, None, 2.5]}, "text": "é€😀 \u0000 \"q\""},
        conversations={"c1": [Turn("user", "hi"), Turn("assistant", "hello\nthere")]},
    )
    store.save_room("alice", state)
    assert store.load_room("alice") == state
    store.save_room("alice", RoomState(prefs={"theme": "light"}))
    assert store.load_room("alice") == RoomState(prefs={"theme": "light"})
    store.delete_room("alice")
    store.delete_room("alice")
    assert store.load_room("alice") == RoomState()


@pytest.mark.parametrize("bad", ["../x", "a/b", "", "x" * 129, "a b", "a'b"])
def test_invalid_ids_are_refused_before_anything_is_touched(backend, bad):
    store = backend.open_store()
    for call in (store.load_user, store.load_room, store.delete_room, store.remove_user):
        with pytest.raises(ValueError):
            call(bad)
    with pytest.raises(ValueError):
        store.save_room(bad, RoomState())
    with pytest.raises(ValueError):
        store.load_token("not-a-hash")


def test_a_second_store_on_the_same_data_sees_every_write(backend):
    """Two stores on one data directory or database: the server and `atlas user`, or two servers."""
    first, second = backend.open_store(), backend.open_store()
    first.save_user(user("alice"))
    first.save_room("alice", RoomState(prefs={"a": 1}))
    assert second.load_user("alice") == user("alice")
    assert second.load_room("alice").prefs == {"a": 1}
    second.prepare()  # preparing again (another process starting) keeps everything
    assert first.load_room("alice").prefs == {"a": 1}


# --- Corrupt values ------------------------------------------------------------------------------

@pytest.mark.parametrize("content", ['{"prefs": []}', '{"conversations": {"c": [{"role": 1}]}}', "[]"])
def test_a_corrupt_room_names_where_it_is_and_is_left_alone(backend, content):
    store = backend.open_store()
    store.save_room("bob", RoomState(prefs={"ok": True}))
    where = backend.corrupt_room("alice", content)
    with pytest.raises(StoreCorrupt) as caught:
        store.load_room("alice")
    assert where in str(caught.value) and "unreadable" in str(caught.value)
    assert backend.raw_room("alice") is not None  # not replaced or removed
    with pytest.raises(StoreCorrupt):
        store.load_room("alice")
    assert store.load_room("bob").prefs == {"ok": True}  # other rooms unaffected


# --- Removal and the owner check -----------------------------------------------------------------

def test_remove_user_removes_everything_kept_for_them(backend):
    store = backend.open_store()
    token = create_user(store, "alice", "sk-test-store-alice-0123", None)
    create_user(store, "bob", "sk-test-store-bob-0123", None)
    store.save_room("alice", RoomState(prefs={"diary": "private"}), owner_must_exist=True)
    store.save_room("bob", RoomState(prefs={"b": 1}), owner_must_exist=True)
    store.add_usage("alice", [UsageDay("2025-01-15", 1, 10, 5, 15)], owner_must_exist=True)
    assert backend.leftovers("alice")

    store.remove_user("alice")
    assert store.load_usage("alice") == UsageRecord()

    assert backend.leftovers("alice") == []
    assert store.load_user("alice") is None and store.load_token(hash_token(token)) is None
    assert store.load_room("alice") == RoomState()
    assert store.load_room("bob").prefs == {"b": 1} and store.load_user("bob") is not None
    store.remove_user("alice")  # again, and for a user who never existed: no error
    store.remove_user("nobody")


def test_a_room_write_for_a_missing_user_is_refused_when_asked(backend):
    store = backend.open_store()
    with pytest.raises(UserGone):
        store.save_room("ghost", RoomState(prefs={"diary": "private"}), owner_must_exist=True)
    assert backend.raw_room("ghost") is None
    # External auth keeps no user records: there, rooms are written without that check.
    store.save_room("ghost", RoomState(prefs={"a": 1}))
    assert store.load_room("ghost").prefs == {"a": 1}


# --- Concurrency ---------------------------------------------------------------------------------

def test_concurrent_writers_to_different_and_the_same_rooms(backend):
    """Many threads over two stores (two processes) at once: every write lands whole, each room's
    last write wins, and the shared room holds one writer's last write."""
    stores = [backend.open_store(), backend.open_store()]
    writers, writes = 16, 25  # more threads than a PostgreSQL pool has connections

    def write(w: int) -> None:
        store = stores[w % 2]
        for n in range(writes):
            store.save_room(f"own{w}", RoomState(prefs={"w": w, "n": n}))
            store.save_room("shared", RoomState(prefs={"w": w, "n": n, "pad": "p" * 500}))

    with ThreadPoolExecutor(writers) as pool:
        list(pool.map(write, range(writers)))

    check = backend.open_store()
    for w in range(writers):
        assert check.load_room(f"own{w}").prefs == {"w": w, "n": writes - 1}
    shared = check.load_room("shared").prefs
    assert shared["n"] == writes - 1 and shared["w"] in range(writers)  # some writer's last


@pytest.mark.parametrize("round_", range(4))
def test_a_removal_racing_writes_never_leaves_anything_of_the_user(backend, round_):
    """The server writes the room (checking its owner) and tokens while `atlas user remove` runs
    in another process: afterwards nothing of the user is left, and no room or token is without
    its user. A write either landed before the removal (and went with it) or was refused."""
    server, operator = backend.open_store(), backend.open_store()
    create_user(operator, "alice", "sk-test-store-alice-0123", None)
    started = threading.Barrier(5)
    some_written = threading.Event()
    refused: list[str] = []

    def write_room(w: int) -> None:
        started.wait()
        for n in range(10_000):
            try:
                server.save_room("alice", RoomState(prefs={"w": w, "n": n}), owner_must_exist=True)
            except UserGone:
                refused.append("room")
                return
            if n == 3:
                some_written.set()
        raise AssertionError("the removal never took effect")

    def write_tokens() -> None:
        started.wait()
        while True:
            try:
                server.save_token(hash_token(new_token()), "alice")
            except UserGone:
                refused.append("token")
                return

    def remove() -> None:
        started.wait()
        some_written.wait(WAIT)
        operator.remove_user("alice")

    with ThreadPoolExecutor(5) as pool:
        futures = [pool.submit(write_room, w) for w in range(3)]
        futures += [pool.submit(write_tokens), pool.submit(remove)]
        for future in futures:
            future.result(timeout=WAIT)

    assert sorted(refused) == ["room", "room", "room", "token"]
    assert backend.leftovers("alice") == []
    assert backend.orphans() == []
    assert server.load_room("alice") == RoomState()


def test_a_user_that_survives_the_race_keeps_a_room_that_is_theirs(backend):
    """Writes racing the removal of *another* user, and a re-creation under the same id: the
    invariant holds at every step (a room only with its user)."""
    store = backend.open_store()
    for round_ in range(5):
        create_user(store, "alice", "sk-test-store-alice-0123", None)
        create_user(store, "bob", "sk-test-store-bob-0123", None)

        def write(room: str) -> None:
            for n in range(20):
                try:
                    store.save_room(room, RoomState(prefs={"n": n}), owner_must_exist=True)
                except UserGone:
                    return

        with ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(write, "alice"), pool.submit(write, "bob")]
            futures.append(pool.submit(store.remove_user, "bob"))
            for future in futures:
                future.result(timeout=WAIT)
        assert backend.orphans() == []
        assert store.load_room("alice").prefs == {"n": 19}  # alice was never touched
        assert backend.leftovers("bob") == []
        store.remove_user("alice")


# --- A crash in the middle of writes -------------------------------------------------------------

def test_a_crash_mid_write_keeps_every_acknowledged_write(backend, request):
    """JSON: the writing process is killed (kill -9) mid-write. PostgreSQL: the database server is
    (SIGKILL of the postmaster and every backend), then recovers. Either way every write the store
    acknowledged is there afterwards, and every room holds one whole write."""
    store = backend.open_store()  # creates the directories or the schema
    target = backend.database_url or str(backend.data_dir)
    rooms = [f"room{n}" for n in range(4)]
    writer = subprocess.Popen(
        [sys.executable, str(WRITER), backend.name, target, *rooms],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    sent = {room: -1 for room in rooms}
    acknowledged = dict(sent)

    def read() -> None:
        for line in writer.stdout:
            what, room, n = line.split()
            (sent if what == "sent" else acknowledged)[room] = int(n)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        deadline = time.monotonic() + WAIT
        while min(acknowledged.values()) < 30:  # many durable writes in every room
            assert time.monotonic() < deadline, f"too few writes: {acknowledged}"
            assert writer.poll() is None, "the writer stopped"
            time.sleep(0.01)  # polling another process's progress
        if backend.database_url is not None:
            cluster = request.getfixturevalue("postgres_cluster")
            cluster.kill()  # mid-write, with transactions in flight
            writer.kill()
            writer.wait(WAIT)
            reader.join(WAIT)
            cluster.start()  # crash recovery
        else:
            writer.kill()
            writer.wait(WAIT)
            reader.join(WAIT)
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait(WAIT)
        reader.join(WAIT)
        writer.stdout.close()

    after = backend.open_store()
    for room in rooms:
        n = after.load_room(room).prefs["n"]  # decodes: one whole write
        assert acknowledged[room] <= n <= sent[room], (room, acknowledged[room], n, sent[room])
    store.close()


# --- The usage ledger and limits -------------------------------------------------------------------

def test_usage_is_added_per_day_and_never_lost_between_processes(backend):
    first, second = backend.open_store(), backend.open_store()  # two processes on one store
    assert first.load_usage("alice") == UsageRecord() and first.usage_user_ids() == []

    def add(store, n):
        for _ in range(n):
            store.add_usage("alice", [UsageDay("2025-01-15", 1, 3, 2, 5), UsageDay("2025-01-16", 0, 1, 0, 1)])

    threads = [threading.Thread(target=add, args=(store, 20)) for store in (first, second)]
    if backend.name == "json":
        # A data directory has one server process, the only writer of its usage files (and its
        # ledger adds one user's usage at a time): the files are added to in turn.
        threads = [threading.Thread(target=lambda: (add(first, 20), add(second, 20)))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    days = second.load_usage("alice").days
    assert days == [UsageDay("2025-01-15", 40, 120, 80, 200), UsageDay("2025-01-16", 0, 40, 0, 40)]
    first.add_usage("zed", [UsageDay("2025-01-15", 1, 1, 1, 2)])
    assert second.usage_user_ids() == ["alice", "zed"]
    with pytest.raises(UserGone):  # built-in auth: usage of a user who does not exist is refused
        first.add_usage("ghost", [UsageDay("2025-01-15", 1, 1, 1, 2)], owner_must_exist=True)
    assert first.load_usage("ghost") == UsageRecord()


def test_the_ledger_keeps_the_last_days_only(backend):
    store = backend.open_store()
    start = date(2024, 1, 1)
    days = [UsageDay((start + timedelta(days=n)).isoformat(), 1, 1, 0, 1) for n in range(KEEP_USAGE_DAYS + 10)]
    store.add_usage("alice", days)
    kept = store.load_usage("alice").days
    assert len(kept) == KEEP_USAGE_DAYS and kept[-1].date == days[-1].date


def test_a_users_limits_round_trip(backend):
    store = backend.open_store()
    create_user(store, "alice", "sk-test-store-alice-limits", None)
    set_limits(store, "alice", {"tokens_per_day": 1000, "requests_per_minute": None})
    user = backend.open_store().load_user("alice")
    assert user.limits == Limits(tokens_per_day=1000, requests_per_minute=None)
    set_limits(store, "alice", {}, clear=True)
    assert backend.open_store().load_user("alice").limits is None


# --- The live ledger (Store.usage_ledger) ------------------------------------------------------------
#
# On both backends: what one process sees. On PostgreSQL also what several see, each with a store
# (a connection pool) and a ledger of its own: a JSON data directory has one server process.

DAY = "2025-01-15"
BUDGET = ResolvedLimits(tokens_per_day=1000, tokens_per_month=1500)
only_postgres = pytest.mark.parametrize("backend", ["postgres"], indirect=True)


async def test_the_ledger_holds_settles_and_releases(backend):
    store = backend.open_store()
    ledger = store.usage_ledger()
    hold = await ledger.reserve("alice", DAY, BUDGET, prompt=50, output=100)
    assert isinstance(hold, Hold) and (hold.tokens, hold.cap) == (150, 100)
    assert ledger.held("alice") == 150 and ledger.held("bob") == 0
    await ledger.settle(hold, Charge(20, 30, 50))  # durable on return
    assert ledger.held("alice") == 0
    assert store.load_usage("alice").days == [UsageDay(DAY, 1, 20, 30, 50)]
    assert (await ledger.usage("alice")).days == [UsageDay(DAY, 1, 20, 30, 50)]

    released = await ledger.reserve("alice", DAY, BUDGET, prompt=10, output=900)
    await ledger.settle(released, None)  # never answered: costs nothing, frees its room
    assert store.load_usage("alice").days == [UsageDay(DAY, 1, 20, 30, 50)]
    whole = await ledger.reserve("alice", DAY, BUDGET, prompt=50, output=10_000)
    assert whole.cap == 1000 - 50 - 50  # lowered to what the settled usage leaves
    await ledger.settle(whole, None)

    # The next process on the same data counts what this one settled.
    again = backend.open_store().usage_ledger()
    hold = await again.reserve("alice", DAY, BUDGET, prompt=50, output=10_000)
    assert hold.cap == 900
    await again.settle(hold, None)


async def test_quota_exceeded_is_the_settled_usage_busy_what_requests_in_flight_hold(backend):
    ledger = backend.open_store().usage_ledger()
    first = await ledger.reserve("alice", DAY, BUDGET, prompt=100, output=800)
    assert isinstance(first, Hold) and first.tokens == 900
    # The settled usage leaves room; only the reservation in flight blocks: busy, not spent.
    assert isinstance(await ledger.reserve("alice", DAY, BUDGET, prompt=100, output=800), Busy)
    small = await ledger.reserve("alice", DAY, BUDGET, prompt=50, output=50)
    assert isinstance(small, Hold) and small.tokens == 100  # what is left still serves
    await ledger.settle(small, None)
    await ledger.settle(first, Charge(500, 400, 900))

    refused = await ledger.reserve("alice", DAY, BUDGET, prompt=100, output=10)
    assert refused == OverQuota("tokensPerDay", 1000, 900, "2025-01-16T00:00:00Z")
    lowered = await ledger.reserve("alice", DAY, BUDGET, prompt=40, output=100, choices=2)
    assert (lowered.cap, lowered.tokens) == (30, 100)  # (1000 - 900 - 40) // 2 per choice
    await ledger.settle(lowered, Charge(40, 60, 100))

    # The month: 1000 spent on the 15th; on the 16th the day is new but 500 is all the month has.
    refused = await ledger.reserve("alice", "2025-01-16", BUDGET, prompt=100, output=800)
    assert isinstance(refused, Hold) and refused.cap == 400
    await ledger.settle(refused, Charge(100, 400, 500))
    month = await ledger.reserve("alice", "2025-01-17", BUDGET, prompt=1, output=1)
    assert month == OverQuota("tokensPerMonth", 1500, 1500, "2025-02-01T00:00:00Z")
    assert ledger.held("alice") == 0


async def test_request_counts_on_either_backend(backend):
    """Concurrency and requests per minute, through admission: kept by admission for the JSON
    store, by the ledger in the database for PostgreSQL."""
    clock = Clock()
    gate = Admission(backend.open_store().usage_ledger(), clock=clock)
    limits = ResolvedLimits(concurrent_requests=2, requests_per_minute=3)
    async with gate.admit("ivy", limits, prompt=1, output=1), \
            gate.admit("ivy", limits, prompt=1, output=1):
        with pytest.raises(Refused) as refused:
            async with gate.admit("ivy", limits, prompt=1, output=1):
                pass
        assert (refused.value.code, refused.value.retry_after) == ("rate_limited", 1)
    async with gate.admit("ivy", limits, prompt=1, output=1):
        pass
    with pytest.raises(Refused) as refused:  # the 4th admitted within a minute
        async with gate.admit("ivy", limits, prompt=1, output=1):
            pass
    assert refused.value.code == "rate_limited" and 1 <= refused.value.retry_after <= 60
    clock.advance(61)
    backend.age_ledger(61)
    async with gate.admit("ivy", limits, prompt=1, output=1) as ticket:
        assert ticket.cap is None  # no token limit: the request goes out untouched


@only_postgres
async def test_reservations_hold_across_processes(backend):
    first, second = backend.open_store().usage_ledger(), backend.open_store().usage_ledger()
    held = await first.reserve("alice", DAY, BUDGET, prompt=100, output=800)
    assert isinstance(await second.reserve("alice", DAY, BUDGET, prompt=100, output=800), Busy)
    small = await second.reserve("alice", DAY, BUDGET, prompt=50, output=50)
    assert isinstance(small, Hold)
    assert isinstance(await first.reserve("alice", DAY, BUDGET, prompt=1, output=1), Busy)  # 1000 held
    await first.settle(held, Charge(500, 400, 900))
    await second.settle(small, None)
    assert isinstance(await second.reserve("alice", DAY, BUDGET, prompt=100, output=10), OverQuota)
    assert backend.ledger_rows() == []


@only_postgres
async def test_concurrent_reservations_from_three_processes_never_hold_more_than_the_budget(backend):
    ledgers = [backend.open_store().usage_ledger() for _ in range(3)]
    holds: list[Hold] = []
    answers: list[object] = []

    async def reserve(ledger) -> None:
        answer = await ledger.reserve("alice", DAY, BUDGET, prompt=40, output=60)
        answers.append(answer)
        if isinstance(answer, Hold):
            holds.append(answer)

    async with trio.open_nursery() as nursery:
        for n in range(60):
            nursery.start_soon(reserve, ledgers[n % 3])
    assert len(holds) == 10 and sum(h.tokens for h in holds) == 1000  # exactly the budget
    assert all(isinstance(a, Busy) for a in answers if not isinstance(a, Hold))
    assert len(backend.ledger_rows()) == 10
    async with trio.open_nursery() as nursery:
        for hold in holds:
            nursery.start_soon(ledgers[hold.id % 3].settle, hold, Charge(40, 10, 50))
    assert backend.open_store().load_usage("alice").days == [UsageDay(DAY, 10, 400, 100, 500)]


@only_postgres
async def test_request_counts_hold_across_processes(backend):
    limits = ResolvedLimits(concurrent_requests=1, requests_per_minute=2)
    first = Admission(backend.open_store().usage_ledger())
    second = Admission(backend.open_store().usage_ledger())
    async with first.admit("ivy", limits, prompt=1, output=1):
        with pytest.raises(Refused) as refused:
            async with second.admit("ivy", limits, prompt=1, output=1):
                pass
        assert refused.value.code == "rate_limited" and "at once" in refused.value.message
    async with second.admit("ivy", limits, prompt=1, output=1):
        pass
    with pytest.raises(Refused) as refused:  # two admitted this minute, one by each process
        async with first.admit("ivy", limits, prompt=1, output=1):
            pass
    assert "per minute" in refused.value.message and 1 <= refused.value.retry_after <= 60
    backend.age_ledger(61)
    async with first.admit("ivy", limits, prompt=1, output=1):
        pass


@only_postgres
async def test_a_dead_processs_reservations_expire(backend):
    dead_store = backend.open_store()
    dead = dead_store.usage_ledger()
    await dead.reserve("alice", DAY, BUDGET, prompt=100, output=800)
    await dead.reserve("alice", DAY, ResolvedLimits(concurrent_requests=1), prompt=1, output=1)
    dead_store.close()  # the process dies (kill -9): nothing settles, nothing renews
    alive = backend.open_store().usage_ledger()
    assert isinstance(await alive.reserve("alice", DAY, BUDGET, prompt=100, output=800), Busy)
    backend.age_ledger(alive.ttl - 1)  # not yet
    assert isinstance(await alive.reserve("alice", DAY, BUDGET, prompt=100, output=800), Busy)
    backend.age_ledger(2)  # now past the expiry: they no longer count, and are deleted
    hold = await alive.reserve("alice", DAY, BUDGET, prompt=100, output=800)
    assert isinstance(hold, Hold) and backend.ledger_rows() == [("alice", 900)]
    await alive.settle(hold, None)


@only_postgres
async def test_a_live_processs_reservations_are_renewed_and_brought_back(backend):
    ledger = backend.open_store().usage_ledger()
    hold = await ledger.reserve("alice", DAY, BUDGET, prompt=100, output=800)
    backend.age_ledger(ledger.ttl - 1)  # about to expire...
    await ledger.renew()  # ...what serve() does every ttl / 6
    backend.age_ledger(ledger.ttl - 1)
    other = backend.open_store().usage_ledger()
    assert isinstance(await other.reserve("alice", DAY, BUDGET, prompt=100, output=800), Busy)

    backend.age_ledger(2)  # expired: the database was out of reach for longer than ttl
    await ledger.renew()  # the request still runs: its reservation counts again
    assert isinstance(await other.reserve("alice", DAY, BUDGET, prompt=100, output=800), Busy)
    backend.clear_reservations()  # lost in a crash of the server (they commit without a flush)
    await ledger.renew()
    assert backend.ledger_rows() == [("alice", 900)]
    await ledger.settle(hold, None)
    await ledger.renew()  # a settled reservation is not brought back
    assert backend.ledger_rows() == [] and ledger.held("alice") == 0


class FlakyDatabase:
    """A PostgresStore as the ledger uses it, whose database can be made unreachable."""

    def __init__(self, store) -> None:
        self.store = store
        self.down = False

    def transaction(self):
        if self.down:
            raise StoreUnavailable("database postgresql://test is unavailable: connection refused")
        return self.store.transaction()

    def add_usage_in(self, *args, **kwargs):
        return self.store.add_usage_in(*args, **kwargs)

    def load_usage(self, user_id):
        return self.store.load_usage(user_id)


@only_postgres
async def test_a_settlement_the_database_missed_is_kept_held_and_written_later(backend):
    from atlas.store.pg_ledger import PostgresLedger

    database = FlakyDatabase(backend.open_store())
    ledger = PostgresLedger(database)
    hold = await ledger.reserve("alice", DAY, BUDGET, prompt=100, output=800)
    database.down = True
    with pytest.raises(StoreUnavailable):
        await ledger.settle(hold, Charge(100, 700, 800))
    with pytest.raises(StoreUnavailable):
        await ledger.renew()
    other = backend.open_store().usage_ledger()  # the budget it may have cost stays held
    assert isinstance(await other.reserve("alice", DAY, BUDGET, prompt=100, output=800), Busy)
    database.down = False
    await ledger.renew()  # what serve() does every ttl / 6
    assert backend.open_store().load_usage("alice").days == [UsageDay(DAY, 1, 100, 700, 800)]
    assert backend.ledger_rows() == [] and ledger.held("alice") == 0
    assert (await other.reserve("alice", DAY, BUDGET, prompt=100, output=800)).cap == 100  # 200 left


@only_postgres
async def test_removing_a_user_removes_their_reservations_and_counts(backend):
    store = backend.open_store()
    create_user(store, "alice", "sk-test-store-alice-ledger", None)
    ledger = store.usage_ledger(owner_must_exist=True)
    hold = await ledger.reserve("alice", DAY, ResolvedLimits(tokens_per_day=100, requests_per_minute=5),
                                prompt=1, output=1)
    assert {"admissions/alice", f"reservations/{hold.id}"} <= set(backend.leftovers("alice"))
    store.remove_user("alice")
    await ledger.settle(hold, Charge(1, 1, 2))  # the user is gone: nothing of theirs is written back
    assert backend.leftovers("alice") == []


@only_postgres
async def test_a_database_that_cannot_be_reached_refuses_admission(backend):
    from atlas.store.postgres import PostgresStore

    port = backend.database_url.rsplit(":", 1)[1].split("/")[0]
    unreachable = PostgresStore(backend.database_url.replace(f":{port}/", ":1/"), timeout=0.5)
    try:
        gate = Admission(unreachable.usage_ledger())
        with pytest.raises(Refused) as refused:
            async with gate.admit("alice", BUDGET, prompt=1, output=1):
                pass
        assert (refused.value.code, refused.value.status) == ("store_unavailable", 503)
        async with gate.admit("alice", ResolvedLimits(), prompt=1, output=1):
            pass  # no limit to check: nothing asked of the database at admission
    finally:
        unreachable.close()


def test_new_tokens_never_start_with_a_dash(monkeypatch):
    """A token is pasted after --token on a command line, where a leading '-' reads as a flag."""
    import atlas.store.records as records

    drawn = iter(["-looks-like-a-flag", "fine-token"])
    monkeypatch.setattr(records.secrets, "token_urlsafe", lambda n: next(drawn))
    assert records.new_token() == "fine-token"
