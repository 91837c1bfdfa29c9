"""Stand-in for ``atlas.http_server.serve_asgi`` while that one cannot start.

``serve_asgi`` as committed hands ``nursery.start`` a function whose status parameter is not
named ``task_status``, so every call fails with a TypeError. This is the same function with that
fixed, built from the same ``hypercorn_config`` and ``local_url``. Once ``http_server`` is fixed,
import ``serve_asgi`` from there and delete this module.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio
from hypercorn.trio import serve

from .config import Bind
from .http_server import ASGIApp, hypercorn_config, local_url


async def serve_asgi(
    app: ASGIApp,
    bind: Bind,
    *,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    max_message_bytes: int = 1024 * 1024,
    graceful_seconds: float = 5.0,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` until ``shutdown_trigger`` returns or the caller is cancelled. Reports the
    local base URL (``http://host:port``, the real port when ``bind.port`` is 0) once listening."""
    config = hypercorn_config(
        bind, max_message_bytes=max_message_bytes, graceful_seconds=graceful_seconds
    )

    async def run(task_status: trio.TaskStatus[list[str]]) -> None:
        await serve(app, config, shutdown_trigger=shutdown_trigger, task_status=task_status)  # type: ignore[arg-type]

    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(run)
        task_status.started(local_url(binds[0]))
