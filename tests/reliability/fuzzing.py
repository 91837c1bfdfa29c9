"""Running hypothesis against a server that lives in the test's own trio loop.

hypothesis drives a plain function; the test awaits ``run_given(check)`` where ``check`` is the
``@given`` function: hypothesis runs in a worker thread, and each example is handed back to the
trio loop with ``trio.from_thread.run``, where it talks to the real in-process server. Quick runs
are derandomized (the same examples every time, so CI is deterministic); long runs are random.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import trio
from hypothesis import HealthCheck, settings
from probes import LONG, scaled

# Every error code a client may see (shared/CONTRACT.md, docs/protocol.md), except ``internal``:
# the server must never answer a client's input with an internal error.
CLIENT_ERROR_CODES = frozenset({
    "bad_json", "bad_message", "unknown_type", "unauthorized", "forbidden", "no_credentials",
    "unknown_agent", "provider_auth", "provider_rate_limited", "provider_error",
    "provider_unreachable", "provider_timeout", "cancelled", "too_many_requests", "too_large",
    "quota_exceeded", "rate_limited", "provider_not_allowed", "agent_unavailable",
    "auth_unavailable", "bad_room_id", "shutting_down", "unknown_request", "store_unavailable",
    "no_provider", "agent_secret_mismatch", "too_many_connections", "bad_request",
})


def fuzz_settings(quick_examples: int, long_examples: int) -> settings:
    return settings(
        max_examples=scaled(quick_examples, long_examples),
        deadline=None,
        derandomize=not LONG,
        database=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                               HealthCheck.large_base_example],
    )


def in_trio(example: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
    """A sync function (for ``@given``) that runs ``example`` in the test's trio loop."""

    def run(*args: Any, **kwargs: Any) -> Any:
        return trio.from_thread.run(lambda: example(*args, **kwargs))

    return run


async def run_given(check: Callable[[], None]) -> None:
    await trio.to_thread.run_sync(check)
