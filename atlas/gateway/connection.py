"""One WebSocket connection's outgoing side: a bounded outbox and the task that writes it.

Everything sent to a client goes through its outbox, so a slow client never blocks anyone else:

- replies to the client's own messages wait for room in the outbox (``send``): a client that
  does not read slows only itself;
- frames from others (broadcasts) never wait (``send_nowait``): a peer whose outbox is full has
  fallen too far behind and is dropped;
- agent deltas are coalesced (``send_delta``): a request queues at most one pending-text buffer,
  the writer takes whatever text has piled up when it gets to it, so a client that reads slower
  than the provider writes gets fewer, larger deltas. A delta's ``seq`` is that of the last piece
  it includes. Once a buffer holds more than ``PENDING_LIMIT`` characters, ``send_delta`` waits
  until the writer has taken it: the relay stops reading the provider, and TCP pushes back on
  the provider. A client that stops reading costs at most that per request, plus the frame being
  written;
- deltas of a resumable request, which several connections may receive at once, never wait
  (``send_delta_nowait``): a connection whose outbox is full, or whose buffer for the request is
  over ``PENDING_LIMIT``, is dropped, as a broadcast peer is, and may resume.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import trio

from atlas.protocol import CLOSE_TOO_SLOW, AgentDelta, encode

log = logging.getLogger("atlas.gateway.connection")

OUTBOX_SIZE = 256
# Unwritten reply text per request and connection, in characters, before the relay waits (or, for
# a resumable request, drops the connection): a few of the provider's socket reads, so a client
# that keeps up never waits, and one that stops reading holds this much, not its whole reply.
PENDING_LIMIT = 64 * 1024


class DeltaBuffer:
    """Text of one agent request that is waiting to be written, as one ``agent:delta``."""

    __slots__ = ("request_id", "parts", "size", "queued", "seq", "taken")

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.parts: list[str] = []
        self.size = 0  # characters in ``parts``
        self.queued = False
        self.seq = 0  # the request's seq after the last piece in ``parts``
        self.taken: trio.Event | None = None  # set when the writer takes ``parts``: room again

    def take_frame(self) -> str | None:
        self.queued = False
        if self.taken is not None:
            self.taken.set()
            self.taken = None
        if not self.parts:
            return None
        text = self.parts[0] if len(self.parts) == 1 else "".join(self.parts)
        self.parts = []
        self.size = 0
        return encode(AgentDelta(self.request_id, text, self.seq))

    def release(self) -> None:
        """The connection is gone: nobody waits for its writer any more."""
        if self.taken is not None:
            self.taken.set()
            self.taken = None


class Attachment(Protocol):
    """A resumable request this connection receives (``atlas.gateway.streams.Stream``)."""

    def detach(self, connection: Connection) -> None: ...


class Connection:
    def __init__(self, connection_id: str, *, token: str | None = None) -> None:
        self.id = connection_id
        self.token = token  # checked again before each message
        self.auth_unavailable = False  # the last check could not reach the auth API
        self.requests: dict[str, trio.CancelScope] = {}  # its requests that end with it
        self.attached: dict[str, Attachment] = {}  # resumable requests it receives, by id
        self.left = False  # closed or finished: it receives nothing more
        self.close_code: int | None = None
        self.close_reason = ""
        self._outbox_send, self._outbox_receive = trio.open_memory_channel[Any](OUTBOX_SIZE)
        self._waiting: set[DeltaBuffer] = set()  # buffers a request waits on (``_wait_taken``)
        # Items put into the outbox, and items the writer has finished with: equal when nothing
        # waits to be written (``send_delta``'s direct write). A write in progress is one not
        # finished yet, and so is an item handed to a writer that has not run yet.
        self._puts = 0
        self._done = 0
        self._write: Callable[[str], Awaitable[None]] | None = None
        self._direct = False  # a request is writing its delta itself
        self._direct_done: trio.Event | None = None  # the writer waits on it
        self._cancel_scope: trio.CancelScope | None = None
        self._on_close: Callable[[], None] | None = None

    # Sending

    async def send(self, frame: str) -> None:
        if self.left:
            return  # the connection is gone; nothing to tell it
        if self._writer_idle():
            await self._write_now(frame)  # nothing waits to be written: no hop through the writer
            return
        await self._enqueue(frame)

    async def _enqueue(self, item: str | DeltaBuffer) -> None:
        """Into the outbox, waiting for room (a frame, or a request's pending text)."""
        self._puts += 1
        try:
            await self._outbox_send.send(item)
        except BaseException as exc:
            self._puts -= 1
            if not isinstance(exc, (trio.ClosedResourceError, trio.BrokenResourceError)):
                raise
            # the connection is gone; nothing to tell it

    def send_nowait(self, frame: str) -> bool:
        try:
            self._outbox_send.send_nowait(frame)
            self._puts += 1
            return True
        except trio.WouldBlock:
            if self.close_code is None:
                log.warning("connection %s fell too far behind; dropping it", self.id)
            self.close(CLOSE_TOO_SLOW, "too slow: the outgoing queue is full")
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass
        return False

    async def send_delta(self, buffer: DeltaBuffer, text: str, seq: int) -> None:
        if self.left:
            return  # nothing more is written: keeping the text would only grow the buffer
        if self._writer_idle():
            # The hot path of a client that keeps up: nothing waits to be written and no one is
            # writing, so the request writes its delta itself, without the hop through the
            # writer task (a task switch per delta). While it writes, everything else queues
            # behind it. A client that stops reading then holds up this request in its write
            # (up to the write timeout), as the bound below would anyway.
            await self._write_now(encode(AgentDelta(buffer.request_id, text, seq)))
            return
        buffer.parts.append(text)
        buffer.size += len(text)
        buffer.seq = seq
        if not buffer.queued:
            buffer.queued = True
            # Queue without a schedule point when there is room (the caller's next provider
            # read yields anyway); wait for room like ``send`` otherwise.
            try:
                self._outbox_send.send_nowait(buffer)  # type: ignore[arg-type]
                self._puts += 1
            except trio.WouldBlock:
                await self._enqueue(buffer)
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                pass
        if buffer.size > PENDING_LIMIT:
            await self._wait_taken(buffer)

    def _writer_idle(self) -> bool:
        """Nothing waits to be written and no one is writing: a frame may be written now, by
        whoever sends it (the writer task has started: ``_write`` is its write)."""
        return self._puts == self._done and not self._direct and self._write is not None

    async def _write_now(self, frame: str) -> None:
        """Write ``frame`` from the caller's task; frames queued meanwhile wait behind it."""
        self._direct = True
        try:
            await self._write(frame)  # type: ignore[misc]
        finally:
            self._direct = False
            if self._direct_done is not None:
                self._direct_done.set()
                self._direct_done = None

    async def _wait_taken(self, buffer: DeltaBuffer) -> None:
        """Backpressure: wait until the writer has taken ``buffer``'s text (or the connection
        is gone, and with it the need to keep its text)."""
        while buffer.size > PENDING_LIMIT and not self.left:
            if buffer.taken is None:
                buffer.taken = trio.Event()
                self._waiting.add(buffer)
            try:
                await buffer.taken.wait()  # type: ignore[union-attr]
            finally:
                self._waiting.discard(buffer)

    async def send_catch_up(self, buffer: DeltaBuffer, text: str, seq: int) -> None:
        """A resumed request's text so far, as the first delta of ``buffer``. Not counted against
        ``PENDING_LIMIT`` (the reply cap bounds it): only what arrives after it is."""
        buffer.parts.append(text)
        buffer.seq = seq
        if not buffer.queued:
            buffer.queued = True
            await self._enqueue(buffer)

    def send_delta_nowait(self, buffer: DeltaBuffer, text: str, seq: int) -> bool:
        """``send_delta`` for a request that others receive too: never waits. False when the
        outbox is full or the buffer is over ``PENDING_LIMIT``; the caller then drops this
        connection (``close``), once it is no longer looping over the request's connections."""
        buffer.parts.append(text)
        buffer.size += len(text)
        buffer.seq = seq
        if buffer.size > PENDING_LIMIT:
            return False
        if not buffer.queued:
            try:
                self._outbox_send.send_nowait(buffer)  # type: ignore[arg-type]
                self._puts += 1
            except trio.WouldBlock:
                return False
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                return True
            buffer.queued = True
        return True

    async def serve_writer(self, write: Callable[[str], Awaitable[None]]) -> None:
        """Write the outbox to the socket until the connection ends.

        Each wake-up writes everything queued by then. A send to a socket that is already gone
        returns without a checkpoint, but the writer cannot spin: draining stops once the outbox
        is empty (at most ``OUTBOX_SIZE`` frames, and nothing refills it without a schedule
        point), and every ``receive`` of the ``async for`` is a schedule point."""
        receive_nowait = self._outbox_receive.receive_nowait
        self._write = write
        async with self._outbox_receive:
            async for item in self._outbox_receive:
                if self._direct:  # a request is writing a delta itself: this comes after it
                    self._direct_done = done = trio.Event()
                    await done.wait()
                while True:
                    frame = item.take_frame() if isinstance(item, DeltaBuffer) else item
                    if frame is not None:
                        await write(frame)
                    self._done += 1
                    try:
                        item = receive_nowait()
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break

    # Closing

    def bind(self, cancel_scope: trio.CancelScope, on_close: Callable[[], None]) -> None:
        self._cancel_scope = cancel_scope
        self._on_close = on_close

    def close(self, code: int, reason: str = "") -> None:
        """End the connection with ``code``; the endpoint sends the close frame.

        The connection leaves its room at once (``on_close``), not when its task ends: Hypercorn
        shields its socket writes from cancellation, so a writer blocked on a client that stopped
        reading stays blocked until that client reads or its TCP connection dies. Meanwhile it
        is no longer anyone's peer and nothing more is queued for it."""
        if self.close_code is None:
            self.close_code = code
            self.close_reason = reason
        self._outbox_send.close()
        if self._cancel_scope is not None:
            self._cancel_scope.cancel()
        if self._on_close is not None:
            self._on_close()
        self._leave()

    def close_after_pending(self, code: int, reason: str = "") -> None:
        """End the connection with ``code`` once what is already queued has been written (an
        error frame before a 4xxx close, say): the writer drains the outbox and then ends."""
        if self.close_code is None:
            self.close_code = code
            self.close_reason = reason
        self._outbox_send.close()
        if self._on_close is not None:
            self._on_close()
        self._leave()

    def finish(self) -> None:
        self._outbox_send.close()
        self._leave()

    def _leave(self) -> None:
        """Its own requests are cancelled now, not when its task ends (a writer blocked on a
        client that stopped reading may hold that up to the write timeout, and the provider
        would be read meanwhile for nobody); resumable requests run on without it."""
        self.left = True
        for scope in self.requests.values():
            scope.cancel()
        if self._waiting:
            waiting, self._waiting = self._waiting, set()
            for buffer in waiting:
                buffer.release()
        if self.attached:
            attached, self.attached = self.attached, {}
            for request in attached.values():
                request.detach(self)
