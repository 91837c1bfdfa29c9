"""One long-lived thread for a stream of short blocking calls: the JSON store's reads, and the
usage ledger's writes (a settlement per request).

``trio.to_thread.run_sync`` hands each call to a thread of its pool and back. Once the event
loop is busy, that costs more CPU than the call: every thread that wants the GIL back makes the
busy loop give it up, and several threads of a pool do so at once. Here one thread waits on a
plain queue and runs the calls in order, handing results back with ``run_sync_soon`` as soon as
nothing else is queued (or every ``REPORT_EVERY`` calls); calls that queue up while one runs are
taken without waking the thread again.
One thread, not a pool: calls this short gain less from running side by side than they lose to
contention for the GIL (the ledger spreads its users over a few, so that disk syncs of different
users still overlap).

Measured with ``python -m bench.request_cost`` (20 clients, 1-delta requests, 2-core machine),
server CPU per request: 1.75 ms with a ``to_thread`` hop per usage settlement and per read,
1.15 ms with these threads and the usage log kept open (``json_store``); 0.84 ms with no durable
usage write at all. With a new user per request (a token check, a room and a usage ledger to
load): 5.46 -> 4.12 ms.

A call is never abandoned: the caller waits for it (shielded, as ``to_thread`` without
``abandon_on_cancel`` does) so that what the caller knows of the store is what the store holds.
The thread ends after ``IDLE_SECONDS`` without work and starts again with the next call, so an
idle server, or a test that is done with its store, keeps no thread.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import outcome
import trio

T = TypeVar("T")

IDLE_SECONDS = 5.0
REPORT_EVERY = 8

_Job = tuple[trio.lowlevel.TrioToken, trio.Event, list[outcome.Outcome[Any]], Callable[..., Any], tuple[Any, ...]]


class SerialThread:
    def __init__(self, name: str, *, idle_seconds: float = IDLE_SECONDS) -> None:
        self._name = name
        self._idle_seconds = idle_seconds
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._lock = threading.Lock()  # guards the start and the end of the thread
        self._running = False
        self._finished: list[tuple[trio.lowlevel.TrioToken, trio.Event, list[Any], Any]] = []

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the thread, after every call queued before it; its result or error."""
        done = trio.Event()
        box: list[outcome.Outcome[T]] = []
        with self._lock:
            self._jobs.put((trio.lowlevel.current_trio_token(), done, box, fn, args))
            if not self._running:
                thread = threading.Thread(target=self._serve, name=self._name, daemon=True)
                try:
                    thread.start()
                except BaseException:
                    # No thread, none running: the queue holds this call alone. Nothing is
                    # left behind for a later thread to run after this caller gave up.
                    self._jobs.get_nowait()
                    raise
                self._running = True
        with trio.CancelScope(shield=True):
            await done.wait()
        return box[0].unwrap()

    def _serve(self) -> None:
        try:
            self._serve_until_idle()
        except BaseException as exc:
            # Not a call's failure (``outcome.capture`` keeps those): the thread itself broke.
            # Whoever waits is told, or would wait forever; the next call starts a new thread.
            with self._lock:
                self._running = False
                finished, self._finished = self._finished, []
                try:
                    _report_soon(finished)  # calls that ran: their results
                except BaseException:
                    pass
                while True:
                    try:
                        token, done, box, _, _ = self._jobs.get_nowait()
                    except queue.Empty:
                        break
                    _report_soon([(token, done, box, outcome.Error(
                        RuntimeError(f"{self._name}: the thread ended ({exc!r})")
                    ))])
            raise

    def _serve_until_idle(self) -> None:
        jobs = self._jobs
        finished = self._finished  # results not handed back yet
        while True:
            try:
                token, done, box, fn, args = jobs.get(timeout=self._idle_seconds)
            except queue.Empty:
                with self._lock:
                    if jobs.empty():  # nothing was queued since: ``run`` starts a new thread
                        self._running = False
                        return
                continue
            finished.append((token, done, box, outcome.capture(fn, *args)))
            # Results go back once nothing else is queued, or every REPORT_EVERY calls: a
            # hand-back costs the thread a system call holding the GIL, and a caller waits for
            # at most that many calls queued behind its own.
            if jobs.empty() or len(finished) >= REPORT_EVERY:
                _report_soon(finished)
                finished = self._finished = []


def _report_soon(finished: list[tuple[trio.lowlevel.TrioToken, trio.Event, list[Any], Any]]) -> None:
    by_loop: dict[trio.lowlevel.TrioToken, list[tuple[trio.Event, list[Any], Any]]] = {}
    for token, done, box, result in finished:
        by_loop.setdefault(token, []).append((done, box, result))
    for token, results in by_loop.items():
        try:
            token.run_sync_soon(_report, results)
        except trio.RunFinishedError:
            pass  # that event loop is gone, and no one waits there any more


def _report(results: list[tuple[trio.Event, list[Any], Any]]) -> None:
    for done, box, result in results:
        box.append(result)
        done.set()
