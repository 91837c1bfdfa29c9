"""The client side of the Atlas WebSocket protocol, shared by ``atlas chat`` and ``atlas ask``.

Every failure a user can meet is a ``ClientError``: one line (``code: message``) and an exit
status, never a traceback::

    ClientError              exit 1: the server or the network said no
    ├── UsageError           exit 2: bad URL, no token, no user id
    └── Closed               the connection ended (``fatal`` when retrying cannot help)

``mapped`` is the one place that turns trio-websocket's and the OS's exceptions into these.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import quote, urlencode, urlsplit, urlunsplit

import httpx
import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    ConnectionTimeout,
    HandshakeError,
    WebSocketConnection,
    open_websocket_url,
)

from atlas.backoff import backoff_delay
from atlas.protocol import (
    CLOSE_ABNORMAL, CLOSE_BAD_ROOM, CLOSE_FORBIDDEN, CLOSE_GOING_AWAY, CLOSE_INTERNAL, CLOSE_NORMAL,
    CLOSE_TOO_BIG, CLOSE_UNAUTHORIZED,
)

DEFAULT_URL = "http://127.0.0.1:1999"
CONNECT_SECONDS = 10.0
# Close codes after which reconnecting with the same token cannot succeed.
FATAL_CLOSE_CODES = {CLOSE_UNAUTHORIZED: "unauthorized", CLOSE_FORBIDDEN: "forbidden", CLOSE_BAD_ROOM: "bad_room_id"}
CLOSE_CODE_NAMES = {
    CLOSE_NORMAL: "closed", CLOSE_GOING_AWAY: "server shutting down", CLOSE_ABNORMAL: "connection dropped",
    CLOSE_TOO_BIG: "message too large", CLOSE_INTERNAL: "server error",
}
WS_SCHEMES = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}


class ClientError(Exception):
    """A failure shown to the user as one line, ``code: message``."""

    exit_status = 1

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

    @classmethod
    def from_error(cls, error: Any) -> ClientError:
        """From the contract's error object ``{"code", "message"}``; a limit's refusal says
        when to come back (``resetAt``, ``retryAfter``) in the reader's own time."""
        if not isinstance(error, Mapping):
            return cls("internal", f"malformed error from the server: {error!r}")
        message = str(error.get("message") or "(no message)")
        if error.get("code") == "quota_exceeded" and isinstance(error.get("resetAt"), str):
            message = message.partition("; the limit resets at")[0] + f"; {when_reset(error['resetAt'])}"
        elif error.get("code") == "rate_limited" and isinstance(error.get("retryAfter"), int):
            message = message.partition("; retry in")[0] + f"; try again in {error['retryAfter']} s"
        return cls(str(error.get("code") or "internal"), message)


class UsageError(ClientError):
    exit_status = 2

    def __init__(self, message: str) -> None:
        super().__init__("usage", message)

    def __str__(self) -> str:
        return self.message


class Closed(ClientError):
    """The connection ended. ``fatal`` closes (bad token, wrong room) are not worth retrying."""

    def __init__(self, code: str, message: str, *, close_code: int | None = None) -> None:
        super().__init__(code, message)
        self.close_code = close_code

    @property
    def fatal(self) -> bool:
        return self.close_code in FATAL_CLOSE_CODES


@dataclass(frozen=True)
class Target:
    """Where to connect and as whom. ``base`` is the http(s) base URL, without a trailing slash."""

    base: str
    token: str
    user: str | None = None

    @property
    def ws_base(self) -> str:
        scheme, _, rest = self.base.partition("://")
        return f"{WS_SCHEMES[scheme]}://{rest}"

    def room_url(self, user: str) -> str:
        query = urlencode({"token": self.token})
        return f"{self.ws_base}/parties/main/{quote(user, safe='')}?{query}"

    def shown(self) -> str:
        """The base URL as shown to the user (it never holds the token)."""
        return self.base


