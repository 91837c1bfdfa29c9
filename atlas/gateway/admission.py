"""Admission: the one step every billable path goes through (the WebSocket relay, ``?proxy=`` to
the agent, and ``/v1/chat/completions``)::

    async with admission.admit(user_id, limits, prompt=bound, output=max_tokens) as ticket:
        ...send the request, with ticket.cap as its output cap when it is not None...
        ticket.answered()               # the provider said 200: from now on the request costs
        ...
        await ticket.settle(usage)      # durable; before the client is told the request is done

Admission first refuses everything (``store_unavailable``, 503) while the store does not answer
(``store_ready``: on PostgreSQL, the room leases' heartbeat; with or without limits), then checks
the concurrency and per-minute limits (``rate_limited``, 429), then reserves the
worst case against the token limits (``quota_exceeded``, 402, when the settled usage leaves no
room for even a one-token reply). With the JSON store the request counts are kept here, in this
process; a ledger that ``counts_requests`` (PostgreSQL) checks them in its ``reserve``, across
processes, and a ledger that cannot be reached refuses with ``store_unavailable`` (503) rather
than serving on limits it cannot check. A request that does not fit only because requests in flight
hold the budget waits up to ``wait_seconds`` for one of them to settle, then is ``rate_limited``.
Leaving the block settles whatever was not settled, on every exit path (cancel, provider error,
disconnect, a crash of the request's task), shielded from cancellation: a request the provider
answered costs its reported usage, else the reservation (Atlas's upper bound); one it never
answered costs nothing. A reservation can therefore not outlive its request.

Prompt bounds are never averages: a token is at least one UTF-8 byte for the byte-level BPE
tokenizers providers use, so bytes plus a per-message allowance bound the prompt from above.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager

import trio

from atlas.gateway.request_log import RequestObserver, RequestTrace
from atlas.llm.types import AgentError, Usage
from atlas.store import Charge, Hold, Identity, Ledger, Limits, StoreUnavailable, UserGone
from atlas.store.usage import (
    REPORT_DAYS,
    RETRY_SOON_SECONDS,
    UNLIMITED,
    OverQuota,
    ResolvedLimits,
    TooMany,
    check_rates,
    days_before,
    day_totals,
    report,
    resolve_limits,
    usage_day_json,
    utc_day,
)

PER_MESSAGE_TOKENS = 8  # role and framing tokens of one chat message (OpenAI's format uses 3-4)
PER_REQUEST_TOKENS = 8  # the reply's priming tokens and the like
NON_TEXT_PART_TOKENS = 2048  # an image, audio or file part of a /v1 message (see docs/usage.md)
TOOL_TOKENS = 16  # framing of one tool definition, beyond its JSON bytes


def outcome_of(exc: BaseException) -> str:
    """The outcome code a request's record shows for the exception that ended it."""
    if isinstance(exc, (Refused, AgentError)):
        return exc.code
    if isinstance(exc, trio.Cancelled) or (
        isinstance(exc, BaseExceptionGroup) and exc.split(trio.Cancelled)[1] is None
    ):
        return "cancelled"
    if isinstance(exc, StoreUnavailable):
        return "store_unavailable"
    if isinstance(exc, UserGone):
        return "unauthorized"
    return "internal"


def prompt_bound(texts: Iterable[str], messages: int) -> int:
    """An upper bound of the prompt tokens of ``messages`` chat messages holding ``texts``."""
    return sum(len(text.encode()) for text in texts) + PER_MESSAGE_TOKENS * messages + PER_REQUEST_TOKENS


