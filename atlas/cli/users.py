"""``atlas user add|list|remove|set-key|rotate-token|limit``: built-in users in the store (the
data directory's JSON files, or the PostgreSQL database of ``--database-url``).

These commands are safe while ``atlas serve`` runs on the same store: every write is atomic, and
a removal is atomic with the server's room and usage writes. The server sees a change (a key, a
token, limits) once its auth cache entry expires. A new token is printed once, alone on the last
line of standard output.
"""

from __future__ import annotations

import argparse
import sys

from msgspec import UNSET, structs

from atlas.config import ConfigError, parse_http_url
from atlas.store import Limits, Store, StoreError, is_valid_user_id, mask_key, store_for
from atlas.store.users import (
    INHERIT,
    UserCommandError,
    create_user,
    existing_user,
    remove_user,
    rotate_token,
    set_key,
    set_limits,
)

LIMIT_FIELDS = ("tokens_per_day", "tokens_per_month", "requests_per_minute", "concurrent_requests")


def parse_limit_value(flag: str, value: str) -> int | None | str:
    text = value.strip().lower()
    if text in ("none", "unlimited"):
        return None
    if text == INHERIT:
        return INHERIT
    if not text.isdigit():
        raise ConfigError(flag, f"{value!r}: expected a whole number, none or default")
    return int(text)


def describe_limits(limits: Limits | None) -> str:
    if limits is None:
        return "none of its own (the server's defaults apply)"
    parts = []
    for name, value in structs.asdict(limits).items():
        if value is UNSET:
            continue
        camel = name.split("_")[0] + "".join(word.title() for word in name.split("_")[1:])
        parts.append(f"{camel} {value:,}" if value is not None else f"{camel} unlimited")
    return ", ".join(parts) + "; the server's defaults for the rest"


def checked_provider_url(value: str | None) -> str | None:
    if value is None or value == "":
        return value
    try:
        return parse_http_url(value)
    except ValueError as exc:
        raise ConfigError("--provider-url", f"{value!r}: {exc}") from None


def main(args: argparse.Namespace) -> int:
    store = store_for(args.settings)
    try:
        store.prepare()
        return run(args, store)
    except StoreError as exc:
        print(f"atlas: {exc}", file=sys.stderr)
        return 1
    finally:
        store.close()


def run(args: argparse.Namespace, store: Store) -> int:
    action = args.user_command
    user_id = getattr(args, "user_id", None)
    if user_id is not None and not is_valid_user_id(user_id):
        print(f"atlas: invalid user id {user_id!r}: use 1-128 of A-Z a-z 0-9 . _ @ -", file=sys.stderr)
        return 2
    virtual_key = getattr(args, "virtual_key", None)
    if virtual_key is not None:
        virtual_key = virtual_key.strip()
        if not virtual_key or not virtual_key.isascii() or not virtual_key.isprintable() or " " in virtual_key:
            print("atlas: invalid --virtual-key: use a non-empty key of printable ASCII, no spaces",
                  file=sys.stderr)
            return 2
    try:
        if action == "add":
            provider_url = checked_provider_url(args.provider_url)
            token = create_user(store, user_id, virtual_key, provider_url)
            print(f"Created user {user_id} (virtual key {mask_key(virtual_key)}).")
            print("Its token follows; it is shown only this once:")
            print(token)
        elif action == "list":
            ids = store.user_ids()
            if not ids:
                print("No users. Add one with: atlas user add ID --virtual-key KEY")
            for listed_id in ids:
                try:
                    user = existing_user(store, listed_id)
                    provider = user.provider_url or "(default provider)"
                    print(f"{listed_id}\tkey {mask_key(user.virtual_key)}\t{provider}")
                except StoreError as exc:
                    print(f"{listed_id}\tERROR: {exc}")
        elif action == "remove":
            remove_user(store, user_id)
            print(f"Removed user {user_id} and its stored room; its token no longer works.")
        elif action == "set-key":
            user = set_key(store, user_id, virtual_key, checked_provider_url(args.provider_url))
            print(f"Updated user {user_id}: virtual key {mask_key(user.virtual_key)}.")
        elif action == "limit":
            changes = {}
            for name in LIMIT_FIELDS:
                value = getattr(args, name)
                if value is not None:
                    changes[name] = parse_limit_value("--" + name.replace("_", "-"), value)
            if changes or args.clear:
                user = set_limits(store, user_id, changes, clear=args.clear)
                print(f"Limits of {user_id}: {describe_limits(user.limits)}.")
            else:
                print(f"Limits of {user_id}: {describe_limits(existing_user(store, user_id).limits)}.")
        elif action == "rotate-token":
            token = rotate_token(store, user_id)
            print(f"New token for {user_id}; the old one no longer works. Shown only this once:")
            print(token)
    except (UserCommandError, StoreError) as exc:
        print(f"atlas: {exc}", file=sys.stderr)
        return 1
    return 0
