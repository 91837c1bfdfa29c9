"""The bench's user store: N built-in users written straight into an Atlas data directory.

Same files, same encoding as ``atlas user add`` (``atlas.store``), minus the per-file fsync that
would make 100,000 users take minutes. The store is built once per size and kept, with its
tokens, under ``bench/results/cache/`` (git-ignored); every Atlas the bench starts serves a copy-free
view of it (nothing in the scenarios writes to ``users/`` or ``tokens/``).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import msgspec

from atlas.store import JsonStore, TokenRecord, UserRecord, hash_token, new_token

_encode = msgspec.json.Encoder().encode
FORMAT = 1


def user_id(index: int) -> str:
    return f"u{index:06d}"


def build_store(directory: Path, count: int) -> list[tuple[str, str]]:
    """Users ``u000000``..; returns ``[(user_id, token)]``, also kept in ``bench-tokens.json``."""
    tokens_file = directory / "bench-tokens.json"
    marker = directory / "bench-complete"
    if marker.exists() and marker.read_text().strip() == f"{FORMAT} {count}":
        return [tuple(pair) for pair in json.loads(tokens_file.read_text())]  # type: ignore[misc]
    if directory.exists():
        shutil.rmtree(directory)
    store = JsonStore(directory)
    store.prepare()
    now = time.time()
    pairs = []
    for index in range(count):
        uid = user_id(index)
        token = new_token()
        token_hash = hash_token(token)
        record = UserRecord(
            id=uid, virtual_key=f"bench-key-{index:06d}", provider_url=None,
            token_hash=token_hash, created_at=now,
        )
        _write(store.token_path(token_hash), _encode(TokenRecord(user_id=uid)))
        _write(store.user_path(uid), _encode(record))
        pairs.append((uid, token))
    tokens_file.write_text(json.dumps(pairs))
    os.sync()
    marker.write_text(f"{FORMAT} {count}")
    return pairs


def _write(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def reset_rooms(directory: Path) -> None:
    """Forget every room's state, so each scenario starts from the same store."""
    rooms = directory / "rooms"
    if rooms.exists():
        shutil.rmtree(rooms)
    rooms.mkdir(mode=0o700)
