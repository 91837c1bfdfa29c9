"""User operations on any store: create, rotate a token, change a key, remove.

Used by ``atlas user`` and by ``atlas serve``'s first run. The ordering of the writes in each
operation is what keeps a crash between two of them harmless; the comments say how.
"""

from __future__ import annotations

import time

from msgspec import UNSET, structs

from atlas.store.base import Store
from atlas.store.records import Limits, UserRecord, hash_token, new_token


class UserCommandError(Exception):
    """A user operation that cannot be done as asked; the message says why."""

    pass


def create_user(store: Store, user_id: str, virtual_key: str, provider_url: str | None) -> str:
    """Create a user; returns its new token (the only time it exists outside the client)."""
    if store.load_user(user_id) is not None:
        raise UserCommandError(f"user {user_id!r} already exists (use set-key or rotate-token)")
    token = new_token()
    token_hash = hash_token(token)
    # The user record first: a token is only stored for an existing user (a database backend
    # enforces it with a foreign key). A crash in between leaves a user whose token never
    # existed, so nothing works with it; `rotate-token` gives it one.
    store.save_user(
        UserRecord(
            id=user_id, virtual_key=virtual_key, provider_url=provider_url,
            token_hash=token_hash, created_at=time.time(),
        )
    )
    store.save_token(token_hash, user_id)
    return token


def existing_user(store: Store, user_id: str) -> UserRecord:
    user = store.load_user(user_id)
    if user is None:
        raise UserCommandError(f"no user {user_id!r}")
    return user


def rotate_token(store: Store, user_id: str) -> str:
    user = existing_user(store, user_id)
    token = new_token()
    token_hash = hash_token(token)
    # New token file first, then the user record; the old token file goes last. Verification
    # requires both to agree, so a crash in between never leaves the old token working.
    store.save_token(token_hash, user_id)
    old_hash = user.token_hash
    user.token_hash = token_hash
    store.save_user(user)
    if old_hash:
        store.delete_token(old_hash)
    return token


def remove_user(store: Store, user_id: str) -> None:
    """Delete the user, its token, its room's stored prefs and conversations, and its usage."""
    existing_user(store, user_id)
    store.remove_user(user_id)


def set_key(store: Store, user_id: str, virtual_key: str, provider_url: str | None) -> UserRecord:
    user = existing_user(store, user_id)
    user.virtual_key = virtual_key
    if provider_url is not None:
        user.provider_url = provider_url or None
    store.save_user(user)
    return user


INHERIT = "default"  # a limit value that forgets the user's own, so the server default applies


def set_limits(
    store: Store, user_id: str, changes: dict[str, int | None | str], *, clear: bool = False
) -> UserRecord:
    """Change a user's stored limits (``Limits`` field names). ``clear`` drops them all first;
    then each change sets a number, ``None`` (unlimited for this user, whatever the defaults) or
    ``INHERIT`` (back to the server's default). The server sees it within its auth cache time."""
    user = existing_user(store, user_id)
    values = {} if clear or user.limits is None else {
        name: value for name, value in structs.asdict(user.limits).items() if value is not UNSET
    }
    for name, value in changes.items():
        if name not in Limits.__struct_fields__:
            raise UserCommandError(f"unknown limit {name!r}")
        if value == INHERIT:
            values.pop(name, None)
        else:
            values[name] = value
    limits = Limits(**values)
    user.limits = None if limits.is_empty() else limits
    store.save_user(user)
    return user
