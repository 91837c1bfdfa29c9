"""JSON-on-disk store under the data directory, one small file per thing.

    DATA_DIR/                      0700
      users/{userId}.json          built-in auth: the user's virtual key, provider URL, token hash
      tokens/{sha256(token)}.json  built-in auth: which user a token hash belongs to
      rooms/{roomId}.json          a room's state: preferences and conversations
      usage/{userId}.json          the user's usage ledger: one entry per UTC day (bounded)...
      usage/{userId}+{gen}.log     ...and what was added since, one line per write (append only)

Nothing is read at start-up: a file is read the first time its user is used, so start-up cost does
not grow with the number of users. Every write is atomic and durable: a uniquely named temporary
file is written, flushed and fsynced, renamed over the old file, and the directory is fsynced, so a
crash at any moment leaves either the old or the new file, never a torn one. Files are 0600.

A file that exists but cannot be read or decoded raises ``StoreCorrupt`` naming its path; it is
never replaced silently, and other users' files are unaffected.

Writers and removals meet at ``DATA_DIR/.lock`` (``flock``), across every process that uses the
directory (``atlas serve`` and the ``atlas user`` commands): each write holds it shared, so writes
run side by side; removing a user and clearing crash leftovers hold it exclusive, so no write is
half-done meanwhile. That is what makes "a room write for a removed user is refused" hold when
the removal comes from another process, and what makes every ``.*.tmp`` file seen under the
exclusive lock a leftover of a crash (it can hold a room's data, so it is deleted).

The functions here block (file I/O, fsync); async callers run them off the event loop: the reads
of every new connection and the usage settlements on threads of their own (``read``,
``serial_thread``), the rest with ``trio.to_thread``.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import secrets
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from atlas.store.base import Ledger
from atlas.store.leases import LocalLeases
from atlas.store.ledger import ProcessLedger
from atlas.store.records import (
    RoomState,
    StoreCorrupt,
    StoreUnavailable,
    TokenRecord,
    UsageDay,
    UsageRecord,
    UserGone,
    UserRecord,
    add_usage_days,
    is_valid_user_id,
)
from atlas.store.serial_thread import SerialThread

T = TypeVar("T")

_encoder = msgspec.json.Encoder()
_usage_line_decoder = msgspec.json.Decoder(list[UsageDay])
_TOKEN_HASH = re.compile(r"[0-9a-f]{64}")
_OUT_OF_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOMEM}
# Users whose usage log a store keeps open (the users settling requests now, in practice); few,
# as each is a file descriptor the process cannot use for a connection.
MAX_OPEN_USAGE_LOGS = 64


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old or the new content."""
    directory = path.parent
    temporary = directory / f".{path.name}.{secrets.token_hex(6)}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_directory(directory)


def fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_struct(path: Path | str, kind: type[T]) -> T | None:
    """The decoded file, None when it does not exist, StoreCorrupt when it cannot be used."""
    data = read_file(path)
    if data is None:
        return None
    try:
        return msgspec.json.decode(data, type=kind)
    except msgspec.DecodeError as exc:
        raise StoreCorrupt(Path(path), str(exc)) from None


