"""How a server command (``atlas serve``, ``atlas agent``) lives and ends: one policy for both.

It prints one line saying where it listens, then serves until SIGINT or SIGTERM. The first
signal starts a graceful shutdown (the server drains within its grace period); a second one, or
a shutdown still running ``HARD_EXIT_AFTER`` seconds past that grace period, ends the process at
once. Leaving hard is safe: every write Atlas has acknowledged is already on disk.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable

import trio

from atlas.config import Bind

log = logging.getLogger("atlas.lifecycle")

HARD_EXIT_AFTER = 5.0
# The cyclic garbage collector, tuned for a server (as Instagram's and others' are): a process that
# streams allocates a few short-lived containers per delta, and CPython's default first threshold
# (700) ran a collection every few hundred deltas; the full collections that followed scanned
# every module, class and function imported at start-up: 50-100 ms pauses, measured at 200 streams,
# which showed as clusters of late deltas. Start-up objects are frozen once the server listens
# (``gc.freeze``: never scanned again), and young collections run ~3 times less often. Not more
# rarely: with a first threshold of 10,000 the garbage of a reconnect wave (2,000 clients) lived
# long enough to grow the process by ~27 MiB from one wave to the next (1-3 MiB at 2,000 and 700;
# tests/reliability/test_reconnect_storm.py, long run).
GC_THRESHOLDS = (2_000, 10, 10)

# serve(shutdown=, task_status=): serves until ``shutdown`` is set, reporting its URL once listening.
Serve = Callable[..., Awaitable[None]]


def listening_line(bind: Bind, url: str, name: str = "Atlas") -> str:
    """The one line saying where a server listens: a URL to use first (scripts take the first
    word after "listening on"), and what the socket is bound to when that differs."""
    line = f"{name} listening on {url}"
    if bind.host in ("0.0.0.0", "::", ""):
        port = url.rsplit(":", 1)[1]
        line += f" (bound to {Bind(bind.host, int(port))}: every interface)"
    return line


async def run_until_signal(serve: Serve, *, name: str, bind: Bind, grace_seconds: float) -> None:
    shutdown = trio.Event()
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def watch_signals() -> None:
                async for signum in signals:
                    signal_name = signal.Signals(signum).name
                    if shutdown.is_set():
                        log.warning("second %s: stopping now", signal_name)
                        exit_now()
                    log.info("%s received: shutting down gracefully (up to %.0f s)", signal_name, grace_seconds)
                    shutdown.set()
                    nursery.start_soon(exit_if_stuck, grace_seconds + HARD_EXIT_AFTER)

            async def serve_then_stop(task_status: trio.TaskStatus[str]) -> None:
                await serve(shutdown=shutdown, task_status=task_status)
                nursery.cancel_scope.cancel()  # served and shut down: stop watching signals

            nursery.start_soon(watch_signals)
            url = await nursery.start(serve_then_stop)
            tune_gc()
            print(listening_line(bind, url, name), file=sys.stderr, flush=True)


def tune_gc() -> None:
    """Once the server is up: what start-up made lives as long as the process (see GC_THRESHOLDS)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


async def exit_if_stuck(seconds: float) -> None:
    """Last resort: Hypercorn shields its socket writes from cancellation, so a client that
    stopped reading can hold a connection past the grace period."""
    await trio.sleep(seconds)
    log.error("shutdown did not finish within %.0f s; exiting now", seconds)
    exit_now()


def exit_now() -> None:
    logging.shutdown()
    os._exit(1)
