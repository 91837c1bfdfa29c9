"""Room leases on PostgreSQL: a session-level advisory lock per room, on one dedicated connection.

Each process keeps one connection of its own for its leases, outside the store's pool (a
session-level lock belongs to the connection that took it, and a pool would hand that connection
to anyone). Taking a room's lease is one statement on it:

    pg_try_advisory_lock(key)            key: a 64-bit hash of the room id (``room_key``)
    room_leases[id].epoch = nextval()    only if the lock was granted: the lease's fence

PostgreSQL releases every lock of a session when the session ends, so a process that dies (even
by ``kill -9``) frees its rooms as soon as its connection drops, with nothing to clean up.
A room write carries its lease's fence (``PostgresStore.save_room(fence=)``) and is refused
unless the fence is still the room's current one, so even a process that has not yet noticed
that its session is gone cannot overwrite what the room's next owner acknowledged.

Driver: psycopg's libpq connection (``psycopg.pq.PGconn``) in non-blocking mode, driven by trio
(``wait_readable``/``wait_writable``) rather than psycopg's sync API in worker threads. The reason
is the idle connection: a worker thread only learns that the session is gone at its next query,
while a task waiting for the socket to become readable learns it at once (the server's goodbye
on a restart, the end of the stream when it dies), and the same wait delivers the notifications
of ``LISTEN`` (the hand-off below) without polling. One reader task owns the socket's read side;
queries go one at a time (a ``trio.Lock``), each waits for its results from the reader. Only the
connection attempt runs in a worker thread (``psycopg.connect`` resolves names and waits without
holding the GIL); then its ``pgconn`` is used directly.

When the session is lost (the reader sees an error or the end of the stream, a query goes
unanswered for ``ANSWER_SECONDS``, a heartbeat fails), every lease taken on it is lost at once
(their shared ``lost`` event), the connection is closed, and a new one is opened with backoff;
leases taken on the new session are new leases. Meanwhile ``acquire`` raises
``StoreUnavailable``. A heartbeat (``SELECT 1`` after ``HEARTBEAT_SECONDS`` of silence) notices a
database that went silent (a network cut), and asks the server to watch the connection with TCP
keepalives too (``tcp_keepalives_*``), so that after a cut the server frees the locks within
about ``KEEPALIVE_SECONDS``, after this process has already given its rooms up.

Hand-off: the session listens on ``atlas_room_wanted``. A process that refuses a connection for
a room another process owns says so there (``want``); the owner may then give the room up, so
that its clients reconnect to where the load balancer now sends them (rooms.py decides).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import psycopg
import trio
from psycopg import pq
from psycopg.conninfo import conninfo_to_dict

from atlas.backoff import backoff_delay
from atlas.store.leases import Lease
from atlas.store.records import StoreError, StoreUnavailable

log = logging.getLogger("atlas.store.leases")

HEARTBEAT_SECONDS = 1.0  # a round trip at least this often, or the session is checked
ANSWER_SECONDS = 3.0  # a query unanswered this long: the session is treated as lost
HEALTH_SECONDS = 1.0  # a heartbeat answer this late still says the database is reachable
RECONNECT_FIRST, RECONNECT_CAP = 0.1, 2.0  # backoff between connection attempts, in seconds
# The server's side of the watch: a silent peer is dropped after idle + interval * count seconds.
KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_COUNT = 5, 2, 3
KEEPALIVE_SECONDS = KEEPALIVE_IDLE + KEEPALIVE_INTERVAL * KEEPALIVE_COUNT
WANTED_CHANNEL = "atlas_room_wanted"
WANTED_BUFFER = 256  # notifications not yet handled; more are dropped (a hand-off is best effort)

ACQUIRE = b"""WITH attempt AS (SELECT pg_try_advisory_lock($1::bigint) AS granted)
INSERT INTO room_leases AS lease (id, epoch)
SELECT $2::text, nextval('room_lease_epochs') FROM attempt WHERE granted
ON CONFLICT (id) DO UPDATE SET epoch = EXCLUDED.epoch
RETURNING epoch"""
UNLOCK = b"SELECT pg_advisory_unlock($1::bigint)"
PING = b"SELECT 1"
LISTEN = f"LISTEN {WANTED_CHANNEL}".encode()
NOTIFY = f"SELECT pg_notify('{WANTED_CHANNEL}', $1::text)".encode()


def room_key(room_id: str) -> int:
    """The advisory lock key of a room: 64 bits of a hash of its id, so that two rooms share a
    lock with odds of about n²/2⁶⁵ (one in ~3.7 million for 100,000 rooms), unlike the 32 bits of
    ``hashtext``, which collide within a few tens of thousands of rooms."""
    digest = hashlib.blake2b(room_id.encode(), digest_size=8, person=b"atlas-room").digest()
    return int.from_bytes(digest, "big", signed=True)


class _Answer:
    __slots__ = ("results", "error", "done")

    def __init__(self) -> None:
        self.results: list[pq.abc.PGresult] = []
        self.error: str | None = None
        self.done = trio.Event()


class _Session:
    """One connection and what was taken on it."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.conn = conn
        self.pgconn = conn.pgconn
        self.fd = self.pgconn.socket
        self.lost = trio.Event()
        self.reason = ""
        self.turn = trio.Lock()  # one query at a time
        self.answer: _Answer | None = None
        self.last_answer = trio.current_time()
        self.scope = trio.CancelScope()
        self.unlocks: list[int] = []
        self.unlock_wanted = trio.Event()
        self.closed = False


