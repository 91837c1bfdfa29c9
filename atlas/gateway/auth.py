"""Token verification: one verifier (cache, single flight, call cap, failure limits) in front of
one of two lookups.

With ``ATLAS_AUTH_URL`` the auth API is external: ``GET {auth}/api/me`` with ``Authorization:
Bearer`` (``AuthApi``). Without it the store is read directly (``BuiltinLookup``, the users' and
tokens' records): the same answer the built-in ``/api/me`` below gives on the public port, without
building and parsing an HTTP exchange for every token the cache does not hold (about 0.3 ms of
CPU each, measured against 20 us for the lookup itself).

Errors:
    AuthError
    ├── Unauthorized      401 / WebSocket 4001: missing, unknown or revoked token
    └── AuthUnavailable   503 / WebSocket 1011: the auth API is down, slow or answers nonsense
        └── AuthStoreUnavailable   the built-in auth's store (the database) cannot be reached

``admit`` is the one door to a room, for WebSocket and HTTP alike (``authenticate`` is the same
door for the ``/v1`` routes, which name no room): it raises ``AccessDenied`` carrying both the
HTTP status and the WebSocket close code of the refusal.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import httpx
import msgspec
import trio

from atlas.asgi import query_param
from atlas.config import Settings
from atlas.protocol import (
    CLOSE_BAD_ROOM, CLOSE_FORBIDDEN, CLOSE_GOING_AWAY, CLOSE_INTERNAL, CLOSE_POLICY, CLOSE_UNAUTHORIZED,
)
from atlas.store import (
    Identity, Store, StoreError, StoreUnavailable, hash_token, is_valid_user_id,
)

log = logging.getLogger("atlas.gateway.auth")

CACHE_LIMIT = 100_000


class AuthError(Exception):
    code = "internal"
    status = 500


class Unauthorized(AuthError):
    code = "unauthorized"
    status = 401


class AuthUnavailable(AuthError):
    code = "auth_unavailable"
    status = 503


class TooManyFailures(AuthError):
    code = "rate_limited"
    status = 429

    def __init__(self, retry_after: float) -> None:
        super().__init__("too many failed token checks from this address; try again later")
        self.retry_after = retry_after


class AuthStoreUnavailable(AuthUnavailable):
    """Built-in auth only: the store it reads is unavailable; the client hears the store's code."""

    code = "store_unavailable"


