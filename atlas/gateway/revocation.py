"""Sessions end when their token does: a sweep that re-checks every open connection's token.

Each message re-checks its connection's token (``ws.still_authorized``), but a connection that
sends nothing would keep its room, and a stream in flight would keep spending, after its token
was rotated or its user removed. So once per auth cache period every open connection's token is
verified again (each distinct token once, through the verifier's cache), a revoked one closes
with 4001, and with built-in auth a room whose user no longer exists is revoked whole: its
connections closed, its requests cancelled (``Room.revoke``).
"""

from __future__ import annotations

import logging
from typing import NoReturn

import trio

from atlas.gateway.auth import AuthUnavailable, TokenVerifier, Unauthorized
from atlas.gateway.connection import Connection
from atlas.protocol import CLOSE_UNAUTHORIZED, error_frame
from atlas.rooms import RoomRegistry
from atlas.store import Store, StoreError

log = logging.getLogger("atlas.gateway.revocation")

MIN_PERIOD_SECONDS = 0.2


async def serve_revocation_sweeps(
    verifier: TokenVerifier, rooms: RoomRegistry, store: Store, *, period: float,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    task_status.started()
    while True:
        await trio.sleep(max(period, MIN_PERIOD_SECONDS))
        await sweep(verifier, rooms, store)


async def sweep(verifier: TokenVerifier, rooms: RoomRegistry, store: Store) -> None:
    verdicts: dict[str, bool] = {}  # token -> still valid
    for room in list(rooms.rooms.values()):
        closed = 0
        connections = [c for c in list(room.connections) if isinstance(c, Connection)]
        for connection in connections:
            token = connection.token or ""
            if token not in verdicts:
                verdicts[token] = await still_valid(verifier, token)
            if not verdicts[token]:
                closed += 1
                connection.send_nowait(error_frame("unauthorized", "this token has been revoked"))
                connection.close_after_pending(CLOSE_UNAUTHORIZED, "token revoked")
        if closed and rooms.users_are_stored and not await user_exists(store, room.id):
            room.revoke("this user no longer exists")


async def still_valid(verifier: TokenVerifier, token: str) -> bool:
    try:
        await verifier.verify(token)
    except Unauthorized:
        return False
    except AuthUnavailable:
        return True  # unknown: the next sweep asks again; billable work is refused meanwhile
    return True


async def user_exists(store: Store, user_id: str) -> bool:
    try:
        return await store.read(store.load_user, user_id) is not None
    except StoreError:
        return True  # unreadable is not removed; the operator is told by the store's error
