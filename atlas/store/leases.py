"""Room leases: which process owns a room, when several processes share one store.

A room is served by one process at a time. Before loading a room, its process takes the room's
lease; it holds the lease while the room stays loaded and gives it back when the room is evicted.
A process that cannot take the lease (another live process holds it) does not serve the room.

    leases = store.room_leases()
    await nursery.start(leases.serve)       # keeps what the leases need (a database session)
    lease = await leases.acquire("alice")   # a Lease, or None: another process owns the room
    ...                                     # save_room(..., fence=lease.fence) while it is held
    await lease.lost.wait()                 # set if the ownership ends by itself
    leases.release(lease)                   # never blocks

Two implementations, one per kind of store:
- ``LocalLeases`` (the JSON files, which one process owns): every acquire succeeds, nothing is
  ever lost, there is nothing to keep;
- ``PostgresLeases`` (``pg_leases``): a session-level advisory lock per room on one dedicated
  connection per process, which PostgreSQL releases by itself when that connection ends (the
  process died, or the connection was lost), plus a fencing number checked by every room write.

Rooms use this interface only; they never ask which store is underneath.
"""

from __future__ import annotations

from typing import NoReturn, Protocol

import trio


class Lease:
    """One room owned by this process.

    ``fence`` goes with every write of the room's state (``Store.save_room(fence=)``): a store
    shared by several processes refuses a write whose fence is no longer the room's current one
    (``LeaseLost``), so a process that lost a room without noticing yet can never overwrite what
    the room's new owner acknowledged. ``lost`` is set when the ownership ended without a release
    (the database session that held it is gone); every lease of that session shares the event."""

    __slots__ = ("room_id", "fence", "lost", "taken_at")

    def __init__(self, room_id: str, fence: int | None, lost: trio.Event) -> None:
        self.room_id = room_id
        self.fence = fence
        self.lost = lost
        self.taken_at = trio.current_time()


class RoomLeases(Protocol):
    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> NoReturn:
        """Keep what the leases need (a database session, re-established when lost); reports
        ready after the first attempt, whether or not it succeeded. Runs until cancelled, and
        every lease ends with it."""
        ...

    async def acquire(self, room_id: str) -> Lease | None:
        """The room's lease, or None when another live process holds it. Raises
        ``StoreUnavailable`` when ownership cannot be decided now (the database is unreachable).
        Not cancelled half-way: a lease taken is always returned."""
        ...

    def release(self, lease: Lease) -> None:
        """Give the lease back (at once, or as soon as possible); never blocks. Safe to call for
        a lease that was lost."""
        ...

    async def healthy(self) -> bool:
        """Whether rooms can be owned here now (the database answers); cheap enough for every
        health check of a load balancer (a recent answer is reused)."""
        ...

    async def wait_wanted(self) -> str:
        """The id of the next room another process was asked to serve (its connection was refused
        because this process owns the room, or any process did): see ``want``."""
        ...

    async def want(self, room_id: str) -> None:
        """Say that this process was asked to serve ``room_id`` and could not (another process
        owns it): that owner may give the room up so that clients land where the load balancer
        now sends them. Best effort: never raises."""
        ...


class LocalLeases:
    """One process owns the whole store (the JSON files): every lease is granted and never lost."""

    def __init__(self) -> None:
        self._never = trio.Event()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> NoReturn:
        task_status.started()
        await trio.sleep_forever()

    async def acquire(self, room_id: str) -> Lease | None:
        return Lease(room_id, None, self._never)

    def release(self, lease: Lease) -> None:
        pass

    async def healthy(self) -> bool:
        return True

    async def wait_wanted(self) -> str:
        await trio.sleep_forever()

    async def want(self, room_id: str) -> None:
        pass