class AccessDenied(Exception):
    """A request may not use a room. ``code``/``message`` go to the client in the error body."""

    def __init__(
        self, code: str, message: str, *, status: int, close_code: int, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status
        self.close_code = close_code
        self.retry_after = retry_after


class _Lookup:
    """One auth call that concurrent verifications of the same token wait for."""

    __slots__ = ("done", "result", "error")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.result: Identity | None = None
        self.error: AuthError | None = None


class FailureLimiter:
    """Failed token checks per client address: ``burst`` allowed at once, refilled at ``burst``
    per minute; an address with none left is refused (429, ``Retry-After``) without an auth call.
    ``burst`` 0 turns it off. At most ``MAX_ADDRESSES`` addresses are remembered (oldest first
    out), so an attacker with many addresses cannot grow it without bound."""

    MAX_ADDRESSES = 10_000

    def __init__(self, burst: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.burst = burst
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # address -> (tokens, at)

    def _tokens(self, address: str) -> float:
        tokens, at = self._buckets.get(address, (float(self.burst), self._clock()))
        return min(float(self.burst), tokens + (self._clock() - at) * self.burst / 60.0)

    def check(self, address: str) -> None:
        if self.burst <= 0 or address not in self._buckets:
            return
        tokens = self._tokens(address)
        if tokens < 1.0:
            raise TooManyFailures(retry_after=(1.0 - tokens) * 60.0 / self.burst)

    def record(self, address: str) -> None:
        if self.burst <= 0:
            return
        self._buckets[address] = (self._tokens(address) - 1.0, self._clock())
        self._buckets.move_to_end(address)
        while len(self._buckets) > self.MAX_ADDRESSES:
            self._buckets.popitem(last=False)


STORE_UNREADABLE = AccessDenied(
    "internal", "this room's stored state is unreadable; the server log names the file",
    status=500, close_code=CLOSE_INTERNAL,
)


STORE_UNAVAILABLE = AccessDenied(
    "store_unavailable", "the store (database) is unavailable; try again shortly",
    status=503, close_code=CLOSE_INTERNAL,
)


def store_denial(exc: StoreError) -> AccessDenied:
    """What a client is told when the store fails it: down for now, or a value unreadable."""
    return STORE_UNAVAILABLE if isinstance(exc, StoreUnavailable) else STORE_UNREADABLE


_identity_decoder = msgspec.json.Decoder(Identity)
_encoder = msgspec.json.Encoder()


def token_from_scope(scope: dict[str, Any]) -> str | None:
    """The token of an ASGI request: ``Authorization: Bearer`` first, then ``?token=``."""
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, credential = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and credential.strip():
                return credential.strip()
    return query_param(scope, "token") or None


def client_address(scope: dict[str, Any], trusted_proxies: frozenset[str] = frozenset()) -> str | None:
    """The address a request came from: the socket's peer, or, when that peer is a trusted proxy
    (``ATLAS_TRUSTED_PROXIES``: a balancer in front), the last address it added to
    ``X-Forwarded-For``. Never a header from anyone else: a client could write any address."""
    client = scope.get("client")
    peer = str(client[0]) if client else None
    if peer is None or peer not in trusted_proxies:
        return peer
    for name, value in reversed(scope.get("headers", ())):
        if name == b"x-forwarded-for":
            forwarded = value.decode("latin-1").rsplit(",", 1)[-1].strip()
            return forwarded or peer
    return peer


SHUTTING_DOWN = AccessDenied(
    "shutting_down", "the server is shutting down", status=503, close_code=CLOSE_GOING_AWAY
)


async def authenticate(
    verifier: TokenVerifier, scope: dict[str, Any], *, shutting_down: bool
) -> Identity:
    """The identity of this request's token (the ``/v1`` routes have no room in their path)."""
    if shutting_down:
        raise SHUTTING_DOWN
    return await _verify(verifier, scope)


async def _verify(verifier: TokenVerifier, scope: dict[str, Any]) -> Identity:
    try:
        return await verifier.verify(
            token_from_scope(scope), client=client_address(scope, verifier.trusted_proxies)
        )
    except TooManyFailures as exc:
        raise AccessDenied(
            exc.code, str(exc), status=429, close_code=CLOSE_POLICY, retry_after=exc.retry_after
        ) from None
    except Unauthorized as exc:
        raise AccessDenied(exc.code, str(exc), status=401, close_code=CLOSE_UNAUTHORIZED) from None
    except AuthUnavailable as exc:
        raise AccessDenied(exc.code, str(exc), status=503, close_code=CLOSE_INTERNAL) from None


async def admit(
    verifier: TokenVerifier, room_id: str, scope: dict[str, Any], *, shutting_down: bool
) -> Identity:
    """The identity of the room's user, if this request's token belongs to it."""
    if shutting_down:
        raise SHUTTING_DOWN
    if not is_valid_user_id(room_id):
        raise AccessDenied(
            "bad_room_id", "room ids are 1-128 of A-Z a-z 0-9 . _ @ -", status=400, close_code=CLOSE_BAD_ROOM
        )
    identity = await _verify(verifier, scope)
    if identity.id != room_id:
        raise AccessDenied(
            "forbidden", "this token belongs to another user's room", status=403, close_code=CLOSE_FORBIDDEN
        )
    return identity


def lookup_builtin_user(store: Store, token: str) -> Identity | None:
    """The built-in user a token belongs to, or None. Raises StoreError for unreadable files."""
    token_hash = hash_token(token)
    record = store.load_token(token_hash)
    if record is None:
        return None
    user = store.load_user(record.user_id)
    # The user record must still name this token: a rotated or removed token is dead even if its
    # token file survived a crash.
    if user is None or not hmac.compare_digest(user.token_hash, token_hash):
        return None
    return Identity(
        id=user.id, virtual_key=user.virtual_key or None, provider_url=user.provider_url,
        created_at=user.created_at or None,
        limits=user.limits,
    )


def builtin_me_app(store: Store):
    """ASGI app for the built-in ``GET /api/me``."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        status, body = 200, b""
        token = token_from_scope(scope)
        if scope["method"] not in ("GET", "HEAD"):
            status, body = 405, _error_body("method_not_allowed", "use GET /api/me")
        elif token is None:
            status, body = 401, _error_body("unauthorized", "missing bearer token")
        else:
            try:
                # Two small file reads; in a thread, so a cold page cache never stalls the server.
                identity = await store.read(lookup_builtin_user, store, token)
            except StoreUnavailable as exc:
                log.error("built-in auth: %s", exc)
                identity, status = None, 503
                body = _error_body("store_unavailable", "the store is unavailable")
            except StoreError as exc:
                log.error("built-in auth: %s", exc)
                identity, status = None, 500
                body = _error_body("internal", "this user's stored record is unreadable")
            if identity is not None:
                body = _encoder.encode(identity)
            elif status == 200:
                status, body = 401, _error_body("unauthorized", "unknown or revoked token")
        headers = [(b"content-type", b"application/json"), (b"cache-control", b"no-store")]
        if status == 405:
            headers.append((b"allow", b"GET, HEAD"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app


def _error_body(code: str, message: str) -> bytes:
    return _encoder.encode({"error": {"code": code, "message": message}})


class TokenVerifier:
    """Verifies tokens against ``/api/me``, caching answers for ``cache_seconds``.

    What keeps a burst of requests from becoming a burst of auth calls:
    - a refused token is cached too (a negative cache), so a bad token costs one call per period;
    - concurrent first requests for one token share one call (single flight);
    - at most ``max_concurrent`` calls are in flight at once; the rest wait their turn within
      the auth timeout, so a slow auth API is not flooded;
    - a client address whose tokens keep failing is refused for a while (``FailureLimiter``)."""

    def __init__(
        self, lookup: Callable[[str], Awaitable[Identity]], *, cache_seconds: float, timeout: float,
        max_concurrent: int = 32, failures: FailureLimiter | None = None,
        trusted_proxies: frozenset[str] = frozenset(),
    ) -> None:
        self.trusted_proxies = trusted_proxies
        self._lookup = lookup
        self._cache_seconds = cache_seconds
        self._timeout = timeout
        # token hash -> (expiry, identity, or None for a refused token)
        self._cache: OrderedDict[str, tuple[float, Identity | None]] = OrderedDict()
        self._in_flight: dict[str, _Lookup] = {}
        self._calls = trio.CapacityLimiter(max_concurrent)
        self.failures = failures or FailureLimiter(0)

    async def verify(self, token: str | None, *, client: str | None = None) -> Identity:
        """The token's identity; ``client`` (the caller's address) is counted against when the
        token is refused, and refused outright (``TooManyFailures``) once it failed too often."""
        if client is not None:
            self.failures.check(client)
        try:
            return await self._verify(token)
        except Unauthorized:
            if client is not None:
                self.failures.record(client)
            raise

    async def _verify(self, token: str | None) -> Identity:
        if not token:
            raise Unauthorized("missing token: pass ?token= or Authorization: Bearer")
        if not token.isascii() or not token.isprintable():
            # Never a token Atlas issues, and it cannot travel in the auth API's header.
            raise Unauthorized("invalid token: a token is printable ASCII")
        key = hash_token(token)  # the cache never holds a token
        cached = self._cache.get(key)
        if cached is not None and cached[0] > time.monotonic():
            self._cache.move_to_end(key)
            if cached[1] is None:
                raise Unauthorized("invalid or revoked token")
            return cached[1]
        lookup = self._in_flight.get(key)
        if lookup is None:
            lookup = self._in_flight[key] = _Lookup()
            try:
                lookup.result = await self._ask_within_cap(token)
            except AuthError as exc:
                lookup.error = exc
            finally:
                del self._in_flight[key]
                lookup.done.set()
            if isinstance(lookup.error, Unauthorized) or lookup.result is not None:
                self._remember(key, lookup.result)
        else:
            await lookup.done.wait()
        if lookup.error is not None:
            raise type(lookup.error)(str(lookup.error))
        assert lookup.result is not None
        return lookup.result

    def _remember(self, key: str, identity: Identity | None) -> None:
        if self._cache_seconds <= 0:
            return
        self._cache[key] = (time.monotonic() + self._cache_seconds, identity)
        self._cache.move_to_end(key)
        while len(self._cache) > CACHE_LIMIT:
            self._cache.popitem(last=False)

    def forget(self) -> None:
        self._cache.clear()

    async def _ask_within_cap(self, token: str) -> Identity:
        with trio.move_on_after(self._timeout):
            async with self._calls:
                return await self._lookup(token)
        log.warning("auth API busy: no call slot within %.1f s", self._timeout)
        raise AuthUnavailable("the auth API did not answer in time")


class AuthApi:
    """The external auth API: ``GET /api/me`` with the token as a bearer."""

    def __init__(self, client: httpx.AsyncClient, *, timeout: float) -> None:
        self._client = client
        self._timeout = timeout

    async def __call__(self, token: str) -> Identity:
        response = None
        with trio.move_on_after(self._timeout):
            try:
                response = await self._client.get(
                    "/api/me", headers={"Authorization": f"Bearer {token}"}
                )
            except httpx.HTTPError as exc:
                # The exception text can hold the URL but never the header, so it is safe to log.
                log.warning("auth API unreachable: %s", type(exc).__name__)
                raise AuthUnavailable("the auth API cannot be reached") from None
        if response is None:
            log.warning("auth API did not answer within %.1f s", self._timeout)
            raise AuthUnavailable("the auth API did not answer in time")
        if response.status_code in (401, 403):
            raise Unauthorized("invalid or revoked token")
        if response.status_code != 200:
            log.warning("auth API answered %d", response.status_code)
            raise AuthUnavailable(f"the auth API answered {response.status_code}")
        try:
            identity = _identity_decoder.decode(response.content)
        except msgspec.DecodeError as exc:
            # msgspec names the field at fault (e.g. a malformed `limits`), never a value.
            log.warning("auth API answered 200 without a usable user object: %s", exc)
            raise AuthUnavailable("the auth API answered with an unusable user object") from None
        return identity


class BuiltinLookup:
    """Built-in auth: the token's user read from the store (``lookup_builtin_user``)."""

    def __init__(self, store: Store) -> None:
        self._store = store

    async def __call__(self, token: str) -> Identity:
        try:
            # Two small reads; in a thread, so a cold page cache or a database never stalls the server.
            identity = await self._store.read(lookup_builtin_user, self._store, token)
        except StoreUnavailable as exc:
            log.error("built-in auth: %s", exc)
            raise AuthStoreUnavailable("the store (database) is unavailable; try again shortly") from None
        except StoreError as exc:
            log.error("built-in auth: %s", exc)
            raise AuthUnavailable("this user's stored record is unreadable") from None
        if identity is None:
            raise Unauthorized("invalid or revoked token")
        return identity


@asynccontextmanager
async def open_token_verifier(settings: Settings, store: Store) -> AsyncIterator[TokenVerifier]:
    async with AsyncExitStack() as stack:
        lookup: Callable[[str], Awaitable[Identity]]
        if settings.auth_url:
            client = await stack.enter_async_context(httpx.AsyncClient(
                base_url=settings.auth_url, timeout=settings.auth_timeout, follow_redirects=False
            ))
            lookup = AuthApi(client, timeout=settings.auth_timeout)
        else:
            lookup = BuiltinLookup(store)
        yield TokenVerifier(
            lookup, cache_seconds=settings.auth_cache_seconds, timeout=settings.auth_timeout,
            max_concurrent=settings.auth_max_concurrent,
            failures=FailureLimiter(settings.auth_failures_per_minute),
            trusted_proxies=frozenset(settings.trusted_proxies),
        )