def read_file(path: Path | str) -> bytes | None:
    """The file's bytes, None when it does not exist, StoreCorrupt when it cannot be read.

    With ``os`` calls rather than ``pathlib`` and ``open()``: these reads run on the store's
    read thread for every new connection, and each Python step there holds the GIL the event loop
    needs (pathlib's joins and ``read_bytes`` were ~40% of that thread's time)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno in _OUT_OF_RESOURCES:  # this process, not the file: try again later
            raise StoreUnavailable(f"cannot open {path}: {exc.strerror}") from None
        raise StoreCorrupt(Path(path), exc.strerror or str(exc)) from None
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
    except OSError as exc:
        raise StoreCorrupt(Path(path), exc.strerror or str(exc)) from None
    finally:
        os.close(fd)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


class JsonStore:
    """The embedded backend: small JSON files under the data directory."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.users_dir = data_dir / "users"
        self.tokens_dir = data_dir / "tokens"
        self.rooms_dir = data_dir / "rooms"
        self.usage_dir = data_dir / "usage"
        # The same directories as strings, for the reads of every new connection (``_path``).
        self._users = os.fspath(self.users_dir)
        self._tokens = os.fspath(self.tokens_dir)
        self._rooms = os.fspath(self.rooms_dir)
        self._usage = os.fspath(self.usage_dir)
        # Usage logs kept open for appending, least recently used first (``_usage_log``).
        self._usage_logs: OrderedDict[str, _OpenLog] = OrderedDict()
        self._usage_lock = threading.Lock()
        self._usage_lock_fd: int | None = None
        self._reads = SerialThread("atlas json store reads")

    @property
    def location(self) -> str:
        return f"data directory {self.data_dir}"

    def close(self) -> None:
        with self._usage_lock:
            while self._usage_logs:
                _, log = self._usage_logs.popitem()
                os.close(log.fd)
            if self._usage_lock_fd is not None:
                os.close(self._usage_lock_fd)
                self._usage_lock_fd = None

    async def read(self, fn: Callable[..., T], *args: Any) -> T:
        return await self._reads.run(fn, *args)

    def room_leases(self) -> LocalLeases:
        """One process owns the data directory, and with it every room."""
        return LocalLeases()

    def prepare(self) -> None:
        for directory in (self.data_dir, self.users_dir, self.tokens_dir, self.rooms_dir, self.usage_dir):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        with self._locked(exclusive=True):
            for directory in (self.users_dir, self.tokens_dir, self.rooms_dir, self.usage_dir):
                self._remove_leftovers(directory, "*")

    @contextmanager
    def _locked(self, *, exclusive: bool) -> Iterator[None]:
        fd = os.open(self.data_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    @contextmanager
    def _usage_shared_lock(self) -> Iterator[None]:
        """``_locked(exclusive=False)`` for usage appends, on a descriptor kept open for them
        (two system calls a settlement fewer). Callers hold ``_usage_lock``: a flock belongs to
        the open file, so two threads must not share one."""
        if self._usage_lock_fd is None:
            self._usage_lock_fd = os.open(self.data_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._usage_lock_fd, fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(self._usage_lock_fd, fcntl.LOCK_UN)

    @staticmethod
    def _remove_leftovers(directory: Path, stem: str) -> None:
        """Temporary files of writes that a crash interrupted (callers hold the lock exclusive,
        so no write is in progress)."""
        removed = False
        for leftover in directory.glob(f".{stem}.json.*.tmp"):
            leftover.unlink(missing_ok=True)
            removed = True
        if removed:
            fsync_directory(directory)

    def _file(self, directory: Path, name: str) -> Path:
        return Path(self._path(os.fspath(directory), name))

    @staticmethod
    def _path(directory: str, name: str) -> str:
        """``{directory}/{name}.json``, as a string (the hot reads use it as it is)."""
        # Ids are validated against USER_ID_PATTERN before they get here; the check is repeated
        # because a path built from an unchecked id could escape the data directory.
        if not is_valid_user_id(name):
            raise ValueError(f"invalid id {name!r}")
        return f"{directory}/{name}.json"

    def _write(self, path: Path, value: Any, *, owner: str | None = None) -> None:
        """Write ``path`` atomically; with ``owner``, only while that user exists."""
        data = _encoder.encode(value)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with self._locked(exclusive=False):
            if owner is not None and not self.user_path(owner).exists():
                raise UserGone(owner)
            write_atomic(path, data)

    # Users (built-in auth)

    def user_path(self, user_id: str) -> Path:
        return self._file(self.users_dir, user_id)

    def load_user(self, user_id: str) -> UserRecord | None:
        return read_struct(self._path(self._users, user_id), UserRecord)

    def save_user(self, user: UserRecord) -> None:
        self._write(self.user_path(user.id), user)

    def delete_user(self, user_id: str) -> None:
        self.user_path(user_id).unlink(missing_ok=True)
        fsync_directory(self.users_dir)

    def user_ids(self) -> list[str]:
        return _ids_in(self.users_dir)

    def has_users(self) -> bool:
        if not self.users_dir.is_dir():
            return False
        with os.scandir(self.users_dir) as entries:  # closed even when any() stops early
            return any(entry.name.endswith(".json") and not entry.name.startswith(".") for entry in entries)

    # Tokens (built-in auth): the file name is the token's SHA-256, the token itself is never stored.

    def token_path(self, token_hash: str) -> Path:
        return Path(self._token_path(token_hash))

    def _token_path(self, token_hash: str) -> str:
        if not _TOKEN_HASH.fullmatch(token_hash):
            raise ValueError("not a token hash")
        return f"{self._tokens}/{token_hash}.json"

    def load_token(self, token_hash: str) -> TokenRecord | None:
        return read_struct(self._token_path(token_hash), TokenRecord)

    def save_token(self, token_hash: str, user_id: str) -> None:
        self._write(self.token_path(token_hash), TokenRecord(user_id=user_id), owner=user_id)

    def delete_token(self, token_hash: str) -> None:
        self.token_path(token_hash).unlink(missing_ok=True)
        fsync_directory(self.tokens_dir)

    # Rooms

    def room_path(self, room_id: str) -> Path:
        return self._file(self.rooms_dir, room_id)

    def load_room(self, room_id: str) -> RoomState:
        return read_struct(self._path(self._rooms, room_id), RoomState) or RoomState()

    def save_room(
        self, room_id: str, state: RoomState, *, owner_must_exist: bool = False, fence: int | None = None,
    ) -> None:
        # One process owns the data directory: its leases carry no fence (LocalLeases).
        self._write(self.room_path(room_id), state, owner=room_id if owner_must_exist else None)

    def delete_room(self, room_id: str) -> None:
        path = self.room_path(room_id)
        if path.exists():
            path.unlink(missing_ok=True)
            fsync_directory(self.rooms_dir)

    # Removal

    def _delete_tokens_of(self, user_id: str) -> None:
        """Every token file naming the user, not only the current one: a rotation that a crash
        interrupted can leave another. Reads every token file; removals are rare."""
        for path in self.tokens_dir.glob("*.json"):
            if path.name.startswith("."):
                continue
            try:
                record = read_struct(path, TokenRecord)
            except StoreCorrupt:
                continue  # whose it is cannot be told; the lookup refuses it anyway
            if record is not None and record.user_id == user_id:
                path.unlink(missing_ok=True)
        fsync_directory(self.tokens_dir)

    def remove_user(self, user_id: str) -> None:
        with self._locked(exclusive=True):
            try:
                user = self.load_user(user_id)
            except StoreCorrupt:
                user = None  # removed all the same; a token file left behind names no user
            if user is not None and user.token_hash:
                self.delete_token(user.token_hash)
            self._delete_tokens_of(user_id)
            self.delete_user(user_id)
            self.delete_room(user_id)
            usage = [self.usage_path(user_id), *self.usage_dir.glob(f"{user_id}+*.log")]
            if any(path.exists() for path in usage):
                for path in usage:
                    path.unlink(missing_ok=True)
                fsync_directory(self.usage_dir)
            for directory in (self.users_dir, self.rooms_dir, self.usage_dir):
                # User ids hold no glob characters (USER_ID_PATTERN).
                self._remove_leftovers(directory, user_id)

    # Usage ledger: written by the one server process on this data directory (``usage_ledger``),
    # read by ``atlas usage``. A write appends one line to ``{user}+{gen}.log``, opened with
    # O_DSYNC and kept open (a settlement per request must be cheap: one write, no new file, no
    # rename, no directory fsync); the log is folded into ``{user}.json`` (generation gen + 1)
    # once it grows past COMPACT_BYTES, after which the old log is deleted. A crash between the two leaves a log of an older
    # generation, which is ignored; a crash mid-append leaves a line without its newline, which
    # was never acknowledged: it is ignored when read and cut off before the next append.

    COMPACT_BYTES = 32 * 1024

    def usage_path(self, user_id: str) -> Path:
        return self._file(self.usage_dir, user_id)

    def usage_log_path(self, user_id: str, generation: int) -> Path:
        return Path(self._usage_log_path(user_id, generation))

    def _usage_log_path(self, user_id: str, generation: int) -> str:
        self._path(self._usage, user_id)  # checks the id
        # "+" is not in USER_ID_PATTERN: no user's file name can be another's log.
        return f"{self._usage}/{user_id}+{generation}.log"

    def load_usage(self, user_id: str) -> UsageRecord:
        record = read_struct(self._path(self._usage, user_id), UsageRecord) or UsageRecord()
        log = self._usage_log_path(user_id, record.generation)
        data = read_file(log)
        if data is None:
            return record
        added: list[UsageDay] = []
        for line in data.split(b"\n")[:-1]:  # the part after the last newline was never acknowledged
            try:
                added += _usage_line_decoder.decode(line)
            except msgspec.DecodeError as exc:
                raise StoreCorrupt(Path(log), str(exc)) from None
        return add_usage_days(record, added)

    def add_usage(self, user_id: str, days: list[UsageDay], *, owner_must_exist: bool = False) -> None:
        if not days:
            return
        line = _encoder.encode(days) + b"\n"
        with self._usage_lock, self._usage_shared_lock():
            if owner_must_exist and not os.path.exists(self._path(self._users, user_id)):
                raise UserGone(user_id)
            log = self._usage_log(user_id)
            try:
                written = os.write(log.fd, line)  # O_DSYNC: on disk when it returns
            except BaseException:
                self._forget_usage_log(user_id)  # the next open cuts what may be half-written
                raise
            if written != len(line):
                self._forget_usage_log(user_id)
                raise OSError(f"usage log of {user_id}: {written} of {len(line)} bytes written")
            if not log.size:  # a new log: its directory entry must be durable too
                fsync_directory(self.usage_dir)
            log.size += written
            if log.size > self.COMPACT_BYTES:
                self._forget_usage_log(user_id)
                self._compact_usage(user_id, log.generation)

    def _usage_log(self, user_id: str) -> _OpenLog:
        """The user's current log, open for appending. Kept open between writes (a settlement
        per request must be cheap: one write, no open, no read of the record); a log that was
        deleted meanwhile (its user removed, maybe added again) is let go and the current one
        opened. Callers hold ``_usage_lock`` and the data directory's lock."""
        log = self._usage_logs.get(user_id)
        if log is not None:
            if os.fstat(log.fd).st_nlink:
                self._usage_logs.move_to_end(user_id)
                return log
            self._forget_usage_log(user_id)
        record = read_struct(self._path(self._usage, user_id), UsageRecord)
        generation = record.generation if record is not None else 0
        self.usage_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(
            self._usage_log_path(user_id, generation),
            os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_DSYNC, 0o600,
        )
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                _cut_torn_line(fd, size)  # made durable by the next write (O_DSYNC)
                size = os.fstat(fd).st_size
        except BaseException:
            os.close(fd)
            raise
        log = self._usage_logs[user_id] = _OpenLog(fd, generation, size)
        while len(self._usage_logs) > MAX_OPEN_USAGE_LOGS:
            _, oldest = self._usage_logs.popitem(last=False)
            os.close(oldest.fd)
        return log

    def _forget_usage_log(self, user_id: str) -> None:
        log = self._usage_logs.pop(user_id, None)
        if log is not None:
            os.close(log.fd)

    def _compact_usage(self, user_id: str, generation: int) -> None:
        """Fold the log into the record of the next generation, then delete the log. The ledger
        writes one user's usage at a time, so no append comes in between."""
        record = self.load_usage(user_id)
        record = UsageRecord(days=record.days, generation=generation + 1)
        write_atomic(self.usage_path(user_id), _encoder.encode(record))
        self.usage_log_path(user_id, generation).unlink(missing_ok=True)
        fsync_directory(self.usage_dir)

    def usage_user_ids(self) -> list[str]:
        if not self.usage_dir.is_dir():
            return []
        names = {p.stem for p in self.usage_dir.glob("*.json") if not p.name.startswith(".")}
        names |= {p.name.partition("+")[0] for p in self.usage_dir.glob("*+*.log")}
        return sorted(names)

    def usage_ledger(self, *, owner_must_exist: bool = False) -> Ledger:
        return ProcessLedger(self, owner_must_exist=owner_must_exist)


class _OpenLog:
    __slots__ = ("fd", "generation", "size")

    def __init__(self, fd: int, generation: int, size: int) -> None:
        self.fd = fd
        self.generation = generation
        self.size = size


def _cut_torn_line(fd: int, size: int) -> None:
    """Drop what follows the log's last newline: a write that a crash cut short."""
    tail = os.pread(fd, min(size, 1024 * 1024), max(0, size - 1024 * 1024))
    end = tail.rfind(b"\n")
    os.ftruncate(fd, size - len(tail) + end + 1 if end >= 0 else max(0, size - len(tail)))


def _ids_in(directory: Path) -> list[str]:
    if not directory.is_dir():
        return []
    return sorted(path.stem for path in directory.glob("*.json") if not path.name.startswith("."))
