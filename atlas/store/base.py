"""The store interface: everything Atlas keeps between runs, behind one ``Protocol``.

Rooms, auth and the CLI use only this interface, so a backend is added beside the others
(``json_store``, the embedded default; ``postgres``, for several processes sharing one database)
without touching them. Its methods block (file or database I/O); async callers
run them in a worker thread with ``trio.to_thread.run_sync``.

Guarantees every backend gives:
- a ``save_*`` that returns is durable: a crash afterwards never loses it, and a crash during it
  leaves the old value or the new one, never a mix;
- a stored value that cannot be decoded raises ``StoreCorrupt`` naming where it is, and is never
  overwritten silently;
- removing a user removes everything kept for them;
- a store that cannot be reached raises ``StoreUnavailable`` (nothing written, try again later).
"""

from __future__ import annotations

from typing import Protocol

from atlas.store.records import RoomState, TokenRecord, UserRecord


class Store(Protocol):
    @property
    def location(self) -> str:
        """Where the data lives, for log lines (never holds a password)."""
        ...

    def prepare(self) -> None:
        """Create (or migrate) what the store needs and clean up what a crash left behind."""
        ...

    def close(self) -> None:
        """Release what the store holds open (database connections). Safe to call again."""
        ...

    # Users (built-in auth)
    def load_user(self, user_id: str) -> UserRecord | None: ...
    def save_user(self, user: UserRecord) -> None: ...
    def delete_user(self, user_id: str) -> None:
        """The user's record (a backend may drop its token hashes with it); ``remove_user``
        removes everything."""
        ...

    def user_ids(self) -> list[str]: ...
    def has_users(self) -> bool: ...

    # Token hashes (built-in auth): the token itself is never stored
    def load_token(self, token_hash: str) -> TokenRecord | None: ...
    def save_token(self, token_hash: str, user_id: str) -> None:
        """Raises ``UserGone`` and writes nothing when the user does not exist (save the user
        first), atomically with ``remove_user``: a token never outlives its user."""
        ...

    def delete_token(self, token_hash: str) -> None: ...

    # Rooms: preferences and conversations
    def load_room(self, room_id: str) -> RoomState: ...

    def save_room(self, room_id: str, state: RoomState, *, owner_must_exist: bool = False) -> None:
        """With ``owner_must_exist`` (built-in auth), raises ``UserGone`` and writes nothing
        when the room's user no longer exists, atomically with ``remove_user``: a write racing a
        removal either lands before it (and is removed with the rest) or is refused."""
        ...

    def delete_room(self, room_id: str) -> None: ...

    def remove_user(self, user_id: str) -> None:
        """Remove the user and everything kept for them (token hash, room, leftovers of
        interrupted writes), for good."""
        ...
