"""``@bounded``: a test that would wait forever fails at once instead.

The test must take ``autojump_clock``: once every task is blocked the clock jumps to the
deadline, so a hang (a writer that never ends, a send that never gets room) costs no real time.
Not for tests whose code under test runs in worker threads: the clock can jump while a thread
works, so a pending deadline there would fire early."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any

import trio

LIMIT = 3600.0  # trio seconds; far beyond any wait a test means to make


def bounded(test: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
    @functools.wraps(test)
    async def run(*args: Any, **kwargs: Any) -> None:
        assert "autojump_clock" in kwargs, f"{test.__name__} needs the autojump_clock fixture"
        with trio.fail_after(LIMIT):
            await test(*args, **kwargs)

    return run
