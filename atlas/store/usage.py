"""Usage arithmetic every ledger backend shares: UTC periods, resolved limits, the reservation
rule, and the report that ``usage:get``, ``GET /party/{id}/usage`` and ``atlas usage`` print.

Nothing here performs I/O, so a database backend can run the same rule inside its transaction
(or translate it into one conditional ``UPDATE``) and give the same answers as the embedded one.

The reservation rule (``plan``), for a request whose prompt is at most ``prompt`` tokens and whose
reply is capped at ``output`` tokens per choice:

- the *settled room* of a token limit is the limit minus the period's settled usage; the cap is
  lowered to what the smallest settled room allows after the prompt, and when not even one token
  per choice fits, the answer is ``OverQuota`` (the budget is spent: wait for the reset);
- the *live room* also subtracts the reservations of requests in flight; when the worst case
  (prompt + cap x choices) does not fit in it, the answer is ``Busy`` (wait for a settlement, or
  come back in a moment: the budget is not spent);
- otherwise ``Fits``: reserve prompt + cap x choices.

The request-count rule (``check_rates``), checked before the reservation: at most
``concurrentRequests`` in flight and ``requestsPerMinute`` admitted in the last 60 s, else
``TooMany`` (refused requests are not counted).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from msgspec import UNSET

from atlas.store.records import Limits, UsageDay, UsageRecord

LIMIT_NAMES = ("tokensPerDay", "tokensPerMonth", "requestsPerMinute", "concurrentRequests")
REPORT_DAYS = 31  # days in a usage report when no `since` is given: today and the 30 before


# Periods (UTC calendar days and months)


_last_day: tuple[int, str] = (-1, "")


def utc_day(now: float) -> str:
    """The UTC date of a POSIX time, ``YYYY-MM-DD`` (the last answer is kept: it is asked for on
    every admission, and changes once a day)."""
    global _last_day
    number = int(now // 86400)
    if number != _last_day[0]:
        _last_day = (number, datetime.fromtimestamp(number * 86400, UTC).strftime("%Y-%m-%d"))
    return _last_day[1]


def month_of(day: str) -> str:
    return day[:7]


def next_day_start(day: str) -> str:
    start = date.fromisoformat(day) + timedelta(days=1)
    return f"{start.isoformat()}T00:00:00Z"


def next_month_start(day: str) -> str:
    current = date.fromisoformat(day)
    year, month = (current.year + 1, 1) if current.month == 12 else (current.year, current.month + 1)
    return f"{year:04d}-{month:02d}-01T00:00:00Z"


def parse_day(text: str) -> str:
    """A ``YYYY-MM-DD`` date, checked; raises ValueError naming the problem."""
    try:
        return date.fromisoformat(text.strip()).isoformat()
    except ValueError:
        raise ValueError(f"{text!r} is not a date: use YYYY-MM-DD, for example 2025-01-31") from None


def days_before(day: str, days: int) -> str:
    return (date.fromisoformat(day) - timedelta(days=days)).isoformat()


# Limits


@dataclass(frozen=True)
class ResolvedLimits:
    """A user's limits after every source has spoken. ``None``: unlimited."""

    tokens_per_day: int | None = None
    tokens_per_month: int | None = None
    requests_per_minute: int | None = None
    concurrent_requests: int | None = None

    @property
    def limits_tokens(self) -> bool:
        return self.tokens_per_day is not None or self.tokens_per_month is not None

    @property
    def limits_anything(self) -> bool:
        return self.limits_tokens or self.requests_per_minute is not None \
            or self.concurrent_requests is not None

    def to_json(self) -> dict[str, int]:
        """The contract's ``limits`` object: absent = unlimited."""
        values = (self.tokens_per_day, self.tokens_per_month, self.requests_per_minute,
                  self.concurrent_requests)
        return {name: value for name, value in zip(LIMIT_NAMES, values) if value is not None}


UNLIMITED = ResolvedLimits()


def resolve_limits(*sources: Limits | None) -> ResolvedLimits:
    """Each source overrides the ones before it, field by field; an unset field inherits."""
    values: dict[str, int | None] = {}
    for source in sources:
        if source is None:
            continue
        for name in Limits.__struct_fields__:
            value = getattr(source, name)
            if value is not UNSET:
                values[name] = value
    return ResolvedLimits(**values)


# Reservations


