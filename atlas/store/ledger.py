"""The usage ledger of one server process, over any store that can load and save a user's record.

Reservations live in memory, under the event loop: ``reserve`` checks and holds with no
checkpoint between the check and the hold, so no two requests of a user can both take the same
room, whatever the number of connections or paths they came through. Settlements update the
totals in memory at once (later reservations count them) and are then added to the store as
increments (``Store.add_usage``): a user's settlements that arrive while a write of theirs is in
progress are added together by the next one (group commit), and ``settle`` returns only once its
own charge is durable.

The limits this class enforces count this process's requests and what the store held when the
user was loaded: it is the ledger of the JSON store, whose data directory one server process
owns. It checks the token limits only; admission counts requests per minute and in flight itself
(``counts_requests`` is False). Limits across processes: ``pg_ledger``.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections import OrderedDict

import trio

from atlas.store.base import Charge, Hold, Store
from atlas.store.records import KEEP_USAGE_DAYS, UsageDay, UsageRecord, UserGone
from atlas.store.serial_thread import SerialThread
from atlas.store.usage import Busy, Fits, OverQuota, PeriodUsage, ResolvedLimits, month_of, plan

log = logging.getLogger("atlas.store.ledger")

MAX_CACHED_USERS = 10_000
WRITE_THREADS = 4


class _UserUsage:
    """One user's settled totals, holds and write state, in memory."""

    def __init__(self) -> None:
        self.loaded = False
        self.load_lock = trio.Lock()
        self.days: dict[str, UsageDay] = {}
        self.months: dict[str, int] = {}  # total tokens per month
        self.holds: dict[int, Hold] = {}
        self.held_days: dict[str, int] = {}
        self.held_months: dict[str, int] = {}
        self.settled = trio.Event()
        self.pending: dict[str, UsageDay] = {}  # increments not yet handed to the store
        self.version = 0  # charges applied in memory
        self.durable = 0  # charges known to be durable
        self.writing = False
        self.written = trio.Event()

    @property
    def idle(self) -> bool:
        return not self.holds and not self.writing and not self.load_lock.locked() \
            and self.durable == self.version

    def load(self, record: UsageRecord) -> None:
        for day in record.days:
            self.days[day.date] = day
            month = month_of(day.date)
            self.months[month] = self.months.get(month, 0) + day.total_tokens
        self.loaded = True

    def period(self, day: str) -> PeriodUsage:
        month = month_of(day)
        settled = self.days.get(day)
        return PeriodUsage(
            day=day, settled_day=settled.total_tokens if settled else 0,
            settled_month=self.months.get(month, 0),
            held_day=self.held_days.get(day, 0), held_month=self.held_months.get(month, 0),
        )

    def hold(self, hold: Hold) -> None:
        self.holds[hold.id] = hold
        month = month_of(hold.day)
        self.held_days[hold.day] = self.held_days.get(hold.day, 0) + hold.tokens
        self.held_months[month] = self.held_months.get(month, 0) + hold.tokens

    def release(self, hold: Hold) -> None:
        if self.holds.pop(hold.id, None) is None:
            return
        month = month_of(hold.day)
        for totals, key in ((self.held_days, hold.day), (self.held_months, month)):
            left = totals.get(key, 0) - hold.tokens
            if left > 0:
                totals[key] = left
            else:
                totals.pop(key, None)

    def add(self, day: str, charge: Charge) -> None:
        for totals in (self.days, self.pending):
            entry = totals.get(day)
            if entry is None:
                entry = totals[day] = UsageDay(day)
            entry.requests += charge.requests
            entry.prompt_tokens += charge.prompt_tokens
            entry.completion_tokens += charge.completion_tokens
            entry.total_tokens += charge.total_tokens
        month = month_of(day)
        self.months[month] = self.months.get(month, 0) + charge.total_tokens
        if len(self.days) > KEEP_USAGE_DAYS:
            for old in sorted(self.days)[: len(self.days) - KEEP_USAGE_DAYS]:
                del self.days[old]
        self.version += 1

    def take_pending(self) -> list[UsageDay]:
        days, self.pending = list(self.pending.values()), {}
        return days

    def give_back(self, days: list[UsageDay]) -> None:
        """Increments whose write failed: the next write carries them."""
        for day in days:
            entry = self.pending.get(day.date)
            if entry is None:
                self.pending[day.date] = day
                continue
            entry.requests += day.requests
            entry.prompt_tokens += day.prompt_tokens
            entry.completion_tokens += day.completion_tokens
            entry.total_tokens += day.total_tokens

    def record(self) -> UsageRecord:
        return UsageRecord(days=[
            UsageDay(d.date, d.requests, d.prompt_tokens, d.completion_tokens, d.total_tokens)
            for _, d in sorted(self.days.items())
        ])

    def notify(self) -> None:
        self.settled.set()
        self.settled = trio.Event()


