"""Rooms: one per user (room id = user id), each owned by a task in the registry's nursery.

A room holds, after its first load, the user's latest credentials (from the auth API), the
preferences and conversations from ``rooms/{id}.json``, its live connections, and a nursery for
the agent requests in flight. It is evicted once nothing holds it (no connection, no HTTP request,
no agent request) for ``room_idle_seconds``; the next use loads it again from disk.

Writes go through ``Room.save``: under the room's lock, the new state is written durably (in a
worker thread, so fsync never blocks the event loop) and only then becomes the room's state, so
whatever a client has been told is already on disk.

A room whose user is removed is revoked (``Room.revoke``): its connections are closed with 4001,
its requests cancelled, it leaves the registry, and it never writes again. With built-in auth
every write also checks, atomically in the store, that the user still exists (a removal from
another process is seen at the latest there), and a user added again under the same id gets a
fresh room, never the loaded room of the previous one.

One owner per room across processes: a room is loaded only under its lease
(``atlas.store.leases``), taken before the load and given back when the room is evicted. A room
another process owns is not loaded here (``RoomElsewhere``); every write carries the lease's
fence. A room gives itself up (``Room.give_up``: connections closed, requests cancelled, out of
the registry, no more writes) when its lease is lost (the database session that held it ended:
close 1011, ``store_unavailable``), when a write finds another owner (close 1013,
``room_elsewhere``), or when another process was asked for it (a hand-off, ``serve_handoffs``:
close 1013, ``room_elsewhere``, so that its clients reconnect to where the load balancer now sends
them). Requests that only read a room (HTTP) never take its lease: ``visit_room``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial
from typing import Any, NoReturn, Protocol

import msgspec
import trio

from atlas.protocol import CLOSE_INTERNAL, CLOSE_TRY_AGAIN, CLOSE_UNAUTHORIZED, error_frame
from atlas.store import (
    Identity, Lease, LeaseLost, RoomLeases, RoomState, Store, StoreError, StoreUnavailable, Turn,
    UserGone,
)


class Connection(Protocol):
    """What a room needs of a live connection (the gateway's ``Connection`` is one); rooms sit
    below the gateway and never import it."""

    def send_nowait(self, frame: str) -> bool: ...
    def close(self, code: int, reason: str) -> None: ...
    def close_after_pending(self, code: int, reason: str) -> None: ...

log = logging.getLogger("atlas.rooms")

MAX_CONVERSATION_CHARS = 100_000
MAX_PREFS_BYTES = 64 * 1024


class PrefsTooLarge(Exception):
    pass


class RoomElsewhere(Exception):
    """Another live process owns the room (holds its lease): it is not served here."""

    def __init__(self, room_id: str) -> None:
        super().__init__(f"room {room_id!r} is served by another process")
        self.room_id = room_id


LOST_MESSAGE = "the server lost its connection to the database; reconnect shortly"
MOVED_MESSAGE = "this room is now served by another server; reconnect"


class Room:
    def __init__(self, room_id: str, registry: RoomRegistry) -> None:
        self.id = room_id
        self.identity: Identity | None = None
        self.state = RoomState()
        self.connections: dict[Connection, None] = {}  # insertion-ordered set, keyed by socket
        self.nursery: trio.Nursery | None = None
        # The gateway's resumable agent requests (``atlas.gateway.streams.RoomStreams``), made on
        # first use: they belong to the room, not to the connection that sent them.
        self.streams: Any = None
        self._registry = registry
        self._holders = 0
        self._in_flight = 0
        self._changed = trio.Event()
        self._loaded = trio.Event()
        self._load_error: BaseException | None = None
        self._write_lock = trio.Lock()
        self.lease: Lease | None = None  # taken before the room is loaded
        self.gone = False  # given up (revoked, or its lease lost): it never writes again
        self.revoked = False  # given up because its user was removed
        self._farewell = (CLOSE_INTERNAL, "internal", "")  # what its connections were told

    # Life cycle

    @property
    def busy(self) -> bool:
        return self._holders > 0 or self._in_flight > 0

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()
        self._registry._notify()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Take the room's lease, load the room, serve its request tasks, and return (giving the
        lease back) once it has been idle long enough or was given up."""
        leases = self._registry.leases
        try:
            try:
                self.lease = await leases.acquire(self.id)
                if self.lease is None:
                    raise RoomElsewhere(self.id)
                self.state = await self._registry.store.read(self._registry.store.load_room, self.id)
            except BaseException as exc:
                self._load_error = exc
                raise
            finally:
                self._loaded.set()
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                nursery.start_soon(self._give_up_when_lost, self.lease)
                task_status.started()
                await self._wait_until_idle_expired()
                nursery.cancel_scope.cancel()  # idle: nothing runs but the watch above
        finally:
            self._registry._forget(self)
            if self.lease is not None:
                leases.release(self.lease)

    async def _give_up_when_lost(self, lease: Lease) -> None:
        await lease.lost.wait()
        log.warning("room %s given up: its lease was lost with the database connection", self.id)
        self.give_up(CLOSE_INTERNAL, "store_unavailable", LOST_MESSAGE)

    async def _wait_until_idle_expired(self) -> None:
        while True:
            changed = self._changed
            if self.busy:
                await changed.wait()
                continue
            with trio.move_on_after(self._registry.idle_seconds):
                await changed.wait()
            if not changed.is_set() and not self.busy:
                log.debug("room %s evicted after idling", self.id)
                # Leave the registry before the next checkpoint so no opener can pick this room.
                self._registry._forget(self)
                return

    async def wait_loaded(self) -> None:
        if not self._loaded.is_set():
            await self._loaded.wait()
        if self._load_error is not None:
            raise self._load_error

    def _hold(self) -> None:
        self._holders += 1
        self._notify()

    def _release(self) -> None:
        self._holders -= 1
        self._notify()

    # Credentials and state

    def set_identity(self, identity: Identity) -> None:
        self.identity = identity

    def belongs_to_another(self, identity: Identity) -> bool:
        """Whether ``identity`` is a different person under this room's user id: the user was
        removed and created again since this room was loaded (built-in auth knows when)."""
        mine = self.identity.created_at if self.identity else None
        return mine is not None and identity.created_at is not None and mine != identity.created_at

    def revoke(self, message: str) -> None:
        """The room's user no longer exists: close every connection with 4001 (after an error
        frame saying why), cancel every request, leave the registry, and never write again."""
        if self.gone:
            return
        self.revoked = True
        log.info("room %s revoked: %s", self.id, message)
        self.give_up(CLOSE_UNAUTHORIZED, "unauthorized", message)

    def give_up(self, close_code: int, code: str, message: str) -> None:
        """Stop serving the room here: every connection gets an error frame (``code``) and is
        closed with ``close_code``, every request is cancelled, the room leaves the registry (the
        next use loads it again, under a new lease) and never writes again."""
        if self.gone:
            return
        self.gone = True
        self._farewell = (close_code, code, message)
        self._registry._forget(self)
        for connection in list(self.connections):
            self._send_farewell(connection)
        if self.nursery is not None:
            self.nursery.cancel_scope.cancel()

    def _send_farewell(self, connection: Connection) -> None:
        close_code, code, message = self._farewell
        connection.send_nowait(error_frame(code, message))
        connection.close_after_pending(close_code, message)

    @property
    def owned(self) -> bool:
        """Whether this process still serves the room (billable work needs it)."""
        return not self.gone and self.lease is not None and not self.lease.lost.is_set()

    @property
    def has_credentials(self) -> bool:
        return bool(self.identity and self.identity.virtual_key)

    @property
    def prefs(self) -> dict[str, Any]:
        return self.state.prefs

    async def save(self, state: RoomState) -> None:
        """Make ``state`` durable, then the room's state. Callers hold ``write_lock``.
        Raises ``UserGone`` (and revokes the room) when its user no longer exists, and
        ``LeaseLost`` (and gives the room up) when this process no longer owns it."""
        if self.gone:
            raise UserGone(self.id) if self.revoked else LeaseLost(self.id)
        assert self.lease is not None, "room not loaded"
        try:
            await trio.to_thread.run_sync(partial(
                self._registry.store.save_room, self.id, state,
                owner_must_exist=self._registry.users_are_stored, fence=self.lease.fence,
            ))
        except UserGone:
            self.revoke("this user no longer exists")
            raise
        except LeaseLost:
            log.warning("room %s given up: another process owns it now", self.id)
            self.give_up(CLOSE_TRY_AGAIN, "room_elsewhere", MOVED_MESSAGE)
            raise
        self.state = state

    @property
    def write_lock(self) -> trio.Lock:
        return self._write_lock

    async def merge_prefs(self, patch: dict[str, Any]) -> dict[str, Any]:
        """Merge ``patch`` into the prefs (``None`` deletes a key); returns them once durable.
        Raises PrefsTooLarge, changing nothing, when the result would exceed MAX_PREFS_BYTES."""
        async with self._write_lock:
            prefs = dict(self.state.prefs)
            for key, value in patch.items():
                if value is None:
                    prefs.pop(key, None)
                else:
                    prefs[key] = value
            if len(msgspec.json.encode(prefs)) > MAX_PREFS_BYTES:
                raise PrefsTooLarge(f"preferences are limited to {MAX_PREFS_BYTES // 1024} KiB")
            await self.save(RoomState(prefs=prefs, conversations=self.state.conversations))
            return prefs

    def conversation(self, conversation_id: str) -> list[Turn]:
        return list(self.state.conversations.get(conversation_id, ()))

    async def append_turns(self, conversation_id: str, turns: list[Turn], keep: int) -> None:
        """Append turns to a conversation, keeping its last ``keep`` messages and at most
        ``MAX_CONVERSATION_CHARS`` of text (the room's file is rewritten on every turn, so it
        must stay small); durable on return."""
        async with self._write_lock:
            conversations = dict(self.state.conversations)
            history = (conversations.pop(conversation_id, []) + turns)[-keep:]
            while len(history) > 1 and sum(len(t.content) for t in history) > MAX_CONVERSATION_CHARS:
                del history[0]
            # Re-inserted last: the dict's order is recency, and the oldest conversations go
            # first when there are too many.
            conversations[conversation_id] = history
            while len(conversations) > self._registry.max_conversations:
                del conversations[next(iter(conversations))]
            await self.save(RoomState(prefs=self.state.prefs, conversations=conversations))

    # Connections and requests

    def attach(self, connection: Connection) -> None:
        self.connections[connection] = None
        self._notify()
        if self.gone:
            # Given up between being opened and this connection joining: told the same.
            self._send_farewell(connection)

    def detach(self, connection: Connection) -> None:
        # Keyed by the connection object itself: a stale close never removes a live connection.
        self.connections.pop(connection, None)
        self._notify()

    def broadcast(self, frame: str, *, sender: Connection | None = None) -> None:
        for connection in list(self.connections):
            if connection is not sender:
                connection.send_nowait(frame)

    def start_request(self, request: Callable[[], Awaitable[None]]) -> None:
        """Run ``request`` in the room's nursery; the room stays loaded until it ends."""
        assert self.nursery is not None, "room not running"
        self._in_flight += 1
        self._notify()

        async def run_and_release() -> None:
            try:
                await request()
            except Exception:
                log.exception("agent request in room %s failed", self.id)
            finally:
                self._in_flight -= 1
                self._notify()

        self.nursery.start_soon(run_and_release)


class RoomSnapshot:
    """A room as stored, for a request that only reads it and that this process does not serve
    (its lease is elsewhere, or nobody's): what ``visit_room`` gives instead of a ``Room``."""

    def __init__(self, room_id: str, state: RoomState, identity: Identity | None) -> None:
        self.id = room_id
        self.state = state
        self.identity = identity
        self.connections: dict[Connection, None] = {}  # none here

    @property
    def prefs(self) -> dict[str, Any]:
        return self.state.prefs

    @property
    def has_credentials(self) -> bool:
        return bool(self.identity and self.identity.virtual_key)


class RoomRegistry:
    def __init__(
        self, store: Store, nursery: trio.Nursery, *, idle_seconds: float, max_conversations: int = 50,
        users_are_stored: bool = False, leases: RoomLeases | None = None, handoff_seconds: float = 10.0,
    ) -> None:
        self.store = store
        self.leases: RoomLeases = leases if leases is not None else store.room_leases()
        # A room owned at least this long is handed over when another process is asked for it.
        self.handoff_seconds = handoff_seconds
        self._visits = 0
        # Built-in auth: the store holds the users, so a room write can check its user exists.
        self.users_are_stored = users_are_stored
        self.idle_seconds = idle_seconds
        self.max_conversations = max_conversations
        self.rooms: dict[str, Room] = {}
        self._nursery = nursery
        self._changed = trio.Event()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _forget(self, room: Room) -> None:
        if self.rooms.get(room.id) is room:
            del self.rooms[room.id]

    @asynccontextmanager
    async def open_room(self, room_id: str, identity: Identity | None = None) -> AsyncIterator[Room]:
        """The room for ``room_id``, loaded, held (not evicted) until the block exits; with
        ``identity`` (the verified user), the room's credentials are set from it.

        Raises StoreError when the room's file cannot be read, or its lease cannot be taken now
        (``StoreUnavailable``), and ``RoomElsewhere`` when another process serves it; nothing is
        cached for a failed load, so the next open tries again (after an operator repaired the
        file, or once the other process let the room go)."""
        room = self.rooms.get(room_id)
        if room is not None and identity is not None and room.belongs_to_another(identity):
            room.revoke("this user was removed")
            room = None
        if room is not None and room.lease is not None and room.lease.lost.is_set():
            room.give_up(CLOSE_INTERNAL, "store_unavailable", LOST_MESSAGE)  # before its watch does
            room = None
        created = room is None
        if room is None:
            room = Room(room_id, self)
            self.rooms[room_id] = room
        # Held before the first checkpoint, so the room cannot be evicted under us.
        room._hold()
        try:
            if created:
                try:
                    await self._nursery.start(room.run)
                except StoreError as exc:
                    log.error("room %s cannot be loaded: %s", room_id, exc)
                    raise
            else:
                await room.wait_loaded()
            if identity is not None:
                room.set_identity(identity)
            yield room
        finally:
            room._release()

    @asynccontextmanager
    async def visit_room(
        self, room_id: str, identity: Identity | None = None, *, read: bool = True,
    ) -> AsyncIterator[Room | RoomSnapshot]:
        """For a request that reads the room and changes nothing (HTTP status, the proxy, /v1):
        the room, held, if this process serves it; else the room as stored (``read=False``: an
        empty one, for a request that needs none of it), without taking its lease, so that such
        a request, answered by any process, never keeps the room from its owner. Counted until
        the block exits, so that a graceful shutdown waits for it.

        Raises StoreError when the room's stored state cannot be read."""
        self._visits += 1
        self._notify()
        try:
            async with AsyncExitStack() as stack:
                view: Room | RoomSnapshot | None = None
                if room_id in self.rooms:
                    try:
                        view = await stack.enter_async_context(self.open_room(room_id, identity))
                    except RoomElsewhere:
                        view = None
                if view is None and not read:
                    view = RoomSnapshot(room_id, RoomState(), identity)
                if view is None:
                    if not await self.leases.healthy():
                        # Known to be down: say so now rather than after the store's timeout.
                        raise StoreUnavailable(f"{self.store.location} is unavailable")
                    state = await self.store.read(self.store.load_room, room_id)
                    view = RoomSnapshot(room_id, state, identity)
                yield view
        finally:
            self._visits -= 1
            self._notify()

    async def serve_handoffs(self) -> NoReturn:
        """Give up a room another process was asked for (it refused a connection because this
        process owns the room), so that its clients reconnect to where the load balancer sends
        them now (a process was added, or came back). A room with connections is kept while
        it has been owned for less than ``handoff_seconds``: a client that connects to a
        process directly, past the balancer, moves a room at most that often."""
        while True:
            room_id = await self.leases.wait_wanted()
            room = self.rooms.get(room_id)
            if room is None or room.gone or room.lease is None:
                continue
            owned_for = trio.current_time() - room.lease.taken_at
            if room.connections and owned_for < self.handoff_seconds:
                log.info("room %s wanted elsewhere; kept (owned here for %.1f s only)", room_id, owned_for)
                continue
            log.info("room %s handed over: another process was asked for it", room_id)
            room.give_up(CLOSE_TRY_AGAIN, "room_elsewhere", MOVED_MESSAGE)

    def connections(self) -> list[Connection]:
        return [connection for room in self.rooms.values() for connection in room.connections]

    def busy(self) -> bool:
        return self._visits > 0 or any(room.busy for room in self.rooms.values())

    async def wait_drained(self) -> None:
        """Return once no room has a connection, a holder or a request in flight, and no
        request visits a room."""
        while self.connections() or self.busy():
            await self._changed.wait()

    def close_all(self, code: int, reason: str) -> None:
        for connection in self.connections():
            connection.close(code, reason)


async def serve_rooms(
    store: Store,
    *,
    idle_seconds: float,
    users_are_stored: bool = False,
    handoff_seconds: float = 10.0,
    task_status: trio.TaskStatus[RoomRegistry] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Own every room task and the room leases (``store.room_leases()``); reports the registry
    once ready. Runs until cancelled."""
    leases = store.room_leases()
    async with trio.open_nursery() as nursery:
        await nursery.start(leases.serve)
        registry = RoomRegistry(
            store, nursery, idle_seconds=idle_seconds, users_are_stored=users_are_stored,
            leases=leases, handoff_seconds=handoff_seconds,
        )
        nursery.start_soon(registry.serve_handoffs)
        task_status.started(registry)
        await trio.sleep_forever()
