"""The live usage ledger in PostgreSQL: limits that hold across every process sharing the database.

    reservations   id, user_id, day, tokens, expires_at: one row per admitted request in flight,
                   holding its worst case (0 tokens when no token limit applies: then the row is
                   only its place among the user's concurrent requests)
    admissions     user_id, at: when each request of the last minute was admitted
    usage_days     the settled usage (postgres.py)

``reserve`` is one transaction, under a per-user transaction-level advisory lock, in two round
trips (psycopg's pipeline mode sends the statements of each together):

  1. ``pg_advisory_xact_lock(LEDGER_LOCK, key(user))``: one admission per user at a time, whatever
     the process; then delete the user's expired reservations and admissions older than a minute,
     and read in one ``SELECT``: the settled usage of the day and the month, what live
     reservations hold for them, how many are in flight, how many were admitted in the last 60 s;
  2. run the same pure rules as the embedded ledger (``usage.check_rates`` then ``usage.plan``) in
     Python, and only if the request fits, insert its reservation (and its admission); commit.

The lock is its own statement on purpose: under READ COMMITTED each statement reads a snapshot
taken when it starts, so the ``SELECT`` after the lock sees everything the previous holder
committed. One statement that locked and read (a CTE) would read a snapshot from before its wait
for the lock, and two processes could both pass. ``settle`` takes no lock: it deletes the
reservation and adds the usage in one transaction, which every later snapshot sees whole or not at
all (and a reservation never holds less than its request's charge).

A reservation expires ``ttl`` seconds after it was made or last renewed (the database's clock):
``serve`` renews this process's every ``ttl / 6`` seconds, so a reservation outlives its process
(``kill -9``, a lost machine) by at most ``ttl``; an expired one no longer counts and is deleted by
the next admission of its user (or by any process's ``serve``, once a minute). A renewal writes
back the reservations of this process's requests in flight that expired or are gone (the
database was unreachable for longer than ``ttl``, or lost them in a crash), so that they count
again for as long as their requests run. The per-minute window is measured with the database's
clock too, one clock for every process; the UTC day, as in the embedded ledger, is the caller's.

Durability: the admission's transaction commits with ``synchronous_commit`` off. It need not wait
for the WAL flush (a millisecond or more on most disks, on the path to the first token): what it
writes is worth nothing after a crash of the server except while its request runs, and the
renewal writes that back. The settlement (the usage) commits durably, before the client is told.

A settlement that cannot be written (the database is unreachable) raises ``StoreUnavailable``; its
charge is kept in memory and ``serve`` writes it when the database is back, renewing its
reservation meanwhile, so the budget it may have cost stays held.
"""

from __future__ import annotations

import hashlib
import logging
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any, Protocol

import trio

from atlas.store.base import Charge, Hold
from atlas.store.records import StoreError, UsageDay, UsageRecord
from atlas.store.usage import Busy, Fits, OverQuota, PeriodUsage, ResolvedLimits, TooMany, check_rates, plan

log = logging.getLogger("atlas.store.pg_ledger")

LEDGER_LOCK = 0x4C656467  # first key of the per-user advisory locks ("Ledg"); two-int4 key space
RESERVATION_TTL = 30.0  # seconds a reservation counts without being renewed
POLL_SECONDS = 0.2  # a request told Busy asks again this often (settlements elsewhere set no event)
SWEEP_EVERY = 60.0  # seconds between sweeps of every user's expired rows

_NOT_FLUSHED = "SET LOCAL synchronous_commit TO off"  # a reservation need not survive the server
_LOCK = "SELECT pg_advisory_xact_lock(%s::int4, %s::int4)"
_PRUNE_RESERVATIONS = "DELETE FROM reservations WHERE user_id = %(user)s AND expires_at <= now()"
_PRUNE_ADMISSIONS = "DELETE FROM admissions WHERE user_id = %(user)s AND at <= now() - interval '60 seconds'"
# The admissions of the last minute are counted up to the limit only (that is all the rule needs),
# so the cost stays bounded whatever the limit.
_READ = """
SELECT
    coalesce((SELECT total_tokens FROM usage_days WHERE user_id = %(user)s AND day = %(day)s), 0),
    coalesce((SELECT sum(total_tokens) FROM usage_days
              WHERE user_id = %(user)s AND day >= %(month)s AND day < %(next_month)s), 0)::bigint,
    held.day, held.month, held.in_flight,
    (SELECT count(*) FROM (SELECT FROM admissions WHERE user_id = %(user)s
                           AND at > now() - interval '60 seconds' LIMIT %(per_minute)s) AS recent),
    coalesce(extract(epoch FROM (SELECT min(at) FROM admissions WHERE user_id = %(user)s
                                 AND at > now() - interval '60 seconds') + interval '60 seconds' - now()),
             60)::float8,
    nextval('reservation_ids')
FROM (SELECT coalesce(sum(tokens) FILTER (WHERE day = %(day)s), 0)::bigint AS day,
             coalesce(sum(tokens) FILTER (WHERE day >= %(month)s AND day < %(next_month)s), 0)::bigint
                 AS month,
             count(*) AS in_flight
      FROM reservations WHERE user_id = %(user)s AND expires_at > now()) AS held
"""
_INSERT_RESERVATION = (
    "INSERT INTO reservations (id, user_id, day, tokens, expires_at)"
    " VALUES (%s, %s, %s, %s, now() + make_interval(secs => %s))"
)
_INSERT_ADMISSION = "INSERT INTO admissions (user_id) VALUES (%s)"
_STILL_VALID = "SELECT count(*) FROM reservations WHERE id = ANY(%s) AND expires_at > now()"
_RENEW = (
    "INSERT INTO reservations (id, user_id, day, tokens, expires_at)"
    " SELECT id, user_id, day, tokens, now() + make_interval(secs => %s)"
    " FROM unnest(%s::bigint[], %s::text[], %s::date[], %s::bigint[]) AS h (id, user_id, day, tokens)"
    " ON CONFLICT (id) DO UPDATE SET expires_at = EXCLUDED.expires_at"
)
_SWEEP = (
    "DELETE FROM reservations WHERE expires_at <= now()",
    "DELETE FROM admissions WHERE at <= now() - interval '60 seconds'",
)


