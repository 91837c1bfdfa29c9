"""The WebSocket endpoint, ``/party/{roomId}`` and ``/parties/main/{roomId}``, as raw ASGI.

Order of events: accept the upgrade (so the client can see a close code), check the room id
(4400), verify the token (4001, or 1011 when the auth API is unavailable), check it is this room's
user (4003), open the room (1013 ``room_elsewhere`` when another process serves it, 1011
``store_unavailable`` when its lease cannot be taken now), send ``ready``, then read frames until
the client leaves. A 4xxx close
is preceded by an ``error`` frame. Every frame the server cannot use gets an error reply and the
connection stays open; an unexpected failure while handling one frame is logged and answered with
``internal``, and the connection still stays open.
"""

from __future__ import annotations

import logging
import secrets
from typing import Any

import msgspec
import trio

from atlas.asgi import query_param
from atlas.gateway.auth import AccessDenied, AuthUnavailable, Unauthorized, admit, store_denial, token_from_scope
from atlas.gateway.connection import Connection
from atlas.gateway.services import Services
from atlas.protocol import (
    CLOSE_POLICY,
    CLOSE_TOO_BIG,
    CLOSE_TRY_AGAIN,
    CLOSE_UNAUTHORIZED,
    AgentCancel,
    AgentList,
    AgentResume,
    AgentStream,
    Broadcast,
    BroadcastMessage,
    Ping,
    Pong,
    PrefsGet,
    PrefsMessage,
    PrefsSet,
    ProtocolError,
    Ready,
    UsageGet,
    decode_client_message,
    encode,
    error_frame,
    usage_message,
)
from atlas.rooms import PrefsTooLarge, Room, RoomElsewhere
from atlas.store import LeaseLost, StoreError, StoreUnavailable, UserGone
from atlas.store.usage import parse_day

log = logging.getLogger("atlas.gateway.ws")

PONG = encode(Pong())
CLOSE_WAIT_SECONDS = 2.0
# The client's reconnect, through the load balancer, reaches the process that serves the room.
ROOM_ELSEWHERE = AccessDenied(
    "room_elsewhere", "this room is served by another server; reconnect",
    status=409, close_code=CLOSE_TRY_AGAIN,
)


def connection_id_from_scope(scope: dict[str, Any]) -> str:
    """The client's ``_pk`` if it sent a sensible one, else a fresh id. Only a label: connections
    are told apart by their socket, never by this."""
    value = query_param(scope, "_pk")
    if value is not None and 0 < len(value) <= 128 and value.isprintable():
        return value
    return secrets.token_hex(8)


async def websocket_endpoint(
    services: Services, room_id: str, scope: dict[str, Any], receive: Any, send: Any
) -> None:
    event = await receive()
    if event["type"] != "websocket.connect":
        return
    await send({"type": "websocket.accept"})

    async def reject(denied: AccessDenied) -> None:
        await send({"type": "websocket.send", "text": error_frame(denied.code, denied.message)})
        await send({"type": "websocket.close", "code": denied.close_code, "reason": denied.message[:120]})

    try:
        identity = await admit(
            services.verifier, room_id, scope, shutting_down=services.shutting_down
        )
    except AccessDenied as denied:
        await reject(denied)
        return
    connection = Connection(connection_id_from_scope(scope), token=token_from_scope(scope))
    try:
        async with services.rooms.open_room(room_id, identity) as room:
            limit = services.settings.max_connections_per_user
            if len(room.connections) >= limit:
                await reject(AccessDenied(
                    "too_many_connections", f"this user already has {limit} connections open",
                    status=429, close_code=CLOSE_POLICY,
                ))
                return
            await serve_connection(services, room, connection, receive, send)
    except RoomElsewhere:
        log.info("room %s: connection refused, another process serves the room", room_id)
        await reject(ROOM_ELSEWHERE)
        # The balancer sent this connection here: the owner may hand the room over.
        await services.rooms.leases.want(room_id)
        return
    except StoreError as exc:
        await reject(store_denial(exc))
        return
    if connection.close_code is not None:
        with trio.move_on_after(CLOSE_WAIT_SECONDS) as scope_:
            scope_.shield = True
            await send({
                "type": "websocket.close", "code": connection.close_code,
                "reason": connection.close_reason[:120],
            })


async def serve_connection(
    services: Services, room: Room, connection: Connection, receive: Any, send: Any
) -> None:
    async def write(frame: str) -> None:
        await send({"type": "websocket.send", "text": frame})

    room.attach(connection)
    try:
        async with trio.open_nursery() as nursery:
            connection.bind(nursery.cancel_scope, lambda: room.detach(connection))

            async def write_until_closed() -> None:
                await connection.serve_writer(write)
                nursery.cancel_scope.cancel()  # the outbox was closed and drained: the end

            nursery.start_soon(write_until_closed)
            await connection.send(encode(Ready(
                room.id, room.id, connection.id, room.has_credentials, room.prefs
            )))
            await read_frames(services, room, connection, receive)
            nursery.cancel_scope.cancel()
    finally:
        room.detach(connection)
        connection.finish()