class ProcessLedger:
    """``Ledger`` for one process over a store's ``load_usage``/``add_usage``."""

    counts_requests = False
    poll_seconds = math.inf  # every settlement is this process's: its event says when

    def __init__(
        self, store: Store, *, owner_must_exist: bool = False, max_cached_users: int = MAX_CACHED_USERS
    ) -> None:
        self._store = store
        self._owner_must_exist = owner_must_exist
        self._users: OrderedDict[str, _UserUsage] = OrderedDict()
        self._max_cached = max_cached_users
        self._ids = itertools.count(1)
        # Settlements, one per request, go through threads of their own (not a ``to_thread`` hop
        # each: see ``serial_thread``), a user always through the same one (their writes stay in
        # order), a few of them so that the disk syncs of different users overlap.
        self._writes = [SerialThread(f"atlas usage ledger writes {n}") for n in range(WRITE_THREADS)]

    async def _user(self, user_id: str) -> _UserUsage:
        user = self._users.get(user_id)
        if user is None:
            user = self._users[user_id] = _UserUsage()
            self._evict()
        else:
            self._users.move_to_end(user_id)
        if not user.loaded:
            async with user.load_lock:
                if not user.loaded:
                    user.load(await self._store.read(self._store.load_usage, user_id))
        return user

    def _evict(self) -> None:
        """Forget the least recently used idle users beyond the cache size (their files hold
        everything: nothing in flight, nothing unwritten)."""
        excess = len(self._users) - self._max_cached
        if excess <= 0:
            return
        for user_id in [u for u, state in self._users.items() if state.idle][:excess]:
            del self._users[user_id]

    async def reserve(
        self, user_id: str, day: str, limits: ResolvedLimits, *, prompt: int, output: int,
        choices: int = 1,
    ) -> Hold | OverQuota | Busy:
        user = await self._user(user_id)
        # From here to the hold: no checkpoint, so the check and the hold are one step.
        result = plan(user.period(day), limits, prompt, output, choices)
        if not isinstance(result, Fits):
            return result
        hold = Hold(user_id, day, result.reserve, result.cap, next(self._ids))
        user.hold(hold)
        return hold

    async def settle(self, hold: Hold, charge: Charge | None) -> None:
        user = await self._user(hold.user_id)
        user.release(hold)
        if charge is None or not (charge.total_tokens or charge.requests):
            user.notify()
            return
        user.add(hold.day, charge)
        target = user.version
        user.notify()
        await self._write_until(hold.user_id, user, target)

    async def _write_until(self, user_id: str, user: _UserUsage, target: int) -> None:
        while user.durable < target:
            if user.writing:
                await user.written.wait()
                continue
            user.writing = True
            version = user.version
            days = user.take_pending()
            try:
                try:
                    await self._writes[hash(user_id) % WRITE_THREADS].run(self._add, user_id, days)
                except UserGone:
                    # Removed meanwhile (built-in auth): everything kept for them is gone for
                    # good, this usage too.
                    log.info("usage of removed user %s not kept", user_id)
                except BaseException:
                    user.give_back(days)
                    raise
                user.durable = max(user.durable, version)
            finally:
                user.writing = False
                written, user.written = user.written, trio.Event()
                written.set()

    def _add(self, user_id: str, days: list[UsageDay]) -> None:
        self._store.add_usage(user_id, days, owner_must_exist=self._owner_must_exist)

    def next_settlement(self, user_id: str) -> trio.Event:
        user = self._users.get(user_id)
        if user is None:  # not loaded yet: the caller's reserve loads it; nothing to wait for
            event = trio.Event()
            event.set()
            return event
        return user.settled

    async def usage(self, user_id: str) -> UsageRecord:
        return (await self._user(user_id)).record()

    def held(self, user_id: str) -> int:
        user = self._users.get(user_id)
        return sum(h.tokens for h in user.holds.values()) if user else 0

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()  # nothing to do in the background: everything is in memory
        await trio.sleep_forever()