@dataclass(frozen=True)
class Fits:
    reserve: int  # tokens to hold: prompt + cap x choices
    cap: int  # the output cap per choice to send to the provider


@dataclass(frozen=True)
class OverQuota:
    limit: str  # tokensPerDay or tokensPerMonth: the limit that refused
    value: int
    used: int
    reset_at: str  # ISO 8601 UTC: when that limit's period starts again


@dataclass(frozen=True)
class Busy:
    """The settled budget has room, but reservations of requests in flight hold it."""


Plan = Fits | OverQuota | Busy


@dataclass(frozen=True)
class PeriodUsage:
    """What one user has settled and holds, for the day and the month of a request."""

    day: str
    settled_day: int = 0
    settled_month: int = 0
    held_day: int = 0
    held_month: int = 0


def plan(usage: PeriodUsage, limits: ResolvedLimits, prompt: int, output: int, choices: int = 1) -> Plan:
    choices = max(1, choices)
    checks = []  # (limit name, value, settled, held)
    if limits.tokens_per_day is not None:
        checks.append(("tokensPerDay", limits.tokens_per_day, usage.settled_day, usage.held_day))
    if limits.tokens_per_month is not None:
        checks.append(("tokensPerMonth", limits.tokens_per_month, usage.settled_month, usage.held_month))
    cap = output
    refused: OverQuota | None = None
    for name, value, settled, _ in checks:
        fits = (value - settled - prompt) // choices
        if fits < 1:
            # Of the limits that refuse, name the one that resets last: before then, no luck.
            reset = next_day_start(usage.day) if name == "tokensPerDay" else next_month_start(usage.day)
            if refused is None or reset > refused.reset_at:
                refused = OverQuota(name, value, settled, reset)
        cap = min(cap, fits)
    if refused is not None:
        return refused
    need = prompt + cap * choices
    for _, value, settled, held in checks:
        if value - settled - held < need:
            return Busy()
    return Fits(need, cap)


# Request counts


RETRY_SOON_SECONDS = 1  # retry after this when requests in flight hold what is needed


@dataclass(frozen=True)
class TooMany:
    """Over ``concurrentRequests`` or ``requestsPerMinute``: retry in ``retry_after`` seconds."""

    limit: str  # concurrentRequests or requestsPerMinute
    value: int
    retry_after: float


def check_rates(
    limits: ResolvedLimits, *, in_flight: int, admitted: int, window_ends_in: float
) -> TooMany | None:
    """``in_flight``: the user's requests admitted and not yet settled; ``admitted``: those
    admitted in the last 60 s; ``window_ends_in``: seconds until the oldest of them leaves it."""
    if limits.concurrent_requests is not None and in_flight >= limits.concurrent_requests:
        return TooMany("concurrentRequests", limits.concurrent_requests, RETRY_SOON_SECONDS)
    if limits.requests_per_minute is not None and admitted >= limits.requests_per_minute:
        return TooMany("requestsPerMinute", limits.requests_per_minute, window_ends_in)
    return None


# Reports


def usage_day_json(day: UsageDay) -> dict[str, Any]:
    return {
        "date": day.date, "requests": day.requests, "promptTokens": day.prompt_tokens,
        "completionTokens": day.completion_tokens, "totalTokens": day.total_tokens,
    }


def day_totals(record: UsageRecord, day: str) -> UsageDay:
    return next((d for d in reversed(record.days) if d.date == day), UsageDay(day))


def month_total(record: UsageRecord, day: str) -> int:
    month = month_of(day)
    return sum(d.total_tokens for d in record.days if d.date.startswith(month))


def report(
    user_id: str, record: UsageRecord, limits: ResolvedLimits, *, today: str, since: str
) -> dict[str, Any]:
    """The contract's usage object: ``{userId, days, limits, remaining}``. ``remaining`` holds
    what the token limits leave after the settled usage (absent limit: absent, unlimited)."""
    remaining: dict[str, int] = {}
    if limits.tokens_per_day is not None:
        used = day_totals(record, today).total_tokens
        remaining["tokensToday"] = max(0, limits.tokens_per_day - used)
    if limits.tokens_per_month is not None:
        remaining["tokensThisMonth"] = max(0, limits.tokens_per_month - month_total(record, today))
    return {
        "userId": user_id,
        "days": [usage_day_json(d) for d in record.days if d.date >= since],
        "limits": limits.to_json(),
        "remaining": remaining,
    }