class Database(Protocol):
    """What the ledger uses of ``PostgresStore``."""

    def transaction(self) -> AbstractContextManager[Any]: ...
    def add_usage_in(
        self, conn: Any, user_id: str, days: list[UsageDay], *, owner_must_exist: bool = False
    ) -> bool: ...
    def load_usage(self, user_id: str) -> UsageRecord: ...


def user_lock_key(user_id: str) -> int:
    """The second key of the user's advisory lock: 32 bits of a hash of the id (two users that
    share one only take turns)."""
    return int.from_bytes(hashlib.blake2b(user_id.encode(), digest_size=4).digest(), "big", signed=True)


def _month_bounds(day: str) -> tuple[date, date]:
    first = date.fromisoformat(day).replace(day=1)
    return first, (first + timedelta(days=32)).replace(day=1)


@dataclass
class _Unsettled:
    hold: Hold
    charge: Charge | None


class PostgresLedger:
    """``Ledger`` whose reservations and request counts live in the database (``counts_requests``)."""

    counts_requests = True
    poll_seconds = POLL_SECONDS

    def __init__(
        self, store: Database, *, owner_must_exist: bool = False, ttl: float = RESERVATION_TTL
    ) -> None:
        self._store = store
        self._owner_must_exist = owner_must_exist
        self.ttl = ttl
        self._live: dict[int, Hold] = {}  # this process's reservations, renewed by serve()
        self._unsettled: list[_Unsettled] = []  # settlements to write again
        self._renewing: trio.Event | None = None  # set when the renewal in progress ends
        self._settled: dict[str, trio.Event] = {}

    # Admission

    async def reserve(
        self, user_id: str, day: str, limits: ResolvedLimits, *, prompt: int, output: int,
        choices: int = 1,
    ) -> Hold | OverQuota | Busy | TooMany:
        result = await trio.to_thread.run_sync(self._reserve, user_id, day, limits, prompt, output, choices)
        if isinstance(result, Hold) and result.id:
            self._live[result.id] = result
        return result

    def _reserve(
        self, user_id: str, day: str, limits: ResolvedLimits, prompt: int, output: int, choices: int
    ) -> Hold | OverQuota | Busy | TooMany:
        month, next_month = _month_bounds(day)
        params = {"user": user_id, "day": date.fromisoformat(day), "month": month, "next_month": next_month,
                  "per_minute": limits.requests_per_minute or 0}
        with self._store.transaction() as conn, conn.pipeline():
            conn.execute(_NOT_FLUSHED)
            conn.execute(_LOCK, (LEDGER_LOCK, user_lock_key(user_id)))
            conn.execute(_PRUNE_RESERVATIONS, params)
            if limits.requests_per_minute is not None:
                conn.execute(_PRUNE_ADMISSIONS, params)
            row = conn.execute(_READ, params).fetchone()
            assert row is not None
            settled_day, settled_month, held_day, held_month, in_flight, admitted, ends_in, new_id = row
            refusal = check_rates(limits, in_flight=in_flight, admitted=admitted, window_ends_in=ends_in)
            if refusal is not None:
                return refusal
            tokens, cap = 0, output
            if limits.limits_tokens:
                usage = PeriodUsage(day, settled_day, settled_month, held_day, held_month)
                result = plan(usage, limits, prompt, output, choices)
                if not isinstance(result, Fits):
                    return result
                tokens, cap = result.reserve, result.cap
            hold_id = 0
            if tokens or limits.concurrent_requests is not None:
                hold_id = new_id
                conn.execute(_INSERT_RESERVATION, (hold_id, user_id, params["day"], tokens, self.ttl))
            if limits.requests_per_minute is not None:
                conn.execute(_INSERT_ADMISSION, (user_id,))
        return Hold(user_id, day, tokens, cap, hold_id)

    # Settlement

    async def settle(self, hold: Hold, charge: Charge | None) -> None:
        if charge is not None and not (charge.total_tokens or charge.requests):
            charge = None
        if not hold.id and charge is None:
            return
        try:
            await self._write_settlement(hold, charge)
        except StoreError:
            # Kept, and its reservation renewed, until serve() writes it.
            self._unsettled.append(_Unsettled(hold, charge))
            raise

    async def _write_settlement(self, hold: Hold, charge: Charge | None) -> None:
        while self._renewing is not None:  # a renewal must not bring back what this deletes
            await self._renewing.wait()
        self._live.pop(hold.id, None)
        try:
            await trio.to_thread.run_sync(self._settle, hold, charge)
        except BaseException:
            if hold.id:
                self._live[hold.id] = hold
            raise
        self._notify(hold.user_id)

    def _settle(self, hold: Hold, charge: Charge | None) -> None:
        with self._store.transaction() as conn, conn.pipeline():
            if charge is None:
                # A release: if a crash of the server undid it, the reservation would only
                # count until it expires.
                conn.execute(_NOT_FLUSHED)
            if hold.id:
                conn.execute("DELETE FROM reservations WHERE id = %s", (hold.id,))
            if charge is None:
                return
            day = UsageDay(hold.day, charge.requests, charge.prompt_tokens, charge.completion_tokens,
                           charge.total_tokens)
            owner_must_exist = self._owner_must_exist
            if not self._store.add_usage_in(conn, hold.user_id, [day], owner_must_exist=owner_must_exist):
                # Removed meanwhile (built-in auth): everything kept for them is gone for good,
                # this usage too (the reservation's deletion still commits).
                log.info("usage of removed user %s not kept", hold.user_id)

    def _notify(self, user_id: str) -> None:
        event = self._settled.pop(user_id, None)
        if event is not None:
            event.set()

    def next_settlement(self, user_id: str) -> trio.Event:
        event = self._settled.get(user_id)
        if event is None:
            event = self._settled[user_id] = trio.Event()
        return event

    # Reading

    async def usage(self, user_id: str) -> UsageRecord:
        return await trio.to_thread.run_sync(self._store.load_usage, user_id)

    def held(self, user_id: str) -> int:
        return sum(h.tokens for h in self._live.values() if h.user_id == user_id)

    # In the background

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        swept = trio.current_time()
        try:
            while True:
                await trio.sleep(self.ttl / 6)
                sweep = trio.current_time() - swept >= SWEEP_EVERY
                if sweep:
                    swept = trio.current_time()
                try:
                    await self.renew(sweep=sweep)
                except StoreError as exc:
                    log.warning("reservations not renewed (%d held here): %s", len(self._live), exc)
        finally:
            if self._unsettled:
                log.error("%d settlements could not be written before the end (the database was "
                          "unreachable): their usage is not in the ledger", len(self._unsettled))

    async def renew(self, *, sweep: bool = False) -> None:
        """Renew this process's reservations (bringing back any that expired or were lost while
        their requests still run), write the settlements kept for later, forget the settlement
        events nobody waits for, and (``sweep``) delete every user's expired rows."""
        for user_id, event in list(self._settled.items()):
            if not event.statistics().tasks_waiting:
                del self._settled[user_id]
        if self._live:
            # From here to the end of the write, settlements wait: a reservation a settlement
            # deletes meanwhile would otherwise be brought back.
            holds, gate = list(self._live.values()), trio.Event()
            self._renewing = gate
            try:
                missing = await trio.to_thread.run_sync(self._renew, holds)
            finally:
                self._renewing = None
                gate.set()
            if missing:
                log.warning("%d reservations of requests still in flight here had expired or were "
                            "lost (the database was unreachable or restarted): held again", missing)
        while self._unsettled:
            entry = self._unsettled[0]
            await self._write_settlement(entry.hold, entry.charge)
            self._unsettled.pop(0)
            log.info("a settlement kept while the database was unreachable is written")
        if sweep:
            await trio.to_thread.run_sync(self._sweep)

    def _renew(self, holds: list[Hold]) -> int:
        """Renew ``holds``, writing back any that expired or are gone; returns how many those were."""
        ids = [h.id for h in holds]
        columns = (ids, [h.user_id for h in holds], [h.day for h in holds], [h.tokens for h in holds])
        with self._store.transaction() as conn, conn.pipeline():
            found = conn.execute(_STILL_VALID, (ids,))
            conn.execute(_RENEW, (self.ttl, *columns))
            return len(holds) - found.fetchone()[0]

    def _sweep(self) -> None:
        with self._store.transaction() as conn:
            for statement in _SWEEP:
                conn.execute(statement)
