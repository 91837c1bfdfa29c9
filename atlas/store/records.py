"""What the store keeps, and the small pure helpers every backend and its users share.

Stored structs follow schema evolution: a new field gets a default, a field's type never changes.
Nothing here performs I/O.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from pathlib import Path
from typing import Annotated, Any

import msgspec
from msgspec import UNSET, UnsetType

USER_ID_PATTERN = re.compile(r"[A-Za-z0-9._@-]{1,128}")


class StoreError(Exception):
    """Base of the store's errors."""


class UserGone(Exception):
    """A write for a user who no longer exists (removed meanwhile): refused, nothing written."""

    def __init__(self, user_id: str) -> None:
        super().__init__(f"user {user_id!r} no longer exists")
        self.user_id = user_id


class LeaseLost(Exception):
    """A room write refused because this process no longer owns the room: the lease it was
    loaded under was lost, and another process may have taken the room since. Nothing written."""

    def __init__(self, room_id: str) -> None:
        super().__init__(f"room {room_id!r} is no longer owned by this process")
        self.room_id = room_id


class StoreCorrupt(StoreError):
    """A stored value exists but cannot be used. The message names where it is: a file's path
    (JSON backend), or a table and a key (PostgreSQL)."""

    def __init__(self, where: Path | str, reason: str) -> None:
        shown = f"file {where}" if isinstance(where, Path) else where
        super().__init__(f"stored {shown} is unreadable: {reason}")
        self.where = where


class StoreUnavailable(StoreError):
    """The store cannot be reached now (a database that is down or unreachable). Nothing was
    written; the same call may succeed later. The message never holds a password."""


class Turn(msgspec.Struct, frozen=True):
    role: str
    content: str


LimitValue = Annotated[int, msgspec.Meta(ge=0)]


class Limits(msgspec.Struct, rename="camel", frozen=True, forbid_unknown_fields=True):
    """Limits from one source (defaults, ``atlas user limit``, the auth API). A field left unset
    inherits from the source before; ``None`` (JSON ``null``) means unlimited, overriding it."""

    tokens_per_day: LimitValue | None | UnsetType = UNSET
    tokens_per_month: LimitValue | None | UnsetType = UNSET
    requests_per_minute: LimitValue | None | UnsetType = UNSET
    concurrent_requests: LimitValue | None | UnsetType = UNSET

    def is_empty(self) -> bool:
        return all(getattr(self, name) is UNSET for name in self.__struct_fields__)


class UserRecord(msgspec.Struct, rename="camel", omit_defaults=True):
    """A built-in user. New fields must have defaults (schema evolution)."""

    id: str
    virtual_key: str = ""
    provider_url: str | None = None
    token_hash: str = ""
    created_at: float = 0.0
    limits: Limits | None = None  # set with `atlas user limit`

    def __repr__(self) -> str:  # the key never reaches a log line, not even by accident
        return f"UserRecord(id={self.id!r}, virtual_key={mask_key(self.virtual_key)!r})"


class TokenRecord(msgspec.Struct, rename="camel"):
    user_id: str


class RoomState(msgspec.Struct, rename="camel", omit_defaults=True):
    """What a room keeps on disk. New fields must have defaults (schema evolution)."""

    prefs: dict[str, Any] = msgspec.field(default_factory=dict)
    conversations: dict[str, list[Turn]] = msgspec.field(default_factory=dict)


def is_valid_user_id(value: str) -> bool:
    return USER_ID_PATTERN.fullmatch(value) is not None


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    """A new random token (256 bits). Never one starting with ``-``: on a command line
    (``atlas chat --token ...``) it would read as a flag (1 token in 64 did)."""
    while True:
        token = secrets.token_urlsafe(32)
        if not token.startswith("-"):
            return token


def mask_key(key: str) -> str:
    """A virtual key as it may be shown: only its last 4 characters."""
    if not key:
        return ""
    return "…" + key[-4:] if len(key) > 8 else "…"


class UsageDay(msgspec.Struct, rename="camel"):
    """One user's settled usage on one UTC day (``date`` is ``YYYY-MM-DD``)."""

    date: str
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class UsageRecord(msgspec.Struct, rename="camel", omit_defaults=True):
    """A user's usage ledger: one entry per UTC day with usage, oldest first, bounded.
    ``generation``: which append log continues it (the JSON backend's; 0 elsewhere)."""

    days: list[UsageDay] = msgspec.field(default_factory=list)
    generation: int = 0


KEEP_USAGE_DAYS = 400  # days of usage kept per user: more than a year, every day of this month


def add_usage_days(record: UsageRecord, days: list[UsageDay]) -> UsageRecord:
    """``record`` with ``days`` added to its days' totals, keeping the last KEEP_USAGE_DAYS."""
    totals = {day.date: day for day in record.days}
    for day in days:
        entry = totals.get(day.date)
        if entry is None:
            entry = totals[day.date] = UsageDay(day.date)
        entry.requests += day.requests
        entry.prompt_tokens += day.prompt_tokens
        entry.completion_tokens += day.completion_tokens
        entry.total_tokens += day.total_tokens
    return UsageRecord(days=[totals[d] for d in sorted(totals)][-KEEP_USAGE_DAYS:], generation=record.generation)


class Identity(msgspec.Struct, rename="camel", frozen=True, omit_defaults=True):
    """What ``/api/me`` says about a token's user (extra fields are ignored)."""

    id: str
    virtual_key: str | None = None
    provider_url: str | None = None
    # When this user was created (built-in auth): a user removed and added again under the same
    # id is another person, and must not inherit the loaded room of the first.
    created_at: float | None = None
    limits: Limits | None = None

    def __repr__(self) -> str:  # the key never reaches a log line, not even by accident
        return f"Identity(id={self.id!r}, virtual_key={mask_key(self.virtual_key or '')!r})"