def parse_base_url(value: str) -> str:
    """``http``, ``https``, ``ws`` or ``wss`` URL -> normalised http(s) base URL."""
    text = value.strip()
    parts = urlsplit(text if "://" in text else f"http://{text}")
    scheme = parts.scheme.lower()
    if scheme not in WS_SCHEMES or not parts.hostname:
        raise UsageError(f"invalid URL {value!r}: expected http://HOST:PORT (or https://, ws://, wss://)")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise UsageError(f"invalid URL {value!r}: give only scheme, host, port and path")
    try:
        parts.port
    except ValueError:
        raise UsageError(f"invalid URL {value!r}: the port is not a number from 0 to 65535") from None
    http_scheme = "https" if scheme in ("https", "wss") else "http"
    path = parts.path.rstrip("/")
    for suffix in ("/parties/main", "/party"):  # someone pasted a WebSocket room URL's prefix
        path = path.removesuffix(suffix)
    return urlunsplit((http_scheme, parts.netloc, path, "", ""))


def resolve_target(
    url: str | None, user: str | None, token: str | None, environ: Mapping[str, str] | None = None
) -> Target:
    """Flags first, then ``ATLAS_URL`` / ``ATLAS_USER`` / ``ATLAS_TOKEN``, then defaults."""
    environ = os.environ if environ is None else environ
    base = parse_base_url(url or environ.get("ATLAS_URL") or DEFAULT_URL)
    token = (token or environ.get("ATLAS_TOKEN") or "").strip()
    if not token:
        raise UsageError("no token: pass --token or set ATLAS_TOKEN (`atlas user add` prints one)")
    user = (user or environ.get("ATLAS_USER") or "").strip() or None
    return Target(base=base, token=token, user=user)


async def lookup_user(target: Target) -> str:
    """The user id of ``target.token``, from ``GET /api/me`` (served with built-in auth only)."""
    try:
        async with httpx.AsyncClient(timeout=CONNECT_SECONDS) as http:
            response = await http.get(
                f"{target.base}/api/me", headers={"Authorization": f"Bearer {target.token}"}
            )
    except httpx.HTTPError as exc:
        raise ClientError("unreachable", f"cannot reach {target.shown()}: {describe(exc)}") from None
    if response.status_code == 401:
        raise ClientError("unauthorized", "the server did not accept this token")
    user = None
    if response.status_code == 200:
        try:
            user = response.json().get("id")
        except (ValueError, AttributeError):
            user = None
    if not isinstance(user, str) or not user:
        raise UsageError(
            "no user id: pass --user or set ATLAS_USER (this server does not say whose a token is)"
        )
    return user


def describe(exc: BaseException) -> str:
    """A short human description of a network exception: the innermost OS error's text."""
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        if isinstance(current, BaseExceptionGroup) and current.exceptions:
            current = current.exceptions[0]
        else:
            current = current.__cause__ or current.__context__
    for inner in reversed(seen):
        if isinstance(inner, OSError) and inner.errno:
            return os.strerror(inner.errno).lower()
        if isinstance(inner, OSError) and inner.strerror:
            return inner.strerror.lower()
    return str(exc) or type(exc).__name__


def mapped(exc: BaseException, target: Target) -> ClientError:
    """Library and OS exceptions from connecting -> ``ClientError``."""
    if isinstance(exc, ConnectionRejected):
        hint = " (is this an Atlas server?)" if exc.status_code == 404 else ""
        return ClientError(
            "rejected", f"{target.shown()} refused the WebSocket with HTTP {exc.status_code}{hint}"
        )
    if isinstance(exc, ConnectionClosed):
        return closed_error(exc.reason.code, exc.reason.reason)
    if isinstance(exc, ConnectionTimeout):
        return ClientError("timeout", f"{target.shown()} did not answer in {CONNECT_SECONDS:g}s")
    return ClientError("unreachable", f"cannot reach {target.shown()}: {describe(exc)}")


def closed_error(code: int | None, reason: str | None, error: Any = None) -> Closed:
    if isinstance(error, Mapping) and error.get("code"):
        known = ClientError.from_error(error)
        return Closed(known.code, known.message, close_code=code)
    name = FATAL_CLOSE_CODES.get(code or 0) or "disconnected"
    detail = reason or CLOSE_CODE_NAMES.get(code or 0, "connection closed")
    return Closed(name, f"{detail} (close code {code})", close_code=code)


