"""The store interface: everything Atlas keeps between runs, behind one ``Protocol``.

Rooms, auth and the CLI use only this interface, so a backend is added beside the others
(``json_store``, the embedded default; ``postgres``, for several processes sharing one database)
without touching them. Its methods block (file or database I/O); async callers run the reads
on the hot path (a token's user, a room, a user's usage) with the store's own ``read``, and
the rest in a worker thread with ``trio.to_thread.run_sync``.

Guarantees every backend gives:
- a ``save_*`` that returns is durable: a crash afterwards never loses it, and a crash during it
  leaves the old value or the new one, never a mix;
- a stored value that cannot be decoded raises ``StoreCorrupt`` naming where it is, and is never
  overwritten silently;
- removing a user removes everything kept for them;
- a store that cannot be reached raises ``StoreUnavailable`` (nothing written, try again later);
- ``room_leases()`` says which process owns a room (``leases.py``), and a room write that carries
  a lease's fence is refused with ``LeaseLost`` once that lease is no longer the room's current one.

The usage ledger has two faces. The blocking methods (``load_usage``, ``add_usage`` and
``usage_user_ids``) read it and add to it. A server process takes one ``Ledger`` (``usage_ledger()``): the live ledger,
async, that reserves budget for requests in flight and settles them with their real usage. Its
``reserve`` is one check-and-hold (``atlas.store.usage.plan``). The embedded backend does it in
memory under the event loop (``ledger.ProcessLedger``), one process being the only writer of its
files; PostgreSQL does it in one transaction under a per-user lock (``pg_ledger``), so that the
limits, request counts included, hold across every process sharing the database.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import trio

from atlas.store.leases import RoomLeases
from atlas.store.records import RoomState, TokenRecord, UsageDay, UsageRecord, UserRecord
from atlas.store.usage import Busy, OverQuota, ResolvedLimits, TooMany

T = TypeVar("T")


@dataclass(frozen=True)
class Hold:
    """Tokens reserved for one request in flight, against the limits of ``day`` (and its month).
    ``cap`` is the output cap per choice the request may send. ``tokens == 0``: nothing was
    reserved (the user has no token limit); the hold still says where the usage is recorded."""

    user_id: str
    day: str
    tokens: int
    cap: int
    id: int = 0


@dataclass(frozen=True)
class Charge:
    """What a finished request costs: the provider's usage, or Atlas's upper-bound estimate."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    requests: int = 1


class Ledger(Protocol):
    # False: ``reserve`` checks the token limits only, and the caller counts the requests per
    # minute and in flight (one process). True: ``reserve`` also counts them, across every
    # process sharing the ledger (a hold is then the request's place until ``settle``), and is
    # worth calling for a user with any limit.
    counts_requests: bool
    # How long a ``Busy`` answer is worth waiting for a settlement before asking again: a
    # settlement in another process sets no event here (inf: every settlement sets one).
    poll_seconds: float

    async def reserve(
        self, user_id: str, day: str, limits: ResolvedLimits, *, prompt: int, output: int,
        choices: int = 1,
    ) -> Hold | OverQuota | Busy | TooMany:
        """Check the limits and, when the worst case fits, hold it (atomically). ``TooMany``
        only from a ledger that ``counts_requests``."""
        ...

    async def settle(self, hold: Hold, charge: Charge | None) -> None:
        """Drop the hold and add ``charge`` (None: the request cost nothing) to the hold's day.
        Durable on return; the new totals count for every reservation after the call."""
        ...

    def next_settlement(self, user_id: str) -> trio.Event:
        """Set at the next settlement of this user: take it before ``reserve`` so a ``Busy``
        answer can wait for room without missing one."""
        ...

    async def usage(self, user_id: str) -> UsageRecord:
        """The user's settled usage, as it is durable."""
        ...

    def held(self, user_id: str) -> int:
        """Tokens this process holds for the user's requests in flight."""
        ...

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """What the ledger does in the background while the process serves (keep its holds
        alive in a shared database, retry settlements that could not be written). Never
        returns; cancel it to stop."""
        ...


class Store(Protocol):
    @property
    def location(self) -> str:
        """Where the data lives, for log lines (never holds a password)."""
        ...

    def prepare(self) -> None:
        """Create (or migrate) what the store needs and clean up what a crash left behind."""
        ...

    def close(self) -> None:
        """Release what the store holds open (database connections). Safe to call again."""
        ...

    async def read(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)``, one of this store's blocking reads, off the event loop: the JSON files
        on one thread of their own (``serial_thread``: page-cache reads take less time than a
        ``to_thread`` hand-over costs a busy loop), a database on ``to_thread`` (its calls wait
        on the network, side by side, each on a pooled connection)."""
        ...

    def room_leases(self) -> RoomLeases:
        """Who owns which room, for the processes sharing this store (a new object: the server
        runs its ``serve`` and uses it for its rooms)."""
        ...

    # Users (built-in auth)
    def load_user(self, user_id: str) -> UserRecord | None: ...
    def save_user(self, user: UserRecord) -> None: ...
    def delete_user(self, user_id: str) -> None:
        """The user's record (a backend may drop its token hashes with it); ``remove_user``
        removes everything."""
        ...

    def user_ids(self) -> list[str]: ...
    def has_users(self) -> bool: ...

    # Token hashes (built-in auth): the token itself is never stored
    def load_token(self, token_hash: str) -> TokenRecord | None: ...
    def save_token(self, token_hash: str, user_id: str) -> None:
        """Raises ``UserGone`` and writes nothing when the user does not exist (save the user
        first), atomically with ``remove_user``: a token never outlives its user."""
        ...

    def delete_token(self, token_hash: str) -> None: ...

    # Rooms: preferences and conversations
    def load_room(self, room_id: str) -> RoomState: ...

    def save_room(
        self, room_id: str, state: RoomState, *, owner_must_exist: bool = False, fence: int | None = None,
    ) -> None:
        """With ``owner_must_exist`` (built-in auth), raises ``UserGone`` and writes nothing
        when the room's user no longer exists, atomically with ``remove_user``: a write racing a
        removal either lands before it (and is removed with the rest) or is refused. With
        ``fence`` (the room's ``Lease.fence``), raises ``LeaseLost`` and writes nothing unless
        that lease still owns the room, atomically with another process taking it over."""
        ...

    def delete_room(self, room_id: str) -> None: ...

    def remove_user(self, user_id: str) -> None:
        """Remove the user and everything kept for them (token hash, room, usage ledger,
        leftovers of interrupted writes), for good."""
        ...

    # Usage ledger (per user and UTC day)
    def load_usage(self, user_id: str) -> UsageRecord: ...
    def add_usage(self, user_id: str, days: list[UsageDay], *, owner_must_exist: bool = False) -> None:
        """Add ``days`` (increments) to the user's ledger, atomically, each to its day's totals,
        so that processes sharing a database never lose each other's usage; days older than
        the ledger keeps are dropped. ``owner_must_exist``: as for ``save_room``."""
        ...

    def usage_user_ids(self) -> list[str]: ...
    def usage_ledger(self, *, owner_must_exist: bool = False) -> Ledger:
        """The live ledger of a server process (take one per process). With
        ``owner_must_exist`` (built-in auth), usage of a user removed meanwhile is dropped, not
        written back (``UserGone``, as for a room)."""
        ...