class Refused(Exception):
    """Admission said no; nothing was sent to the provider. ``code`` is ``quota_exceeded`` (402,
    with ``reset_at`` and ``limit``), ``rate_limited`` (429, with ``retry_after`` seconds) or
    ``store_unavailable`` (503: the limits could not be checked)."""

    def __init__(
        self, code: str, message: str, status: int, *, reset_at: str | None = None,
        limit: str | None = None, retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status
        self.reset_at = reset_at
        self.limit = limit
        self.retry_after = retry_after

    def fields(self) -> dict[str, str | int]:
        """The error object's extra fields, by ``protocol.ErrorBody`` attribute name."""
        values = {"reset_at": self.reset_at, "limit": self.limit, "retry_after": self.retry_after}
        return {name: value for name, value in values.items() if value is not None}

    def to_json(self) -> dict[str, str | int]:
        """The contract's error object: ``{"code", "message", "resetAt"|"retryAfter", ...}``."""
        body: dict[str, str | int] = {"code": self.code, "message": self.message}
        for name, value in (("resetAt", self.reset_at), ("limit", self.limit),
                            ("retryAfter", self.retry_after)):
            if value is not None:
                body[name] = value
        return body

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [(b"retry-after", str(self.retry_after).encode())] if self.retry_after else []


def store_unavailable() -> Refused:
    return Refused(
        "store_unavailable", "the limits cannot be checked now (the database is unavailable); "
        "try again shortly", 503, retry_after=RETRY_SOON_SECONDS,
    )


def rate_limited(message: str, retry_after: float) -> Refused:
    return Refused("rate_limited", message, 429, retry_after=max(1, math.ceil(retry_after)))


def too_many(refusal: TooMany) -> Refused:
    if refusal.limit == "concurrentRequests":
        return rate_limited(
            f"too many requests at once: at most {refusal.value} in flight for this user; "
            f"retry in {RETRY_SOON_SECONDS} s", RETRY_SOON_SECONDS,
        )
    return rate_limited(
        f"too many requests: at most {refusal.value} per minute for this user; "
        f"retry in {math.ceil(max(refusal.retry_after, 1))} s", refusal.retry_after,
    )


def quota_exceeded(refusal: OverQuota, need: int) -> Refused:
    period = "today" if refusal.limit == "tokensPerDay" else "this month"
    name = "daily" if refusal.limit == "tokensPerDay" else "monthly"
    if need > refusal.value:
        message = (
            f"this request needs at least {need:,} tokens, more than the whole {name} limit of "
            f"{refusal.value:,} ({refusal.used:,} used {period}); the limit resets at {refusal.reset_at}"
        )
    else:
        message = (
            f"{name} token limit reached: {refusal.used:,} of {refusal.value:,} tokens used {period}, "
            f"and this request needs at least {need:,}; the limit resets at {refusal.reset_at}"
        )
    return Refused("quota_exceeded", message, 402, reset_at=refusal.reset_at, limit=refusal.limit)


class Ticket:
    """One admitted request. ``cap`` is the output cap per choice to send to the provider when
    a token limit applies (None: the request's own, untouched)."""

    def __init__(
        self, admission: Admission, hold: Hold, cap: int | None, *, prompt: int, output: int,
        trace: RequestTrace | None = None,
    ) -> None:
        self._admission = admission
        self.trace = trace
        self.hold = hold
        self.cap = cap
        # The upper bound charged when the provider reports no usage: prompt bound and the
        # output cap of every choice.
        self._prompt = prompt
        self._output = output
        self.is_answered = False
        self.settled = False

    def first_token(self) -> None:
        """The first piece of the reply is on its way to the client (for the request's record)."""
        if self.trace is not None:
            self.trace.first_token()

    def delivered(self) -> None:
        """The client has been sent the whole answer (for the request's record)."""
        if self.trace is not None:
            self.trace.answered_whole = True

    def failed(self, code: str) -> None:
        """The request ended with the error ``code`` without raising it (an answer passed on)."""
        if self.trace is not None:
            self.trace.outcome = code

    def answered(self, answered: bool = True) -> None:
        """The provider has accepted the request: from now on it costs (False: it refused
        after all, and costs nothing)."""
        self.is_answered = answered

    def charge(self, usage: Usage | None) -> Charge | None:
        if not self.is_answered:
            return None
        if usage is not None and (usage.prompt_tokens or usage.completion_tokens or usage.total_tokens):
            total = usage.total_tokens or usage.prompt_tokens + usage.completion_tokens
            return Charge(usage.prompt_tokens, usage.completion_tokens, total)
        return Charge(self._prompt, self._output, self._prompt + self._output)

    async def settle(self, usage: Usage | None) -> None:
        """Replace the reservation by the real usage (``usage`` from the provider; None or all
        zero: the estimate). Durable on return. Only the first call counts."""
        if self.settled:
            return
        self.settled = True
        charge = self.charge(usage)
        if self.trace is not None and charge is not None:
            self.trace.tokens = charge.total_tokens
        if charge is None and not self.hold.tokens and not self.hold.id:
            return  # nothing reserved, nothing spent
        with trio.CancelScope(shield=True):
            await self._admission.ledger.settle(self.hold, charge)


class _Rate:
    """Requests per minute and in flight of one user, counted at admission."""

    __slots__ = ("in_flight", "recent")

    def __init__(self) -> None:
        self.in_flight = 0
        self.recent: deque[float] = deque()


class Admission:
    def __init__(
        self, ledger: Ledger, defaults: Limits | None = None, *, clock: Callable[[], float] = time.time,
        wait_seconds: float = 3.0, default_output_tokens: int = 4096,
        observer: RequestObserver | None = None, deadline_seconds: float = math.inf,
        store_ready: Callable[[], Awaitable[bool]] | None = None,
    ) -> None:
        self.ledger = ledger
        # Whether the store answers now (the room leases' health): a process that lost its
        # database admits nothing, rather than serving on limits it can no longer check.
        self.store_ready = store_ready
        self.deadline_seconds = deadline_seconds
        self.observer = observer or RequestObserver()
        self.defaults = None if defaults is None or defaults.is_empty() else defaults
        self.clock = clock
        self.wait_seconds = wait_seconds
        self.default_output_tokens = default_output_tokens
        self._rates: dict[str, _Rate] = {}

    def limits_for(self, identity: Identity | None) -> ResolvedLimits:
        """Defaults, overridden by the user's own (``atlas user limit``, delivered by the built-in
        ``/api/me``, or the external auth API's ``limits``)."""
        if self.defaults is None and (identity is None or identity.limits is None):
            return UNLIMITED
        return resolve_limits(self.defaults, identity.limits if identity else None)

    def today(self) -> str:
        return utc_day(self.clock())

    def in_flight(self, user_id: str) -> int:
        rate = self._rates.get(user_id)
        return rate.in_flight if rate else 0

    @asynccontextmanager
    async def admit(
        self, user_id: str, limits: ResolvedLimits, *, prompt: int, output: int | None,
        choices: int = 1, path: str = "ws", agent: str = "",
    ) -> AsyncIterator[Ticket]:
        """Admit one request whose prompt is at most ``prompt`` tokens and whose reply is capped
        at ``output`` tokens per choice (None: no cap of its own). Raises ``Refused``. The
        request's record (``request_log``: ``path``, ``agent`` or model, outcome, tokens,
        duration) is written when the block ends, however it ends."""
        trace = self.observer.start(path, user_id, agent)
        try:
            async with self._admitted(user_id, limits, prompt, output, choices, trace) as ticket:
                # The overall deadline: a provider dripping a byte now and then never trips the
                # read timeout, and would hold the request (and its reservation) forever.
                with trio.move_on_after(self.deadline_seconds) as deadline:
                    yield ticket
                if deadline.cancelled_caught:
                    raise AgentError(
                        "provider_timeout",
                        f"the reply took longer than the {self.deadline_seconds:g} s a request may take",
                        504,
                    )
        except BaseException as exc:
            if not trace.answered_whole:
                trace.outcome = outcome_of(exc)
            raise
        finally:
            trace.finish()

    @asynccontextmanager
    async def _admitted(
        self, user_id: str, limits: ResolvedLimits, prompt: int, output: int | None, choices: int,
        trace: RequestTrace,
    ) -> AsyncIterator[Ticket]:
        if self.store_ready is not None and not await self.store_ready():
            raise store_unavailable()
        rate = self._rates.get(user_id)
        if rate is None:
            rate = self._rates[user_id] = _Rate()
        # The ledger counts the requests itself (across processes), or they are counted here.
        shared = self.ledger.counts_requests
        stamp = None if shared else self._check_rates(rate, limits)
        rate.in_flight += 1
        try:
            choices = max(1, choices)
            wanted = output or self.default_output_tokens
            if limits.limits_tokens or (shared and limits.limits_anything):
                try:
                    hold = await self._reserve(user_id, limits, prompt, wanted, choices)
                except BaseException:
                    if stamp is not None:
                        rate.recent.remove(stamp)  # a refused request is not counted
                    raise
                # Only counted (no token limit): the request goes out untouched.
                cap = hold.cap if limits.limits_tokens else None
                ticket = Ticket(self, hold, cap, prompt=prompt, output=(cap or wanted) * choices, trace=trace)
            else:
                hold = Hold(user_id, self.today(), 0, wanted)
                ticket = Ticket(self, hold, None, prompt=prompt, output=wanted * choices, trace=trace)
            try:
                yield ticket
            finally:
                await ticket.settle(None)  # a no-op after an explicit settle
        finally:
            rate.in_flight -= 1
            if not rate.in_flight:
                horizon = self.clock() - 60
                while rate.recent and rate.recent[0] <= horizon:
                    rate.recent.popleft()
                if not rate.recent:
                    self._rates.pop(user_id, None)

    def _check_rates(self, rate: _Rate, limits: ResolvedLimits) -> float | None:
        """Refuse over the concurrency or per-minute limit, counted in this process; returns the
        per-minute stamp taken."""
        if limits.concurrent_requests is None and limits.requests_per_minute is None:
            return None
        now = self.clock()
        recent = rate.recent
        if limits.requests_per_minute is not None:
            while recent and recent[0] <= now - 60:
                recent.popleft()
        refusal = check_rates(limits, in_flight=rate.in_flight, admitted=len(recent),
                              window_ends_in=recent[0] + 60 - now if recent else 60)
        if refusal is not None:
            raise too_many(refusal)
        if limits.requests_per_minute is None:
            return None
        recent.append(now)
        return now

    async def _reserve(
        self, user_id: str, limits: ResolvedLimits, prompt: int, output: int, choices: int
    ) -> Hold:
        deadline = trio.current_time() + self.wait_seconds
        while True:
            settled = self.ledger.next_settlement(user_id)
            try:
                result = await self.ledger.reserve(
                    user_id, self.today(), limits, prompt=prompt, output=output, choices=choices
                )
            except StoreUnavailable as exc:
                raise store_unavailable() from exc
            if isinstance(result, Hold):
                return result
            if isinstance(result, OverQuota):
                raise quota_exceeded(result, prompt + choices)
            if isinstance(result, TooMany):
                raise too_many(result)
            # Busy: requests in flight hold the budget; one of them settling may make room (a
            # settlement in another process sets no event: ask again every poll_seconds).
            with trio.move_on_at(min(deadline, trio.current_time() + self.ledger.poll_seconds)):
                await settled.wait()
            if trio.current_time() < deadline:
                continue
            raise rate_limited(
                "this user's requests in flight hold the rest of the token budget; "
                f"retry in {RETRY_SOON_SECONDS} s", RETRY_SOON_SECONDS,
            )

    # Reading the ledger

    async def report(self, user_id: str, limits: ResolvedLimits, since: str | None = None) -> dict:
        today = self.today()
        record = await self.ledger.usage(user_id)
        return report(user_id, record, limits, today=today,
                      since=since or days_before(today, REPORT_DAYS - 1))

    async def usage_today(self, user_id: str) -> dict:
        day = usage_day_json(day_totals(await self.ledger.usage(user_id), self.today()))
        del day["date"]
        return day