class Connection:
    """One open WebSocket to a room: JSON frames in and out. ``ready`` is the server's first
    frame. Iterating yields frames until the connection ends, which raises ``Closed``."""

    def __init__(self, ws: WebSocketConnection, target: Target) -> None:
        self._ws = ws
        self._target = target
        self._last_error: Any = None
        self.ready: dict[str, Any] = {}

    async def send(self, message: Mapping[str, Any]) -> None:
        try:
            await self._ws.send_message(json.dumps(message))
        except ConnectionClosed as exc:
            raise closed_error(exc.reason.code, exc.reason.reason, self._last_error) from None

    async def receive(self) -> dict[str, Any]:
        try:
            text = await self._ws.get_message()
        except ConnectionClosed as exc:
            raise closed_error(exc.reason.code, exc.reason.reason, self._last_error) from None
        try:
            frame = json.loads(text)
        except (TypeError, ValueError):
            frame = None
        if not isinstance(frame, dict) or not isinstance(frame.get("type"), str):
            return {"type": "error", "error": {"code": "bad_json", "message": "unreadable frame"}}
        if frame["type"] == "error":
            self._last_error = frame.get("error")
        return frame

    async def wait_ready(self) -> None:
        """Wait for the ``ready`` frame. An ``error`` frame first is a refusal; the close
        follows it and is reported with the server's error code and message."""
        with trio.move_on_after(CONNECT_SECONDS) as scope:
            while True:
                frame = await self.receive()
                if frame["type"] == "ready":
                    self.ready = frame
                    return
                if frame["type"] == "error":
                    refusal = ClientError.from_error(frame.get("error"))
                    with trio.move_on_after(2):
                        with contextlib.suppress(Closed):
                            await self.receive()
                    raise Closed(refusal.code, refusal.message, close_code=self._ws.closed and self._ws.closed.code)
        if scope.cancelled_caught:
            raise ClientError("timeout", f"{self._target.shown()} sent no ready frame")

    def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        return self._frames()

    async def _frames(self) -> AsyncIterator[dict[str, Any]]:
        while True:
            yield await self.receive()


@asynccontextmanager
async def open_connection(target: Target, user: str) -> AsyncIterator[Connection]:
    """Connect to ``user``'s room and wait for ``ready``. A refusal (bad token, wrong room)
    raises ``Closed`` with the server's own error code and message."""
    entered = False
    try:
        async with open_websocket_url(
            target.room_url(user), connect_timeout=CONNECT_SECONDS, disconnect_timeout=2,
            max_message_size=16 * 1024 * 1024, message_queue_size=64,
        ) as ws:
            entered = True
            connection = Connection(ws, target)
            await connection.wait_ready()
            yield connection
    except (HandshakeError, ConnectionClosed, OSError) as exc:
        if entered and isinstance(exc, OSError):
            raise  # not ours: raised by the caller's code, e.g. writing to a closed pipe
        raise mapped(exc, target) from None


def when_reset(reset_at: str, now: float | None = None) -> str:
    """``2025-01-16T00:00:00Z`` -> ``resets in 3 h 12 min (Thu 16 Jan 01:00 local time)``."""
    try:
        moment = datetime.fromisoformat(reset_at.replace("Z", "+00:00"))
    except ValueError:
        return f"resets at {reset_at}"
    seconds = max(0, int(moment.timestamp() - (time.time() if now is None else now)))
    days, rest = divmod(seconds, 86400)
    hours, minutes = rest // 3600, rest % 3600 // 60
    span = f"{days} d {hours} h" if days else f"{hours} h {minutes} min" if hours else f"{max(1, minutes)} min"
    return f"resets in {span} ({moment.astimezone().strftime('%a %d %b %H:%M')} local time)"


def backoff(first: float = 0.5, factor: float = 1.6, cap: float = 10.0) -> Iterator[float]:
    """Reconnect delays, by the one backoff rule (``atlas.backoff``)."""
    for attempt in itertools.count():
        yield backoff_delay(attempt, first=first, factor=factor, cap=cap)
