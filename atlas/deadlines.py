"""Deadlines of socket operations kept by one task, not by a cancel scope per operation.

A trio cancel scope with a deadline costs two context managers and a deadline registration: at a
few reads or writes per streamed delta that was a measured share of Atlas's CPU (~7% for the
provider's reads, ~7 us a frame for the WebSocket writes). Where the operation can be ended from
outside instead, one ``DeadlineWatch`` per owner (a provider transport, a listener) does it: the
operation sets ``deadline`` (trio time; ``math.inf`` when none runs) on its item, and the
watch's task, waking every ``tick`` while anything is watched, ends each overdue one by
``notify_closing`` on its socket: the operation raises ``ClosedResourceError`` (or the
``BrokenResourceError`` of a TLS layer), which its owner turns into its timeout. A deadline fires
up to ``tick`` late. The task is a trio system task (the owners have no nursery of their own): it
parks while nothing is watched and ends when the watch is closed.
"""

from __future__ import annotations

import logging
from typing import Protocol

import trio

log = logging.getLogger("atlas.deadlines")


class Timed(Protocol):
    deadline: float  # trio time the operation in progress must end by; math.inf: none runs
    timed_out: bool  # set by the watch when it ended the operation

    @property
    def socket(self) -> trio.socket.SocketType: ...


def socket_of(stream: trio.abc.Stream) -> trio.socket.SocketType:
    """The socket under a trio stream (and under any TLS layers on it)."""
    while isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    return stream.socket  # type: ignore[attr-defined, no-any-return]


class DeadlineWatch:
    def __init__(self, tick: float, name: str) -> None:
        self.tick = tick
        self.name = name
        self.watched: set[Timed] = set()
        self._wake = trio.Event()
        self._running = False
        self._closed = False

    def watch(self, item: Timed) -> None:
        item.timed_out = False
        self.watched.add(item)
        if not self._running and not self._closed:
            self._running = True
            trio.lowlevel.spawn_system_task(self._serve, name=self.name)
        self._wake.set()

    def unwatch(self, item: Timed) -> None:
        self.watched.discard(item)

    def close(self) -> None:
        self._closed = True
        self._wake.set()

    async def _serve(self) -> None:
        try:
            while not self._closed:
                if not self.watched:
                    self._wake = trio.Event()
                    await self._wake.wait()
                    continue
                await trio.sleep(self.tick)
                now = trio.current_time()
                for item in [item for item in self.watched if item.deadline <= now]:
                    item.timed_out = True
                    self.watched.discard(item)
                    try:
                        trio.lowlevel.notify_closing(item.socket)
                    except (OSError, ValueError):
                        pass  # closed meanwhile: no operation to end
        except Exception:  # a system task's exception would end the whole process
            log.exception("%s failed; operations now wait without a timeout", self.name)
        finally:
            self._running = False