class PostgresLeases:
    """Room leases for the processes sharing one PostgreSQL database (see the module's text)."""

    def __init__(
        self, url: str, *, location: str, scrub: Callable[[str], str], connect_timeout: int,
        options: dict[str, Any] | None = None,
    ) -> None:
        self._url = url
        self._location = location
        self._scrub = scrub
        self._options = self._connection_options(url, connect_timeout, options or {})
        self._session: _Session | None = None
        self._wanted_send, self._wanted_receive = trio.open_memory_channel[str](WANTED_BUFFER)
        self.sessions = 0  # how many sessions were opened (tests and logs)

    @staticmethod
    def _connection_options(url: str, connect_timeout: int, given: dict[str, Any]) -> dict[str, Any]:
        params = conninfo_to_dict(url)
        watch = (
            f"-c tcp_keepalives_idle={KEEPALIVE_IDLE} -c tcp_keepalives_interval={KEEPALIVE_INTERVAL}"
            f" -c tcp_keepalives_count={KEEPALIVE_COUNT}"
        )
        options: dict[str, Any] = {
            "autocommit": True,
            "options": f"{params['options']} {watch}" if params.get("options") else watch,
        }
        if "connect_timeout" not in params:
            options["connect_timeout"] = connect_timeout
        if "application_name" not in params:
            options["application_name"] = "atlas leases"
        return {**options, **given}

    # The session

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> NoReturn:
        attempt = 0
        reported = False
        try:
            while True:
                try:
                    session = await self._connect()
                except StoreUnavailable as exc:
                    if attempt == 0:
                        log.error("room leases: %s; trying again until it answers", exc)
                else:
                    if self.sessions:
                        log.warning("room leases: connected to %s again; rooms can be served", self._location)
                    self.sessions += 1
                    attempt = 0
                    self._session = session
                    if not reported:
                        task_status.started()
                        reported = True
                    try:
                        with session.scope:
                            async with trio.open_nursery() as nursery:
                                nursery.start_soon(self._read, session)
                                nursery.start_soon(self._heartbeat, session)
                                nursery.start_soon(self._unlock, session)
                    finally:
                        self._end(session, session.reason or "shutting down")
                    log.error(
                        "room leases: lost the connection to %s (%s): every room of this process "
                        "is given up; connecting again", self._location, session.reason,
                    )
                if not reported:
                    task_status.started()
                    reported = True
                await trio.sleep(backoff_delay(attempt, first=RECONNECT_FIRST, factor=2, cap=RECONNECT_CAP))
                attempt += 1
        finally:
            self._session = None

    async def _connect(self) -> _Session:
        try:
            conn = await trio.to_thread.run_sync(self._open, abandon_on_cancel=True)
        except psycopg.Error as exc:
            raise self._unavailable(str(exc)) from None
        try:
            conn.pgconn.nonblocking = 1
            return _Session(conn)
        except BaseException:
            conn.close()
            raise

    def _open(self) -> psycopg.Connection[Any]:
        """In a worker thread: connect, and listen for hand-off requests."""
        conn = psycopg.connect(self._url, **self._options)
        try:
            conn.execute(LISTEN)
        except BaseException:
            conn.close()
            raise
        return conn

    def _end(self, session: _Session, reason: str) -> None:
        if self._session is session:
            self._session = None
        if not session.reason:
            session.reason = reason
        session.lost.set()
        if session.answer is not None:
            session.answer.error = session.reason
            session.answer.done.set()
            session.answer = None
        # Cancelled first: a task of the session waiting for the socket gets Cancelled, not
        # the ClosedResourceError that notify_closing gives to waiters left (a shielded query).
        session.scope.cancel()
        if not session.closed:
            session.closed = True
            trio.lowlevel.notify_closing(session.fd)
            session.conn.close()  # ends the session: PostgreSQL releases its locks
            session.pgconn.finish()  # (close() skips it when the connection is already broken)

    def _lose(self, session: _Session, reason: str) -> None:
        if not session.lost.is_set():
            self._end(session, self._scrub(reason))

    async def _read(self, session: _Session) -> None:
        """Own the socket's read side: results for the query in flight, notifications, and the
        news that the session is gone."""
        pgconn = session.pgconn
        while True:
            await trio.lowlevel.wait_readable(session.fd)
            try:
                pgconn.consume_input()
            except psycopg.OperationalError as exc:
                self._lose(session, _first_line(str(exc)) or "the connection was closed")
                return
            while (notify := pgconn.notifies()) is not None:
                self._wanted(notify.extra.decode(errors="replace"))
            answer = session.answer
            while answer is not None and not pgconn.is_busy():
                result = pgconn.get_result()
                if result is None:
                    session.answer = None
                    session.last_answer = trio.current_time()
                    answer.done.set()
                    break
                answer.results.append(result)
            if pgconn.status != pq.ConnStatus.OK:
                self._lose(session, _first_line(pgconn.get_error_message()) or "the connection broke")
                return

    async def _heartbeat(self, session: _Session) -> None:
        while True:
            await trio.sleep_until(session.last_answer + HEARTBEAT_SECONDS)
            if trio.current_time() - session.last_answer >= HEARTBEAT_SECONDS:
                try:
                    await self._ask(session, PING, ())
                except StoreError as exc:
                    self._lose(session, str(exc))  # lost already, or answers nonsense: start over
                    return

    async def _unlock(self, session: _Session) -> None:
        while True:
            await session.unlock_wanted.wait()
            session.unlock_wanted = trio.Event()
            while session.unlocks:
                key = session.unlocks.pop(0)
                try:
                    await self._ask(session, UNLOCK, (str(key).encode(),))
                except StoreError as exc:
                    self._lose(session, str(exc))  # a lock that cannot be released goes with its session
                    return

    async def _ask(
        self, session: _Session, sql: bytes, params: Sequence[bytes | None], *,
        timeout: float = ANSWER_SECONDS,
    ) -> list[pq.abc.PGresult]:
        """Run one statement on the session and return its results. A statement once sent is
        seen through (shielded; bounded by ``timeout``, after which the session is lost)."""
        with trio.CancelScope(shield=True):
            async with session.turn:
                if session.lost.is_set():
                    raise self._unavailable(session.reason)
                answer = _Answer()
                session.answer = answer
                pgconn = session.pgconn
                try:
                    pgconn.send_query_params(sql, list(params) or None)
                    while pgconn.flush():
                        await trio.lowlevel.wait_writable(session.fd)
                except (psycopg.OperationalError, OSError, trio.ClosedResourceError) as exc:
                    self._lose(session, _first_line(str(exc)) or "the connection broke")
                    raise self._unavailable(session.reason) from None
                with trio.move_on_after(timeout):
                    await answer.done.wait()
                if not answer.done.is_set():
                    self._lose(session, f"no answer within {timeout:g} s")
                if answer.error is not None:
                    raise self._unavailable(answer.error)
        for result in answer.results:
            if result.status not in (pq.ExecStatus.TUPLES_OK, pq.ExecStatus.COMMAND_OK):
                primary = result.error_field(pq.DiagnosticField.MESSAGE_PRIMARY) or b"error"
                sqlstate = (result.error_field(pq.DiagnosticField.SQLSTATE) or b"").decode()
                message = self._scrub(primary.decode(errors="replace"))
                if sqlstate.startswith(("08", "57")):  # connection exception, operator intervention
                    raise self._unavailable(message)
                raise StoreError(f"{self._location}: {message} ({sqlstate})")
        return answer.results

    def _unavailable(self, reason: str) -> StoreUnavailable:
        return StoreUnavailable(f"{self._location} is unavailable: {self._scrub(_first_line(reason))}")

    def _live(self) -> _Session:
        session = self._session
        if session is None or session.lost.is_set():
            raise StoreUnavailable(f"{self._location} is unavailable: no session for room leases")
        return session

    # RoomLeases

    async def acquire(self, room_id: str) -> Lease | None:
        session = self._live()
        key = str(room_key(room_id)).encode()
        try:
            results = await self._ask(session, ACQUIRE, (key, room_id.encode()))
        except StoreUnavailable:
            raise
        except StoreError:
            # A session-level lock taken by a statement that failed afterwards stays taken.
            self._queue_unlock(session, int(key))
            raise
        rows = [r for r in results if r.ntuples]
        if not rows:
            return None
        fence = int(rows[0].get_value(0, 0) or b"0")
        return Lease(room_id, fence, session.lost)

    def release(self, lease: Lease) -> None:
        session = self._session
        if session is None or session.lost is not lease.lost or session.lost.is_set():
            return  # its session is gone, and its lock with it
        self._queue_unlock(session, room_key(lease.room_id))

    def _queue_unlock(self, session: _Session, key: int) -> None:
        session.unlocks.append(key)
        session.unlock_wanted.set()

    async def healthy(self) -> bool:
        """The heartbeat is the health check: an idle session runs ``SELECT 1`` every second, so
        an answer (to it or to any lease statement) less than ``HEALTH_SECONDS`` past that says
        the database answers. A storm of health checks never reaches the database."""
        session = self._session
        if session is None or session.lost.is_set():
            return False
        return trio.current_time() - session.last_answer < HEARTBEAT_SECONDS + HEALTH_SECONDS

    async def wait_wanted(self) -> str:
        return await self._wanted_receive.receive()

    def _wanted(self, room_id: str) -> None:
        try:
            self._wanted_send.send_nowait(room_id)
        except trio.WouldBlock:
            pass

    async def want(self, room_id: str) -> None:
        try:
            session = self._live()
            await self._ask(session, NOTIFY, (room_id.encode(),))
        except StoreError as exc:
            log.debug("room %s: could not ask its owner to hand it over: %s", room_id, exc)


def _first_line(text: str | bytes | None) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    text = (text or "").strip()
    return text.splitlines()[0] if text else ""

