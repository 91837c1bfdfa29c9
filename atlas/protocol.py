"""The WebSocket protocol: one tagged union per direction, decoders and encoders built once.

Every frame is a JSON text frame with a ``type``. ``decode_client_message`` turns a frame into a
typed message or raises ``ProtocolError`` with the contract's error code (``bad_json``,
``bad_message``, ``unknown_type``, ``too_large``) and the id of the request it belongs to, if any,
so that the reply can be an ``agent:error`` for that id instead of a bare ``error``.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Union

import msgspec

# Close codes (contract: "WebSocket").
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_ABNORMAL = 1006  # never sent: what a client sees when the connection dropped without a close
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL = 1011
CLOSE_TRY_AGAIN = 1013  # the room is served by another process: reconnect (through the balancer)
CLOSE_TOO_SLOW = 1008
CLOSE_POLICY = 1008  # policy violation: too many failed token checks from one address
CLOSE_UNAUTHORIZED = 4001
CLOSE_FORBIDDEN = 4003
CLOSE_BAD_ROOM = 4400


class ErrorBody(msgspec.Struct, rename="camel", omit_defaults=True):
    code: str
    message: str
    # quota_exceeded: when the limit that refused starts a new period (ISO 8601 UTC), its name
    reset_at: str | None = None
    limit: str | None = None
    # rate_limited: seconds after which a retry may be admitted
    retry_after: int | None = None


class ProtocolError(Exception):
    def __init__(self, code: str, message: str, request_id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id

    def body(self) -> ErrorBody:
        return ErrorBody(self.code, self.message)


# Client to server. Unknown fields are refused so that a typo is an error, not silence.


class _ClientMessage(msgspec.Struct, tag_field="type", rename="camel", forbid_unknown_fields=True):
    pass


class AgentStream(_ClientMessage, tag="agent:stream"):
    message: str
    id: str | None = None
    agent_id: str | None = None
    conversation_id: str | None = None
    options: dict[str, Any] | None = None
    # Outlives its connection for the resume grace period (None: the prefs' ``resumable``).
    resumable: bool | None = None


class AgentText(AgentStream, tag="agent:text"):
    pass


class AgentCancel(_ClientMessage, tag="agent:cancel"):
    id: str


class AgentResume(_ClientMessage, tag="agent:resume"):
    id: str
    after: Annotated[int, msgspec.Meta(ge=0)] = 0  # the last ``seq`` the client has; 0: from the start


class AgentList(_ClientMessage, tag="agent:list"):
    pass


class PrefsGet(_ClientMessage, tag="prefs:get"):
    pass


class PrefsSet(_ClientMessage, tag="prefs:set"):
    prefs: dict[str, Any]


class Broadcast(_ClientMessage, tag="broadcast"):
    data: Any = None


class Ping(_ClientMessage, tag="ping"):
    pass


class UsageGet(_ClientMessage, tag="usage:get"):
    since: str | None = None  # YYYY-MM-DD; default: the last 31 days


ClientMessage = Union[
    AgentStream, AgentText, AgentCancel, AgentResume, AgentList, PrefsGet, PrefsSet, Broadcast,
    Ping, UsageGet,
]
CLIENT_TYPES = frozenset((
    "agent:stream", "agent:text", "agent:cancel", "agent:resume", "agent:list", "prefs:get",
    "prefs:set", "broadcast", "ping", "usage:get",
))


class _Envelope(msgspec.Struct):
    """Just enough of a bad frame to classify the error and find its request id."""

    type: Any = None
    id: Any = None


_client_decoder = msgspec.json.Decoder(ClientMessage)
_envelope_decoder = msgspec.json.Decoder(_Envelope)


# A JSON string (escapes included) or one bracket: enough to tell which brackets are structure.
_STRING_OR_BRACKET = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]')


def _top_level_only(frame: bytes) -> bytes:
    """``frame`` with every array or object inside the top-level value replaced by ``null``.

    msgspec cannot decode, or even skip, a value nested deeper than the recursion limit, so a
    frame with one such value would lose its ``type`` and ``id`` with it. The envelope needs only
    the top level, so the error path decodes this copy instead. Not a JSON parser: it finds the
    spans to cut, and msgspec still decodes (and judges) what is left."""
    pieces: list[bytes] = []
    depth = kept_until = 0
    cut_from = -1
    for token in _STRING_OR_BRACKET.finditer(frame):
        bracket = token.group()
        if bracket[0] == 0x22:  # a string: its brackets are text
            continue
        if bracket in (b"[", b"{"):
            depth += 1
            if depth == 2:
                cut_from = token.start()
        else:
            if depth == 2 and cut_from >= 0:
                pieces += (frame[kept_until:cut_from], b"null")
                kept_until, cut_from = token.end(), -1
            depth -= 1
    pieces.append(frame[kept_until:])
    return b"".join(pieces)


def _decode_envelope(frame: str | bytes) -> _Envelope:
    try:
        return _envelope_decoder.decode(frame)
    except RecursionError:
        raw = frame.encode("utf-8", "surrogatepass") if isinstance(frame, str) else frame
        return _envelope_decoder.decode(_top_level_only(raw))


def _request_id_of(frame: str | bytes) -> str | None:
    try:
        envelope = _decode_envelope(frame)
    except (msgspec.DecodeError, RecursionError):
        return None
    return envelope.id if isinstance(envelope.id, str) else None


def decode_client_message(frame: str | bytes) -> ClientMessage:
    try:
        return _client_decoder.decode(frame)
    except msgspec.DecodeError as exc:
        # Slow path, errors only: decode again loosely to say precisely what is wrong.
        error = str(exc)
    except RecursionError:
        raise ProtocolError("bad_message", "the message is nested too deeply",
                            _request_id_of(frame)) from None
    try:
        envelope = _decode_envelope(frame)
    except msgspec.ValidationError:
        raise ProtocolError("bad_message", "a message must be a JSON object with a \"type\"") from None
    except msgspec.DecodeError:
        raise ProtocolError("bad_json", "the frame is not valid JSON") from None
    except RecursionError:
        raise ProtocolError("bad_message", "the message is nested too deeply") from None
    request_id = envelope.id if isinstance(envelope.id, str) else None
    if envelope.type is None:
        raise ProtocolError("bad_message", "the message has no \"type\" field", request_id)
    if not isinstance(envelope.type, str) or envelope.type not in CLIENT_TYPES:
        shown = envelope.type if isinstance(envelope.type, str) else type(envelope.type).__name__
        raise ProtocolError(
            "unknown_type",
            f"unknown message type {shown[:64]!r}; known: {', '.join(sorted(CLIENT_TYPES))}",
            request_id,
        )
    raise ProtocolError("bad_message", f"{envelope.type}: {error}", request_id)


# Server to client.


class _ServerMessage(msgspec.Struct, tag_field="type", rename="camel", omit_defaults=False):
    pass


class Usage(msgspec.Struct, rename="camel"):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class Ready(_ServerMessage, tag="ready"):
    room_id: str
    user_id: str
    connection_id: str
    credentials: bool
    prefs: dict[str, Any]


class AgentStart(_ServerMessage, tag="agent:start"):
    id: str
    agent_id: str


class AgentDelta(_ServerMessage, tag="agent:delta"):
    id: str
    text: str
    seq: int  # provider text pieces included so far in this request (jumps when coalesced)


class AgentDone(_ServerMessage, tag="agent:done"):
    id: str
    text: str
    usage: Usage
    finish_reason: str
    seq: int  # the request's final ``seq``


RequestState = Literal["running", "done", "error"]


class RequestInfo(msgspec.Struct, rename="camel"):
    id: str
    agent_id: str
    state: RequestState
    seq: int


class AgentRequests(_ServerMessage, tag="agent:requests"):
    requests: list[RequestInfo]


class AgentErrorMessage(_ServerMessage, tag="agent:error"):
    id: str
    error: ErrorBody


class PrefsMessage(_ServerMessage, tag="prefs"):
    prefs: dict[str, Any]


class BroadcastMessage(_ServerMessage, tag="broadcast"):
    from_: str = msgspec.field(name="from")
    data: Any = None


class Pong(_ServerMessage, tag="pong"):
    pass


class ErrorMessage(_ServerMessage, tag="error"):
    error: ErrorBody


class UsageDay(msgspec.Struct, rename="camel"):
    date: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class UsageLimits(msgspec.Struct, rename="camel", omit_defaults=True):
    """Absent: unlimited."""

    tokens_per_day: int | None = None
    tokens_per_month: int | None = None
    requests_per_minute: int | None = None
    concurrent_requests: int | None = None


class UsageRemaining(msgspec.Struct, rename="camel", omit_defaults=True):
    """What the token limits leave after the settled usage. Absent: unlimited."""

    tokens_today: int | None = None
    tokens_this_month: int | None = None


class UsageMessage(_ServerMessage, tag="usage"):
    user_id: str
    days: list[UsageDay]
    limits: UsageLimits
    remaining: UsageRemaining


ServerMessage = Union[
    Ready, AgentStart, AgentDelta, AgentDone, AgentErrorMessage, AgentRequests, PrefsMessage,
    BroadcastMessage, Pong, ErrorMessage, UsageMessage,
]

_encoder = msgspec.json.Encoder()


def encode(message: ServerMessage) -> str:
    return _encoder.encode(message).decode()


def error_frame(code: str, message: str, request_id: str | None = None, **fields: Any) -> str:
    """An ``agent:error`` (with a request id) or an ``error``; ``fields`` are ErrorBody's extras
    (``reset_at``, ``limit``, ``retry_after``)."""
    body = ErrorBody(code, message, **fields)
    if request_id is not None:
        return encode(AgentErrorMessage(request_id, body))
    return encode(ErrorMessage(body))


def usage_message(report: dict[str, Any]) -> UsageMessage:
    """The ``usage`` frame for a usage report (``atlas.store.usage.report``'s object)."""
    return msgspec.convert({"type": "usage", **report}, UsageMessage)