async def read_frames(services: Services, room: Room, connection: Connection, receive: Any) -> None:
    while True:
        event = await receive()
        kind = event["type"]
        if kind == "websocket.disconnect":
            return
        if kind != "websocket.receive":
            continue
        frame = event.get("text")
        if frame is None:
            await connection.send(error_frame(
                "bad_message", "binary frames are not supported: send JSON text frames"
            ))
            continue
        limit = services.settings.max_message_bytes
        if len(frame) * 4 > limit and len(frame.encode()) > limit:
            # Hypercorn counts a text message's characters; the limit is in bytes (a character
            # is up to 4 of them), so only a message near the limit is measured again here.
            connection.close(CLOSE_TOO_BIG, "message too large")
            return
        if not await still_authorized(services, room, connection, frame):
            # Closing after what is queued: the writer drains the error frame, then ends the
            # connection (reading goes on meanwhile, so the drain is not cut short).
            continue
        try:
            await handle_frame(services, room, connection, frame)
        except Exception as exc:
            log.exception("unexpected failure handling a frame in room %s", room.id)
            request_id = getattr(exc, "request_id", None)
            await connection.send(error_frame("internal", "internal error; see the server log", request_id))


async def handle_frame(services: Services, room: Room, connection: Connection, frame: str) -> None:
    try:
        message = decode_client_message(frame)
    except ProtocolError as exc:
        await connection.send(error_frame(exc.code, exc.message, exc.request_id))
        return
    match message:
        case Ping():
            await connection.send(PONG)
        case AgentStream():  # agent:text is a subclass
            if connection.auth_unavailable:
                await connection.send(error_frame(
                    "auth_unavailable", "the auth API cannot be reached; try again shortly", message.id
                ))
                return
            await services.relay.start(room, connection, message)
        case AgentCancel(id=request_id):
            await services.relay.cancel(room, connection, request_id)
        case AgentResume():
            await services.relay.resume(room, connection, message)
        case AgentList():
            await services.relay.list(room, connection, message)
        case PrefsGet():
            await connection.send(encode(PrefsMessage(room.prefs)))
        case PrefsSet(prefs=patch):
            try:
                prefs = await room.merge_prefs(patch)
            except PrefsTooLarge as exc:
                await connection.send(error_frame("too_large", str(exc)))
                return
            except (UserGone, LeaseLost):
                return  # the room was given up: this connection was told and is closing
            except StoreUnavailable as exc:
                log.error("room %s: prefs not saved: %s", room.id, exc)
                await connection.send(error_frame(
                    "store_unavailable", "the preferences could not be saved now; try again shortly"
                ))
                return
            except OSError as exc:
                log.error("room %s: prefs not saved: %s", room.id, exc)
                await connection.send(error_frame("internal", "the preferences could not be saved"))
                return
            await connection.send(encode(PrefsMessage(prefs)))
        case Broadcast(data=data):
            room.broadcast(encode(BroadcastMessage(connection.id, data)), sender=connection)
        case UsageGet(since=since):
            await send_usage(services, room, connection, since)


async def send_usage(services: Services, room: Room, connection: Connection, since: str | None) -> None:
    if since is not None:
        try:
            since = parse_day(since)
        except ValueError as exc:
            await connection.send(error_frame("bad_message", f"usage:get: since: {exc}"))
            return
    admission = services.admission
    report = await admission.report(room.id, admission.limits_for(room.identity), since)
    await connection.send(encode(usage_message(report)))


async def still_authorized(services: Services, room: Room, connection: Connection, frame: str) -> bool:
    """Check the connection's token again before each message (a cache hit while the auth cache
    is fresh), so that a revoked token or a removed user ends the session within the auth cache
    time, and a new virtual key is used from then on, on connections open before the change too.

    While the auth API is unreachable the last verified identity keeps serving what costs
    nothing; billable requests are refused then (``handle_frame``)."""
    connection.auth_unavailable = False
    try:
        identity = await services.verifier.verify(connection.token)
    except Unauthorized:
        await connection.send(error_frame("unauthorized", "this token has been revoked", request_id_of(frame)))
        connection.close_after_pending(CLOSE_UNAUTHORIZED, "token revoked")
        return False
    except AuthUnavailable:
        connection.auth_unavailable = True
        return True
    if room.belongs_to_another(identity):
        room.revoke("this user was removed")
        return False
    room.set_identity(identity)
    return True


def request_id_of(frame: str) -> str | None:
    """The ``id`` of a frame, when it is a JSON object with a string id (else None)."""
    try:
        value = msgspec.json.decode(frame)
    except msgspec.DecodeError:
        return None
    request_id = value.get("id") if isinstance(value, dict) else None
    return request_id if isinstance(request_id, str) else None
