"""What the relay sends of one agent request, and what a room keeps of its resumable requests.

A ``Stream`` is one agent request's output. Without ``resumable`` it goes to the one connection
that asked (``solo``), exactly as it always did: deltas wait for room in that connection's outbox,
nothing is kept, and the request ends with its connection.

A resumable request belongs to its room (``RoomStreams``, ``room.streams``), not to a connection:

- its text pieces are kept (``parts``; ``seq`` is their number) and every attached connection gets
  them through its own outbox and ``DeltaBuffer``, without ever waiting for another: a connection
  whose outbox is full is dropped, and may resume;
- ``resume`` attaches a connection and queues the pieces after ``after`` as one delta in the same
  step, before any later piece can arrive: nothing is lost, nothing is sent twice;
- when its last connection leaves, its cancel scope gets a deadline ``grace`` seconds away; a
  connection that resumes in time lifts it, else the request is cancelled (the provider request
  closes, admission settles it) and forgotten;
- once it ended it is kept ``grace`` seconds, with its text and final frame, then forgotten.

The room's buffer is bounded by ``limit`` characters of reply text. The text of running requests
counts, and ended requests are forgotten, oldest first, while the room is over. A running request
is never cut: its whole text goes into ``agent:done`` and is held for that anyway (bounded by the
reply cap, ``ATLAS_MAX_REPLY_BYTES``); one that ends larger than the bound is not kept. A room
runs at most ``ATLAS_MAX_REQUESTS_PER_CONNECTION`` x ``ATLAS_MAX_CONNECTIONS_PER_USER`` of them
(``Relay.start``), since they outlive their connections.

Several processes: a room lives in one process, and so do its streams; they end with it.
"""

from __future__ import annotations

import logging
import math
from array import array
from collections.abc import Awaitable
from itertools import accumulate
from typing import TYPE_CHECKING, Literal

import trio

from atlas.gateway.connection import Connection, DeltaBuffer
from atlas.protocol import CLOSE_TOO_SLOW, AgentDelta, AgentDone, RequestInfo, encode

if TYPE_CHECKING:
    from atlas.rooms import Room, RoomRegistry

log = logging.getLogger("atlas.gateway.streams")

Ended = Literal["done", "error"]


class Stream:
    """One agent request's output: to its one connection (``solo``), or, when resumable, to the
    connections of its room attached to it, with the text kept for replay."""

    __slots__ = (
        "id", "agent_id", "streaming", "scope", "room", "solo", "parts", "state", "attached",
        "cancelled", "final", "text", "ends", "ended_seq", "ended_at", "forgotten", "_buffer",
    )

    def __init__(
        self, request_id: str, agent_id: str, scope: trio.CancelScope, *, streaming: bool,
        solo: Connection | None = None, room: RoomStreams | None = None,
    ) -> None:
        assert (solo is None) != (room is None), "a stream has one connection or a room"
        self.id = request_id
        self.agent_id = agent_id
        self.streaming = streaming  # agent:stream (deltas), not agent:text (agent:done only)
        self.scope = scope
        self.room = room  # the room's streams when resumable
        self.solo = solo
        self.parts: list[str] = []  # the provider's text pieces while it runs
        self.state: Literal["running", "done", "error"] = "running"
        self.attached: dict[Connection, DeltaBuffer] = {}
        self.cancelled = False  # by agent:cancel, not by the grace running out
        self.final: AgentDone | str | None = None  # agent:done, or the agent:error frame
        self.text = ""  # once ended: the whole text...
        self.ends: array[int] | None = None  # ...and where each piece ends in it
        self.ended_seq = 0
        self.ended_at = math.inf
        self.forgotten = trio.Event() if room is not None else None
        self._buffer = DeltaBuffer(request_id) if solo is not None else None

    @property
    def resumable(self) -> bool:
        return self.room is not None

    @property
    def expired(self) -> bool:
        """Its grace ran out (or the server is shutting down): it is being cancelled, and
        forgotten as soon as its task ends."""
        scope = self.scope
        return self.state == "running" and not self.cancelled and (
            scope.cancel_called or trio.current_time() >= scope.deadline
        )

    @property
    def seq(self) -> int:
        return len(self.parts) if self.state == "running" else self.ended_seq

    # Sending, while it runs

    async def send(self, frame: str) -> None:
        """A frame for whoever receives the request now (``agent:start``)."""
        if self.solo is not None:
            await self.solo.send(frame)
            return
        for connection in list(self.attached):
            connection.send_nowait(frame)  # a connection too far behind is dropped

    def delta(self, text: str) -> Awaitable[None] | None:
        """One provider text piece: the hot path. Returns what the caller must await (a solo
        connection's ``send_delta``, which waits for room in its outbox), else None: a resumable
        request's deltas never wait, and cost no coroutine."""
        parts = self.parts
        parts.append(text)
        if self.solo is not None:
            if self.streaming:
                return self.solo.send_delta(self._buffer, text, len(parts))  # type: ignore[arg-type]
            return None
        room = self.room
        room.size += len(text)  # type: ignore[union-attr]
        if room.size > room.limit and room.ended:  # type: ignore[union-attr]
            room.trim()  # type: ignore[union-attr]
        if self.streaming and self.attached:
            seq = len(parts)
            lagging: list[Connection] = []
            for connection, buffer in self.attached.items():
                if not connection.send_delta_nowait(buffer, text, seq):
                    lagging.append(connection)
            if lagging:
                self._drop_lagging(lagging)  # closing detaches: not while looping over them
        return None

    def _drop_lagging(self, lagging: list[Connection]) -> None:
        for connection in lagging:
            log.warning("connection %s fell too far behind request %s; dropping it", connection.id, self.id)
            connection.close(CLOSE_TOO_SLOW, "too slow: the outgoing queue is full")

    # Connections of the room, for a resumable request

    def attach(self, connection: Connection) -> DeltaBuffer | None:
        """Send this running request's output to ``connection`` from now on (None: it has left)."""
        if connection.left:
            self._start_grace()
            return None
        buffer = self.attached[connection] = DeltaBuffer(self.id)
        connection.attached[self.id] = self
        self.scope.deadline = math.inf
        return buffer

    def detach(self, connection: Connection) -> None:
        """``connection`` left; the last one to leave starts the grace period."""
        connection.attached.pop(self.id, None)
        if self.attached.pop(connection, None) is not None and not self.attached:
            self._start_grace()

    def _start_grace(self) -> None:
        if self.state == "running" and self.room is not None:
            self.scope.deadline = trio.current_time() + self.room.grace

    async def resume(self, connection: Connection, after: int) -> None:
        """Catch ``connection`` up from piece ``after`` (at most ``seq``), then keep it attached
        while the request runs, or send it the final frame if it has ended. Called from the
        connection's own reader, so it may wait for room in its outbox."""
        seq = self.seq
        if self.state != "running":
            if self.streaming and after < seq:
                start = self.ends[after - 1] if after and self.ends is not None else 0
                await connection.send(encode(AgentDelta(self.id, self.text[start:], seq)))
            await connection.send(self.final_frame())
            return
        # Attached and caught up with no checkpoint in between: a piece that arrives while the
        # catch-up waits for room is added to the same buffer, after it.
        buffer = self.attach(connection)
        if buffer is not None and self.streaming and after < seq:
            await connection.send_catch_up(buffer, "".join(self.parts[after:]), seq)

    def cancel(self) -> None:
        """``agent:cancel`` from any connection of the room."""
        self.cancelled = True
        self.scope.cancel()

    # The end

    async def end(self, final: AgentDone | str, state: Ended) -> None:
        """Send the final frame (``agent:done`` or ``agent:error``) to whoever receives the
        request; a resumable request keeps it, with its text, for ``resume``."""
        if self.state != "running":
            return
        frame = final if isinstance(final, str) else encode(final)
        self.ended_seq = len(self.parts)
        if self.solo is not None:
            self.state = state
            await self.solo.send(frame)
            return
        self.text = final.text if isinstance(final, AgentDone) else "".join(self.parts)
        if self.streaming:
            self.ends = array("L", accumulate(map(len, self.parts)))
        self.parts = []
        self.final = final
        self.state = state
        self.ended_at = trio.current_time()
        attached, self.attached = self.attached, {}
        for connection in attached:
            connection.attached.pop(self.id, None)
            connection.send_nowait(frame)  # one too far behind is dropped, and may resume
        self.room.ended[self] = None  # type: ignore[union-attr]
        self.room.trim()  # type: ignore[union-attr]

    def final_frame(self) -> str:
        return self.final if isinstance(self.final, str) else encode(self.final)  # type: ignore[arg-type]

    def info(self) -> RequestInfo:
        return RequestInfo(self.id, self.agent_id, self.state, self.seq)


