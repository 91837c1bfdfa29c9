"""PostgreSQL store (``ATLAS_DATABASE_URL``): one database shared by any number of processes.

    schema_version  the one row saying which of ``MIGRATIONS`` are applied
    users           id, virtual_key, provider_url, token_hash, created_at, limits (jsonb: ``Limits``)
    tokens          hash -> user_id, a foreign key to users (ON DELETE CASCADE)
    rooms           id -> state: the room's ``RoomState`` as msgspec encodes it, in a ``json`` column
    usage_days      (user_id, day) -> requests, prompt, completion and total tokens; no foreign key
                    (users of an external auth API have no row in users)
    reservations    the requests in flight of every process, with what each holds (pg_ledger.py)
    admissions      when each request of the last minute was admitted (pg_ledger.py)
    room_leases     id -> epoch: the fence of the room's current owner (pg_leases.py), from the
                    sequence room_lease_epochs

A room's state is one value, not a column per field: ``RoomState`` evolves in its struct (a new
field gets a default) with no migration, both backends decode it with the same struct, and a
value that does not fit raises ``StoreCorrupt`` naming the table and the key. The column is
``json`` (checked, stored verbatim), not ``jsonb``: jsonb refuses ``\\u0000`` in strings, which a
client's prefs may hold and the JSON backend keeps; nothing queries inside the state.

``prepare()`` creates or migrates the schema on a connection of its own, in one transaction under
a transaction-level advisory lock, so processes starting together apply each migration once.

Driver: psycopg 3's sync API. The store interface blocks and is already called from trio worker
threads (``trio.to_thread.run_sync``), so each call borrows a connection from a small bounded
``psycopg_pool.ConnectionPool`` for its duration. Callers beyond the pool's size wait in the
pool's queue (at most ``timeout`` seconds); a borrowed connection is checked first, so the pool
recovers by itself from a database restart. There is no trio ``CapacityLimiter`` sized like the
pool in front of it: trio's default thread limiter (40) already bounds the threads, and the
pool's queue is the bound on connections, shared by every caller (auth, rooms, sweeps) without
each of them having to pass the same limiter.

Atomicity, under PostgreSQL's default READ COMMITTED:
- ``remove_user`` deletes the user row first (its tokens go with it, by the cascade), then the
  room, in one transaction;
- ``save_room(owner_must_exist=True)`` is one statement that takes a ``FOR KEY SHARE`` lock on
  the user's row and writes the room only if that row exists. The lock conflicts with the
  removal's delete: a write either commits first (and the removal, waiting for it, deletes the
  room after it) or waits for the removal and finds no user (``UserGone``, nothing written);
- ``save_token`` for a missing user fails on the foreign key (``UserGone``);
- ``add_usage`` is one ``INSERT ... ON CONFLICT DO UPDATE`` that adds to each day's totals, so
  processes adding at once never lose each other's usage; with ``owner_must_exist`` it takes the
  same ``FOR KEY SHARE`` lock as ``save_room``, and ``remove_user`` deletes the usage rows in its
  transaction;
- the live ledger (``usage_ledger``: reservations, request counts) is ``pg_ledger``'s;
- ``save_room(fence=)`` (a room owned under a lease, see ``pg_leases``) locks the room's
  ``room_leases`` row ``FOR SHARE`` and writes only if its epoch is still the fence. Taking the
  lease over updates that row, so it waits for a write in progress (which the new owner then
  loads) or makes it find another epoch (``LeaseLost``, nothing written).

Errors: a database that cannot be reached (a connection that fails, or none free within the
timeout) raises ``StoreUnavailable``; no message holds the password, and ``location`` shows the
URL without it. A write that returns is committed, which with ``synchronous_commit`` on (the
default) means flushed to the write-ahead log.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import msgspec
import psycopg
import trio
from psycopg import errors
from psycopg_pool import ConnectionPool, PoolClosed, PoolTimeout

from atlas.store.base import Ledger
from atlas.store.pg_ledger import PostgresLedger
from atlas.store.pg_leases import PostgresLeases
from atlas.store.records import (
    KEEP_USAGE_DAYS, LeaseLost, Limits, RoomState, StoreCorrupt, StoreError, StoreUnavailable, TokenRecord,
    UsageDay, UsageRecord, UserGone, UserRecord, is_valid_user_id,
)

log = logging.getLogger("atlas.store.postgres")

T = TypeVar("T")

POOL_SIZE = 10  # connections per process, at most; one is kept open while idle
POOL_TIMEOUT = 5.0  # seconds a call waits for a working connection before StoreUnavailable
CONNECT_TIMEOUT = 5  # seconds for one connection attempt (libpq's connect_timeout), unless the URL says
SCHEMA_LOCK = 0x41746C6173  # the advisory lock key that migrations hold ("Atlas")

# Each entry is one schema version: its statements, applied in order. Append only; never edit one
# that has shipped.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (  # 1: users, token hashes, rooms
        """CREATE TABLE users (
            id text PRIMARY KEY,
            virtual_key text NOT NULL,
            provider_url text,
            token_hash text NOT NULL,
            created_at double precision NOT NULL,
            limits jsonb
        )""",
        """CREATE TABLE tokens (
            hash text PRIMARY KEY,
            user_id text NOT NULL REFERENCES users (id) ON DELETE CASCADE
        )""",
        "CREATE INDEX tokens_user_id ON tokens (user_id)",
        """CREATE TABLE rooms (
            id text PRIMARY KEY,
            state json NOT NULL
        )""",
    ),
    (  # 2: the usage ledger
        """CREATE TABLE usage_days (
            user_id text NOT NULL,
            day date NOT NULL,
            requests bigint NOT NULL DEFAULT 0,
            prompt_tokens bigint NOT NULL DEFAULT 0,
            completion_tokens bigint NOT NULL DEFAULT 0,
            total_tokens bigint NOT NULL DEFAULT 0,
            PRIMARY KEY (user_id, day)
        )""",
    ),
    (  # 3: the live ledger across processes (pg_ledger.py)
        "CREATE SEQUENCE reservation_ids",
        """CREATE TABLE reservations (
            id bigint PRIMARY KEY,
            user_id text NOT NULL,
            day date NOT NULL,
            tokens bigint NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now(),
            expires_at timestamptz NOT NULL
        )""",
        "CREATE INDEX reservations_user_id ON reservations (user_id)",
        """CREATE TABLE admissions (
            user_id text NOT NULL,
            at timestamptz NOT NULL DEFAULT now()
        )""",
        "CREATE INDEX admissions_user_id_at ON admissions (user_id, at)",
    ),
    (  # 4: room leases' fences (pg_leases.py): the epoch under which a room is owned now
        "CREATE SEQUENCE room_lease_epochs",
        """CREATE TABLE room_leases (
            id text PRIMARY KEY,
            epoch bigint NOT NULL
        )""",
    ),
)

_ADD_USAGE = (
    " INSERT INTO usage_days (user_id, day, requests, prompt_tokens, completion_tokens, total_tokens)"
    " SELECT {owner}, u.day, u.requests, u.prompt, u.completion, u.total"
    " FROM {source} unnest(%s::date[], %s::bigint[], %s::bigint[], %s::bigint[], %s::bigint[])"
    " AS u(day, requests, prompt, completion, total)"
    " ON CONFLICT (user_id, day) DO UPDATE SET"
    " requests = usage_days.requests + EXCLUDED.requests,"
    " prompt_tokens = usage_days.prompt_tokens + EXCLUDED.prompt_tokens,"
    " completion_tokens = usage_days.completion_tokens + EXCLUDED.completion_tokens,"
    " total_tokens = usage_days.total_tokens + EXCLUDED.total_tokens"
)

_TOKEN_HASH = re.compile(r"[0-9a-f]{64}")
_encoder = msgspec.json.Encoder()
_room_decoder = msgspec.json.Decoder(RoomState)
_limits_decoder = msgspec.json.Decoder(Limits)


def database_password(url: str) -> str | None:
    """The password a ``postgresql://`` URL carries (in its user info or as ``?password=``)."""
    parts = urlsplit(url)
    userinfo, at, _ = parts.netloc.rpartition("@")
    if at and ":" in userinfo:
        return unquote(userinfo.partition(":")[2])
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key == "password":
            return value
    return None


