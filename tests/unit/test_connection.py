"""A connection's outgoing side (atlas/gateway/connection.py): the bounded outbox, the writer
task, coalesced deltas and the two ways of closing. No socket: the writer writes into a list.
Every test is ``@bounded``: a send or a writer that waits when it should not fails the test."""

from __future__ import annotations

import json
import logging

import trio
import trio.testing

from atlas.gateway.connection import OUTBOX_SIZE, PENDING_LIMIT, Connection, DeltaBuffer
from atlas.protocol import CLOSE_TOO_SLOW

from .deadline import bounded


class Socket:
    """What the writer writes to: a list of frames, and a gate that can hold the writer."""

    def __init__(self) -> None:
        self.frames: list[str] = []
        self.gate: trio.Event | None = None

    async def write(self, frame: str) -> None:
        if self.gate is not None:
            await self.gate.wait()
        self.frames.append(frame)
        await trio.lowlevel.checkpoint()

    def decoded(self) -> list[object]:
        return [json.loads(frame) for frame in self.frames]


class Closes:
    """The connection's on_close callback, counted."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1


def delta(request_id: str, text: str, seq: int) -> dict[str, object]:
    return {"type": "agent:delta", "id": request_id, "text": text, "seq": seq}


@bounded
async def test_the_writer_writes_everything_queued_in_order_then_ends_when_closed(autojump_clock):
    connection, socket = Connection("c1"), Socket()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(connection.serve_writer, socket.write)
        for n in range(5):
            await connection.send(f"frame {n}")
        await trio.testing.wait_all_tasks_blocked()
        assert socket.frames == [f"frame {n}" for n in range(5)]
        connection.close_after_pending(1000, "bye")
        # serve_writer returns by itself; the nursery would hang otherwise.
    assert connection.close_code == 1000 and connection.close_reason == "bye"


@bounded
async def test_send_waits_for_room_when_the_outbox_is_full(autojump_clock):
    connection, socket = Connection("c1"), Socket()
    for n in range(OUTBOX_SIZE):
        await connection.send(f"frame {n}")  # no writer yet: these fill the outbox
    sent_last = trio.Event()

    async def send_one_more() -> None:
        await connection.send("one more")
        sent_last.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send_one_more)
        await trio.testing.wait_all_tasks_blocked()
        assert not sent_last.is_set()  # waiting for room, not dropped, not queued past the bound
        socket.gate = trio.Event()  # the writer takes one frame, then blocks on the socket
        nursery.start_soon(connection.serve_writer, socket.write)
        await trio.testing.wait_all_tasks_blocked()
        assert sent_last.is_set()
        assert connection.close_code is None  # a slow reader of its own replies is not dropped
        socket.gate.set()
        await trio.testing.wait_all_tasks_blocked()
        connection.close_after_pending(1000)
    assert socket.frames == [f"frame {n}" for n in range(OUTBOX_SIZE)] + ["one more"]


@bounded
async def test_send_nowait_drops_a_peer_that_fell_behind_with_1008(autojump_clock, caplog):
    connection, closes = Connection("slow"), Closes()
    with trio.CancelScope() as scope:
        connection.bind(scope, closes)
        assert all(connection.send_nowait(f"frame {n}") for n in range(OUTBOX_SIZE))
        assert connection.close_code is None and closes.calls == 0
        with caplog.at_level(logging.WARNING, logger="atlas.gateway.connection"):
            assert connection.send_nowait("one too many") is False
            assert connection.send_nowait("and another") is False
        assert (connection.close_code, connection.close_reason) == (
            CLOSE_TOO_SLOW, "too slow: the outgoing queue is full"
        )
        assert scope.cancel_called  # the connection's task is told to end
        assert closes.calls >= 1  # it left its room at once
        warnings = [r.getMessage() for r in caplog.records if "fell too far behind" in r.getMessage()]
        assert warnings == ["connection slow fell too far behind; dropping it"]  # logged once


@bounded
async def test_what_was_queued_before_the_drop_is_not_written(autojump_clock):
    connection, socket = Connection("slow"), Socket()
    for n in range(OUTBOX_SIZE):
        connection.send_nowait(f"frame {n}")
    connection.send_nowait("overflow")
    assert connection.close_code == CLOSE_TOO_SLOW
    with trio.CancelScope() as scope:
        connection.bind(scope, lambda: None)
        connection.close(CLOSE_TOO_SLOW)  # the endpoint's own close cancels the writer's scope
        await connection.serve_writer(socket.write)
    assert scope.cancelled_caught
    assert socket.frames == []


@bounded
async def test_deltas_of_one_request_coalesce_while_the_writer_is_behind(autojump_clock):
    connection, socket = Connection("c1"), Socket()
    buffer = DeltaBuffer("r1")
    await connection.send("before")
    for seq, text in enumerate(["Hel", "lo", ", "], 1):
        await connection.send_delta(buffer, text, seq)
    await connection.send("between")
    await connection.send_delta(buffer, "world", 4)  # joins the buffer already queued ahead of "between"
    async with trio.open_nursery() as nursery:
        nursery.start_soon(connection.serve_writer, socket.write)
        await trio.testing.wait_all_tasks_blocked()
        assert socket.frames[0] == "before"
        assert json.loads(socket.frames[1]) == delta("r1", "Hello, world", 4)  # seq: the last piece in it
        assert socket.frames[2:] == ["between"]
        # Once written, the buffer queues again for the next text.
        await connection.send_delta(buffer, "!", 5)
        await trio.testing.wait_all_tasks_blocked()
        connection.close_after_pending(1000)
    assert json.loads(socket.frames[3]) == delta("r1", "!", 5)
    assert len(socket.frames) == 4


@bounded
async def test_deltas_of_two_requests_stay_apart(autojump_clock):
    connection, socket = Connection("c1"), Socket()
    one, two = DeltaBuffer("r1"), DeltaBuffer("r2")
    await connection.send_delta(one, "a", 1)
    await connection.send_delta(two, "x", 1)
    await connection.send_delta(one, "b", 2)
    connection.close_after_pending(1000)
    await connection.serve_writer(socket.write)
    assert socket.decoded() == [delta("r1", "ab", 2), delta("r2", "x", 1)]


@bounded
async def test_a_delta_waits_for_room_like_send(autojump_clock):
    connection, socket = Connection("c1"), Socket()
    for n in range(OUTBOX_SIZE):
        await connection.send(f"frame {n}")
    buffer = DeltaBuffer("r1")
    queued = trio.Event()

    async def stream() -> None:
        await connection.send_delta(buffer, "a", 1)
        queued.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(stream)
        await trio.testing.wait_all_tasks_blocked()
        assert not queued.is_set() and connection.close_code is None
        # More text for the same request while it waits: no second queue entry, no wait.
        await connection.send_delta(buffer, "b", 2)
        nursery.start_soon(connection.serve_writer, socket.write)
        await trio.testing.wait_all_tasks_blocked()
        assert queued.is_set()
        connection.close_after_pending(1000)
    assert json.loads(socket.frames[-1]) == delta("r1", "ab", 2)
    assert len(socket.frames) == OUTBOX_SIZE + 1


@bounded
async def test_close_after_pending_drains_the_outbox_then_the_writer_ends(autojump_clock):
    connection, socket, closes = Connection("c1"), Socket(), Closes()
    with trio.CancelScope() as scope:
        connection.bind(scope, closes)
        await connection.send('{"type": "error"}')
        await connection.send_delta(DeltaBuffer("r1"), "last words", 1)
        connection.close_after_pending(4001, "this user was removed")
        assert closes.calls == 1  # out of the room at once, before the writer has drained
        await connection.send("too late")  # refused quietly: nothing is queued after the close
        assert connection.send_nowait("too late") is False
        await connection.serve_writer(socket.write)
    assert not scope.cancel_called  # nothing was cut short
    assert socket.frames[0] == '{"type": "error"}'
    assert socket.decoded()[1:] == [delta("r1", "last words", 1)]
    assert (connection.close_code, connection.close_reason) == (4001, "this user was removed")


@bounded
async def test_close_ends_the_writer_at_once_and_keeps_the_first_code(autojump_clock):
    connection, socket, closes = Connection("c1"), Socket(), Closes()
    socket.gate = trio.Event()  # a client that stopped reading: the write never returns
    async with trio.open_nursery() as nursery:
        connection.bind(nursery.cancel_scope, closes)
        nursery.start_soon(connection.serve_writer, socket.write)
        await connection.send("stuck")
        await connection.send("never written")
        await trio.testing.wait_all_tasks_blocked()
        connection.close(1001, "going away")
        connection.close(1000, "later")
    assert socket.frames == []
    assert (connection.close_code, connection.close_reason) == (1001, "going away")
    assert closes.calls == 2  # on_close runs each time; a room's detach is idempotent


@bounded
async def test_finish_cancels_the_connections_requests(autojump_clock):
    connection = Connection("c1")
    cancelled = []

    async def request(request_id: str, task_status=trio.TASK_STATUS_IGNORED) -> None:
        with trio.CancelScope() as scope:
            connection.requests[request_id] = scope
            task_status.started()
            await trio.sleep_forever()
        cancelled.append(request_id)

    async with trio.open_nursery() as nursery:
        await nursery.start(request, "r1")
        await nursery.start(request, "r2")
        connection.finish()
    assert sorted(cancelled) == ["r1", "r2"]
    assert connection.send_nowait("after the end") is False


@bounded
async def test_sending_to_a_finished_connection_neither_fails_nor_blocks(autojump_clock):
    connection = Connection("c1")
    connection.finish()
    with trio.fail_after(1):
        await connection.send("x")
        await connection.send_delta(DeltaBuffer("r1"), "y", 1)
    assert connection.send_nowait("z") is False
    assert connection.close_code is None  # a finished connection is not a slow one



@bounded
async def test_a_shared_delta_never_waits_and_says_when_the_outbox_is_full(autojump_clock):
    connection = Connection("c1")
    buffer = DeltaBuffer("r1")
    assert connection.send_delta_nowait(buffer, "a", 1)
    assert connection.send_delta_nowait(buffer, "b", 2)  # joins the queued buffer
    full = Connection("c2")
    for n in range(OUTBOX_SIZE):
        full.send_nowait(f"frame {n}")
    assert full.send_delta_nowait(DeltaBuffer("r1"), "a", 1) is False
    assert full.close_code is None  # the caller drops it, once it is done with its loop
    assert json.loads(connection._outbox_receive.receive_nowait().take_frame()) == delta("r1", "ab", 2)


class Attached:
    def __init__(self) -> None:
        self.detached: list[Connection] = []

    def detach(self, connection: Connection) -> None:
        self.detached.append(connection)


@bounded
async def test_a_connection_that_ends_leaves_the_requests_it_receives(autojump_clock):
    for end in (lambda c: c.close(1000), lambda c: c.close_after_pending(4001), lambda c: c.finish()):
        connection, request = Connection("c1"), Attached()
        connection.attached["r1"] = request
        end(connection)
        end(connection)
        assert request.detached == [connection] and connection.attached == {} and connection.left


@bounded
async def test_a_request_waits_once_its_unwritten_text_is_over_the_bound(autojump_clock):
    """Backpressure: past PENDING_LIMIT characters the relay waits (and stops reading the
    provider) until the writer has taken the text; the buffer never holds much more."""
    connection, socket = Connection("c1"), Socket()
    buffer = DeltaBuffer("r")
    piece = "x" * 1000
    sent = 0

    async def relay() -> None:
        nonlocal sent
        for n in range(1, 201):  # 200 kB, three times the bound
            await connection.send_delta(buffer, piece, n)
            sent = n

    async with trio.open_nursery() as nursery:
        socket.gate = trio.Event()  # a client that does not read: the writer blocks...
        nursery.start_soon(connection.serve_writer, socket.write)
        await connection.send("start")  # ...on this frame, so the deltas queue behind it
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(relay)
        await trio.testing.wait_all_tasks_blocked()
        # The piece that took the buffer over the bound is in it, and its send_delta waits.
        assert sent == PENDING_LIMIT // len(piece) and buffer.size == (sent + 1) * len(piece)
        socket.gate.set()  # the client reads again: everything arrives, in order
        await trio.testing.wait_all_tasks_blocked()
        assert sent == 200
        assert socket.frames[0] == "start"
        assert "".join(json.loads(f)["text"] for f in socket.frames[1:]) == piece * 200
        connection.close_after_pending(1000)


@bounded
async def test_a_request_waiting_on_a_connection_that_leaves_stops_waiting(autojump_clock):
    connection, socket = Connection("c1"), Socket()
    buffer = DeltaBuffer("r")
    finished = trio.Event()

    async def relay() -> None:
        for n in range(1, 101):  # 100 kB: more than the bound
            await connection.send_delta(buffer, "y" * 1000, n)
        finished.set()

    async with trio.open_nursery() as nursery:
        socket.gate = trio.Event()  # the client never reads again
        nursery.start_soon(connection.serve_writer, socket.write)
        await connection.send("start")  # the writer is stuck on it; the deltas queue
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(relay)
        await trio.testing.wait_all_tasks_blocked()
        assert not finished.is_set()
        held = buffer.size
        connection.close(CLOSE_TOO_SLOW)
        await trio.testing.wait_all_tasks_blocked()
        assert finished.is_set() and buffer.size == held  # nothing more kept for it
        socket.gate.set()  # (the endpoint's cancel scope would end the writer; here, the socket)


@bounded
async def test_a_resumable_delta_over_the_bound_asks_to_drop_the_connection(autojump_clock):
    connection = Connection("c1")  # no writer: the buffer is queued and never taken
    buffer = DeltaBuffer("r")
    results = [connection.send_delta_nowait(buffer, "z" * 1000, n) for n in range(1, 101)]
    first_refused = results.index(False)
    assert all(results[:first_refused]) and first_refused == PENDING_LIMIT // 1000


@bounded
async def test_a_delta_written_by_its_request_keeps_every_frame_in_order(autojump_clock):
    """send_delta writes straight to the socket when nothing waits to be written; whatever comes
    meanwhile queues behind that write, and the next delta queues behind it in turn."""
    connection, socket = Connection("c1"), Socket()
    a, b = DeltaBuffer("a"), DeltaBuffer("b")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(connection.serve_writer, socket.write)
        await trio.testing.wait_all_tasks_blocked()
        socket.gate = trio.Event()  # the first write blocks
        nursery.start_soon(connection.send_delta, a, "a1", 1)
        await trio.testing.wait_all_tasks_blocked()
        await connection.send('"other"')  # queued behind the request's own write
        await connection.send_delta(b, "b1", 1)  # queued too: something waits
        await trio.testing.wait_all_tasks_blocked()
        assert socket.frames == []
        socket.gate.set()
        await trio.testing.wait_all_tasks_blocked()
        await connection.send_delta(a, "a2", 2)  # nothing waits again: written at once
        assert json.loads(socket.frames[-1]) == delta("a", "a2", 2)
        connection.close_after_pending(1000)
    assert socket.decoded() == [delta("a", "a1", 1), "other", delta("b", "b1", 1), delta("a", "a2", 2)]


@bounded
async def test_a_frame_sent_while_nothing_waits_is_written_by_its_sender(autojump_clock):
    """send, like send_delta, writes straight to the socket when nothing waits to be written
    (agent:start and agent:done, pongs: no hop through the writer task); a frame sent while that
    write is in progress queues behind it, and a resumed request's catch-up text is queued as
    its buffer, never written as one."""
    connection, socket = Connection("c1"), Socket()
    caught_up = DeltaBuffer("r")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(connection.serve_writer, socket.write)
        await trio.testing.wait_all_tasks_blocked()
        await connection.send('"first"')
        assert socket.frames == ['"first"']  # written before send returned: by the sender
        socket.gate = trio.Event()
        nursery.start_soon(connection.send, '"held"')
        await trio.testing.wait_all_tasks_blocked()
        await connection.send('"behind"')  # a write is in progress: queued
        await connection.send_catch_up(caught_up, "so far", 2)
        await trio.testing.wait_all_tasks_blocked()
        assert socket.frames == ['"first"']
        socket.gate.set()
        await trio.testing.wait_all_tasks_blocked()
        connection.close_after_pending(1000)
    assert socket.decoded() == ["first", "held", "behind", delta("r", "so far", 2)]
