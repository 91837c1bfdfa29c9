"""The store's serial thread (atlas/store/serial_thread.py): calls run in order, one at a time,
results and errors come back to their caller, a cancelled caller still waits for its call, and
the thread is gone once idle."""

from __future__ import annotations

import threading
import time

import pytest
import trio

from atlas.store.serial_thread import SerialThread


def _threads_named(name: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == name]


async def test_calls_run_in_order_on_one_thread_and_return_their_results():
    serial = SerialThread("test serial order")
    seen: list[tuple[int, int]] = []

    def call(n: int) -> int:
        seen.append((n, threading.get_ident()))
        time.sleep(0.001)
        return n * n

    results: dict[int, int] = {}

    async def one(n: int) -> None:
        results[n] = await serial.run(call, n)

    async with trio.open_nursery() as nursery:
        for n in range(20):
            nursery.start_soon(one, n)
            await trio.lowlevel.checkpoint()  # queued in this order
    assert results == {n: n * n for n in range(20)}
    assert [n for n, _ in seen] == list(range(20))
    assert len({ident for _, ident in seen}) == 1 and seen[0][1] != threading.get_ident()


async def test_an_error_reaches_its_caller_and_the_thread_goes_on():
    serial = SerialThread("test serial errors")

    def fail() -> None:
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        await serial.run(fail)
    assert await serial.run(lambda: "still here") == "still here"


async def test_a_cancelled_caller_waits_for_its_call_to_finish():
    serial = SerialThread("test serial cancel")
    started, finished = threading.Event(), threading.Event()

    def slow_write() -> None:
        started.set()
        time.sleep(0.2)
        finished.set()

    with trio.move_on_after(0.05) as scope:
        await serial.run(slow_write)
    # The deadline passed during the call, yet the caller came back only after it: what the
    # caller believes of the store is what the store holds.
    assert started.is_set() and finished.is_set()
    await trio.lowlevel.checkpoint()
    assert scope.cancel_called


async def test_the_thread_ends_when_idle_and_starts_again_with_the_next_call():
    name = "test serial idle"
    serial = SerialThread(name, idle_seconds=0.05)
    assert await serial.run(lambda: 1) == 1
    assert len(_threads_named(name)) == 1
    for _ in range(100):
        if not _threads_named(name):
            break
        await trio.sleep(0.01)
    assert not _threads_named(name)
    assert await serial.run(lambda: 2) == 2  # a new thread
    assert len(_threads_named(name)) == 1


def test_one_serial_thread_serves_successive_event_loops():
    serial = SerialThread("test serial loops")
    assert trio.run(serial.run, lambda: "first") == "first"
    assert trio.run(serial.run, lambda: "second") == "second"


async def test_a_thread_that_cannot_start_fails_its_call_and_leaves_nothing_queued(monkeypatch):
    serial = SerialThread("test serial start")
    ran: list[int] = []
    start = threading.Thread.start

    def cannot_start(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", cannot_start)
    with pytest.raises(RuntimeError, match="can't start new thread"):
        await serial.run(ran.append, 1)
    monkeypatch.setattr(threading.Thread, "start", start)
    assert await serial.run(lambda: "next") == "next"  # a thread now, and not a stale call first
    assert ran == []