def redact_database_url(url: str) -> str:
    """The URL as it may be shown: no password, wherever the URL put it."""
    parts = urlsplit(url)
    userinfo, at, hosts = parts.netloc.rpartition("@")
    netloc = f"{userinfo.partition(':')[0]}@{hosts}" if at else hosts
    query = urlencode([
        (key, "***" if key == "password" else value)
        for key, value in parse_qsl(parts.query, keep_blank_values=True)
    ])
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def _check_id(value: str) -> str:
    # The JSON backend refuses the same ids; both backends accept exactly the same keys.
    if not is_valid_user_id(value):
        raise ValueError(f"invalid id {value!r}")
    return value


def _check_token_hash(value: str) -> str:
    if not _TOKEN_HASH.fullmatch(value):
        raise ValueError("not a token hash")
    return value


class PostgresStore:
    """The shared backend: users, token hashes and rooms in one PostgreSQL database."""

    def __init__(self, url: str, *, pool_size: int = POOL_SIZE, timeout: float = POOL_TIMEOUT) -> None:
        self._url = url
        self._timeout = timeout
        self._location = f"database {redact_database_url(url)}"
        password = database_password(url)
        # As given and as decoded: an error message may quote either.
        raw = urlsplit(url).netloc.rpartition("@")[0].partition(":")[2]
        self._secrets = sorted({s for s in (password, raw) if s}, key=len, reverse=True)
        self._pool = ConnectionPool(
            url, min_size=1, max_size=pool_size, open=False, timeout=timeout, name="atlas",
            kwargs=self._connection_options(), check=ConnectionPool.check_connection,
            # The pool retries a failed connection with a doubling delay until this long has
            # passed; the next call then starts afresh. Kept short, so that a database that
            # comes back is used within a second or two, not after a minute-long backoff.
            reconnect_timeout=timeout,
        )
        self._open_lock = threading.Lock()
        self._opened = False

    @property
    def location(self) -> str:
        return self._location

    def _connection_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"autocommit": True}
        given = {key for key, _ in parse_qsl(urlsplit(self._url).query)}
        if "connect_timeout" not in given:
            options["connect_timeout"] = CONNECT_TIMEOUT
        if "application_name" not in given:
            options["application_name"] = "atlas"
        return options

    # Errors

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def _unavailable(self, exc: BaseException) -> StoreUnavailable:
        first_line = self._scrub(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
        return StoreUnavailable(f"{self.location} is unavailable: {first_line}")

    @contextmanager
    def _mapped_errors(self) -> Iterator[None]:
        """psycopg's and the pool's exceptions as the store's (``from None``: a chained
        exception could show the connection string)."""
        try:
            yield
        except PoolTimeout:
            raise StoreUnavailable(
                f"{self.location} is unavailable: no working connection within {self._timeout:g} s"
            ) from None
        except PoolClosed:
            raise StoreError(f"{self.location}: the store is closed") from None
        except psycopg.OperationalError as exc:
            raise self._unavailable(exc) from None
        except psycopg.Error as exc:
            primary = exc.diag.message_primary or type(exc).__name__  # DETAIL may quote values
            raise StoreError(f"{self.location}: {self._scrub(primary)} ({exc.sqlstate})") from None

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection[Any]]:
        self._open()
        with self._mapped_errors(), self._pool.connection() as conn:
            yield conn

    def _open(self) -> None:
        if not self._opened:
            with self._open_lock:
                if not self._opened:
                    self._pool.open(wait=False)
                    self._opened = True

    def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._connection() as conn:
            return conn.execute(sql, params).fetchall()

    def _execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        with self._connection() as conn:
            return conn.execute(sql, params).rowcount

    # Life cycle

    def prepare(self) -> None:
        """Create or migrate the schema, on a connection of its own (one clear error when the
        database cannot be reached), then let the pool fill in the background."""
        with self._mapped_errors():
            with psycopg.connect(self._url, **self._connection_options()) as conn:
                with conn.transaction():
                    self._migrate(conn)
        self._open()

    def _migrate(self, conn: psycopg.Connection[Any]) -> None:
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_version ("
            " one boolean PRIMARY KEY DEFAULT true CHECK (one), version integer NOT NULL)"
        )
        row = conn.execute("SELECT version FROM schema_version").fetchone()
        current, latest = (row[0] if row else 0), len(MIGRATIONS)
        if current > latest:
            raise StoreError(
                f"{self.location} has schema version {current}, newer than this Atlas knows "
                f"({latest}): upgrade Atlas"
            )
        if current == latest:
            return
        for statements in MIGRATIONS[current:]:
            for statement in statements:
                conn.execute(statement)
        conn.execute(
            "INSERT INTO schema_version (version) VALUES (%s)"
            " ON CONFLICT (one) DO UPDATE SET version = EXCLUDED.version", (latest,),
        )
        log.info("%s: schema migrated from version %d to %d", self.location, current, latest)

    def close(self) -> None:
        with self._open_lock:
            if self._opened:
                self._pool.close()
                self._opened = False

    async def read(self, fn: Callable[..., T], *args: Any) -> T:
        return await trio.to_thread.run_sync(fn, *args)

    def room_leases(self) -> PostgresLeases:
        """Leases on a connection of their own, outside the pool (``pg_leases``)."""
        return PostgresLeases(
            self._url, location=self._location, scrub=self._scrub,
            connect_timeout=self._connection_options().get("connect_timeout", CONNECT_TIMEOUT),
        )

    # Users (built-in auth)

    def load_user(self, user_id: str) -> UserRecord | None:
        rows = self._rows(
            "SELECT virtual_key, provider_url, token_hash, created_at, limits::text FROM users WHERE id = %s",
            (_check_id(user_id),),
        )
        if not rows:
            return None
        virtual_key, provider_url, token_hash, created_at, limits = rows[0]
        try:
            decoded = _limits_decoder.decode(limits) if limits is not None else None
        except msgspec.DecodeError as exc:
            raise StoreCorrupt(f"limits of row {user_id!r} of table users", str(exc)) from None
        return UserRecord(
            id=user_id, virtual_key=virtual_key, provider_url=provider_url,
            token_hash=token_hash, created_at=created_at, limits=decoded,
        )

    def save_user(self, user: UserRecord) -> None:
        limits = _encoder.encode(user.limits).decode() if user.limits is not None else None
        self._execute(
            "INSERT INTO users (id, virtual_key, provider_url, token_hash, created_at, limits)"
            " VALUES (%s, %s, %s, %s, %s, %s::jsonb)"
            " ON CONFLICT (id) DO UPDATE SET virtual_key = EXCLUDED.virtual_key,"
            " provider_url = EXCLUDED.provider_url, token_hash = EXCLUDED.token_hash,"
            " created_at = EXCLUDED.created_at, limits = EXCLUDED.limits",
            (_check_id(user.id), user.virtual_key, user.provider_url, user.token_hash,
             user.created_at, limits),
        )

    def delete_user(self, user_id: str) -> None:
        self._execute("DELETE FROM users WHERE id = %s", (_check_id(user_id),))

    def user_ids(self) -> list[str]:
        # Byte order, as Python's sorted() gives for the JSON backend, whatever the collation.
        return [row[0] for row in self._rows('SELECT id FROM users ORDER BY id COLLATE "C"')]

    def has_users(self) -> bool:
        return bool(self._rows("SELECT EXISTS (SELECT 1 FROM users)")[0][0])

    # Token hashes (built-in auth)

    def load_token(self, token_hash: str) -> TokenRecord | None:
        rows = self._rows("SELECT user_id FROM tokens WHERE hash = %s", (_check_token_hash(token_hash),))
        return TokenRecord(user_id=rows[0][0]) if rows else None

    def save_token(self, token_hash: str, user_id: str) -> None:
        params = (_check_token_hash(token_hash), _check_id(user_id))
        with self._connection() as conn:
            try:
                conn.execute(
                    "INSERT INTO tokens (hash, user_id) VALUES (%s, %s)"
                    " ON CONFLICT (hash) DO UPDATE SET user_id = EXCLUDED.user_id", params,
                )
            except errors.ForeignKeyViolation:
                raise UserGone(user_id) from None

    def delete_token(self, token_hash: str) -> None:
        self._execute("DELETE FROM tokens WHERE hash = %s", (_check_token_hash(token_hash),))

    # Rooms

    def load_room(self, room_id: str) -> RoomState:
        rows = self._rows("SELECT state::text FROM rooms WHERE id = %s", (_check_id(room_id),))
        if not rows:
            return RoomState()
        try:
            return _room_decoder.decode(rows[0][0])
        except msgspec.DecodeError as exc:
            raise StoreCorrupt(f"row {room_id!r} of table rooms", str(exc)) from None

    def save_room(
        self, room_id: str, state: RoomState, *, owner_must_exist: bool = False, fence: int | None = None,
    ) -> None:
        data = _encoder.encode(state).decode()
        _check_id(room_id)
        sources, params = [], []
        if owner_must_exist:
            sources.append("(SELECT id FROM users WHERE id = %s FOR KEY SHARE) AS owner")
            params.append(room_id)
        if fence is not None:
            sources.append("(SELECT id FROM room_leases WHERE id = %s AND epoch = %s FOR SHARE) AS lease")
            params += [room_id, fence]
        if not sources:
            self._execute(
                "INSERT INTO rooms (id, state) VALUES (%s, %s::json)"
                " ON CONFLICT (id) DO UPDATE SET state = EXCLUDED.state",
                (room_id, data),
            )
            return
        written = self._execute(
            f"INSERT INTO rooms (id, state) SELECT %s, %s::json FROM {', '.join(sources)}"
            " ON CONFLICT (id) DO UPDATE SET state = EXCLUDED.state",
            (room_id, data, *params),
        )
        if written:
            return
        if owner_must_exist and self.load_user(room_id) is None:
            raise UserGone(room_id)
        raise LeaseLost(room_id)

    def delete_room(self, room_id: str) -> None:
        self._execute("DELETE FROM rooms WHERE id = %s", (_check_id(room_id),))

    # Removal

    def remove_user(self, user_id: str) -> None:
        _check_id(user_id)
        with self._connection() as conn, conn.transaction():
            # The user's row first: from here on, room writes that check their owner wait for
            # this transaction and then find no user. Tokens go with it (ON DELETE CASCADE).
            conn.execute("DELETE FROM users WHERE id = %s", (user_id,))
            conn.execute("DELETE FROM rooms WHERE id = %s", (user_id,))
            conn.execute("DELETE FROM usage_days WHERE user_id = %s", (user_id,))
            conn.execute("DELETE FROM reservations WHERE user_id = %s", (user_id,))
            conn.execute("DELETE FROM admissions WHERE user_id = %s", (user_id,))
            # Its fence too: fences come from a sequence, so a room owned again gets a new one.
            conn.execute("DELETE FROM room_leases WHERE id = %s", (user_id,))

    # Usage ledger

    def load_usage(self, user_id: str) -> UsageRecord:
        rows = self._rows(
            "SELECT day::text, requests, prompt_tokens, completion_tokens, total_tokens"
            " FROM usage_days WHERE user_id = %s ORDER BY day DESC LIMIT %s",
            (_check_id(user_id), KEEP_USAGE_DAYS),
        )
        return UsageRecord(days=[UsageDay(*row) for row in reversed(rows)])

    def add_usage(self, user_id: str, days: list[UsageDay], *, owner_must_exist: bool = False) -> None:
        if not days:
            return
        _check_id(user_id)
        with self._connection() as conn, conn.transaction():
            if not self.add_usage_in(conn, user_id, days, owner_must_exist=owner_must_exist):
                raise UserGone(user_id)

    def usage_user_ids(self) -> list[str]:
        return [row[0] for row in self._rows(
            'SELECT user_id FROM usage_days GROUP BY user_id ORDER BY user_id COLLATE "C"'
        )]

    def usage_ledger(self, *, owner_must_exist: bool = False) -> Ledger:
        return PostgresLedger(self, owner_must_exist=owner_must_exist)

    @contextmanager
    def transaction(self) -> Iterator[psycopg.Connection[Any]]:
        """A pooled connection in a transaction, committed at the end of the block (for
        ``pg_ledger``), with the store's error mapping."""
        with self._connection() as conn, conn.transaction():
            yield conn


    def add_usage_in(
        self, conn: psycopg.Connection[Any], user_id: str, days: list[UsageDay], *,
        owner_must_exist: bool = False,
    ) -> bool:
        """``add_usage`` inside the caller's transaction (``pg_ledger``'s settlement); False, and
        nothing written, when ``owner_must_exist`` and the user does not exist."""
        columns = (
            [d.date for d in days], [d.requests for d in days], [d.prompt_tokens for d in days],
            [d.completion_tokens for d in days], [d.total_tokens for d in days],
        )
        if owner_must_exist:
            written = conn.execute(
                "WITH owner AS (SELECT id FROM users WHERE id = %s FOR KEY SHARE)"
                + _ADD_USAGE.format(owner="owner.id", source="owner,") + " RETURNING 1",
                (user_id, *columns),
            ).fetchall()
            if not written:
                return False
        else:
            conn.execute(_ADD_USAGE.format(owner="%s", source=""), (user_id, *columns))
        conn.execute(
            "DELETE FROM usage_days WHERE user_id = %s AND day <= %s::date - %s",
            (user_id, max(d.date for d in days), KEEP_USAGE_DAYS),
        )
        return True