class RoomStreams:
    """A room's resumable requests, by id: running ones, and ended ones for ``grace`` seconds
    while their text fits in ``limit`` characters (running ones' text counting too)."""

    def __init__(self, *, grace: float, limit: int) -> None:
        self.grace = grace
        self.limit = limit
        self.by_id: dict[str, Stream] = {}
        self.ended: dict[Stream, None] = {}  # oldest ended first
        self.size = 0  # characters of reply text kept

    def add(self, stream: Stream) -> None:
        self.by_id[stream.id] = stream

    def get(self, request_id: str) -> Stream | None:
        stream = self.by_id.get(request_id)
        return None if stream is None or stream.expired else stream

    def running(self) -> int:
        return sum(1 for stream in self.by_id.values() if stream.state == "running")

    def trim(self) -> None:
        while self.size > self.limit and self.ended:
            self.forget(next(iter(self.ended)))

    def forget(self, stream: Stream) -> None:
        """The id is free again; a ``resume`` of it is ``unknown_request``."""
        assert stream.forgotten is not None
        if stream.forgotten.is_set():
            return
        stream.forgotten.set()
        if self.by_id.get(stream.id) is stream:
            del self.by_id[stream.id]
        self.size -= len(stream.text) if stream.state != "running" else sum(map(len, stream.parts))
        self.ended.pop(stream, None)
        for connection in list(stream.attached):
            stream.detach(connection)

    async def keep(self, stream: Stream) -> None:
        """Hold an ended request for ``grace`` seconds (less if the buffer needs the room)."""
        try:
            if stream.state != "running" and stream.forgotten is not None:
                with trio.move_on_at(stream.ended_at + self.grace):
                    await stream.forgotten.wait()
        finally:
            self.forget(stream)

    def requests(self) -> list[RequestInfo]:
        return [stream.info() for stream in self.by_id.values() if not stream.expired]

    def close(self) -> None:
        """The server is shutting down: running requests are cancelled, nothing is kept."""
        for stream in list(self.by_id.values()):
            if stream.state == "running":
                stream.scope.cancel()
            else:
                self.forget(stream)


def streams_of(room: Room, *, grace: float, limit: int) -> RoomStreams:
    if room.streams is None:
        room.streams = RoomStreams(grace=grace, limit=limit)
    return room.streams


def close_all(rooms: RoomRegistry) -> None:
    """At shutdown: no resumable request outlives the process (its clients reconnect elsewhere)."""
    for room in list(rooms.rooms.values()):
        if room.streams is not None:
            room.streams.close()
