"""The one backoff rule: provider retries and client reconnects both wait by it."""

from __future__ import annotations

import random


def backoff_delay(attempt: int, *, first: float, factor: float, cap: float) -> float:
    """Seconds to wait before retry ``attempt`` (0-based): ``first`` grown by ``factor`` per
    attempt up to ``cap``, then a random point in its upper half, so that many clients that failed
    together (a restart, a provider hiccup) do not all come back at the same instant."""
    ceiling = min(cap, first * factor**attempt)
    return random.uniform(ceiling / 2, ceiling)
