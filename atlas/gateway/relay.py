"""The WebSocket relay: ``agent:stream`` / ``agent:text`` / ``agent:cancel`` / ``agent:resume`` /
``agent:list`` for one room.

A request runs as a task in its room's nursery under its own cancel scope; leaving the agent's
stream context closes the provider request at once. Its output goes through a ``Stream``
(``atlas.gateway.streams``). A request that is not resumable is kept in its connection's
``requests``, so that ``agent:cancel`` and the connection's end both cancel it. A resumable one is
kept in its room (``room.streams``): any connection of the room may resume or cancel it, it runs on
for the grace period after its last connection left, and once ended it stays for the grace period. The agent is anything with
``open_stream(agent_id, input, options, credentials)``: the in-process ``AgentService`` (direct
calls, no HTTP hop) or ``RemoteAgent`` (``/agents/{id}/stream`` over HTTP).

Every request passes admission (``atlas.gateway.admission``) before the agent is called: its
worst case is reserved against the user's limits, the output cap it may use goes to the agent as
``options.maxOutputTokens``, and its usage is settled (durably) before ``agent:done`` is sent.
"""

from __future__ import annotations

import logging
import secrets
from contextlib import AbstractAsyncContextManager
from typing import Any, AsyncIterator, Protocol

import trio

from atlas.gateway.admission import PER_MESSAGE_TOKENS, Admission, Refused, prompt_bound
from atlas.gateway.connection import Connection
from atlas.gateway.reply_cap import reply_too_large, utf8_size
from atlas.gateway.streams import Stream, streams_of
from atlas.llm.types import (
    AgentBudget,
    AgentError,
    ChatMessage,
    Credentials,
    Finish,
    StreamEvent,
    TextDelta,
)
from atlas.llm.types import Usage as AgentUsage
from atlas.protocol import (
    AgentDone,
    AgentList,
    AgentRequests,
    AgentResume,
    AgentStart,
    AgentStream,
    AgentText,
    Usage,
    encode,
    error_frame,
)
from atlas.rooms import Room, RoomSnapshot
from atlas.store import LeaseLost, StoreUnavailable, Turn, UserGone

log = logging.getLogger("atlas.gateway.relay")

MAX_REQUEST_ID_LENGTH = 128

# Codes of the agent API that the WebSocket protocol names differently.
WS_ERROR_CODES = {"bad_request": "bad_message"}


class Agent(Protocol):
    async def default_agent_id(self) -> str: ...

    def open_stream(
        self, agent_id: str, input: str | list[ChatMessage], options: dict[str, Any],
        credentials: Credentials,
    ) -> AbstractAsyncContextManager[AsyncIterator[StreamEvent]]: ...

    async def budget(self, agent_id: str) -> AgentBudget: ...


def agent_prompt_bound(budget: AgentBudget, texts: list[str]) -> int:
    """Upper bound of the prompt tokens of an agent request: its messages and the agent's
    instructions (one system message)."""
    bound = prompt_bound(texts, len(texts))
    if budget.instructions_bytes:
        bound += budget.instructions_bytes + PER_MESSAGE_TOKENS
    return bound


def requested_output(options: dict[str, Any]) -> tuple[bool, int | None]:
    """(the option can be replaced, its value): a malformed ``maxOutputTokens`` is left for the
    agent to refuse with a clear error, never silently replaced."""
    value = options.get("maxOutputTokens")
    if value is None:
        return True, None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return True, value
    return False, None


class Relay:
    def __init__(
        self, agent: Agent, admission: Admission, *, default_provider_url: str, max_requests: int,
        conversation_turns: int, default_agent: str | None = None, resume_grace_seconds: float = 60.0,
        resume_buffer_bytes: int = 1024 * 1024, max_reply_bytes: int = 8 * 1024 * 1024,
        max_connections_per_user: int = 32,
    ) -> None:
        self.agent = agent
        self.max_reply_bytes = max_reply_bytes
        # A resumable request outlives its connection (for the grace period), so the per-connection
        # limit alone does not bound them: a room runs at most as many as its user's connections
        # could, each holding at most the reply cap.
        self.max_resumable = max_requests * max_connections_per_user
        self.resume_grace_seconds = resume_grace_seconds
        self.resume_buffer_bytes = resume_buffer_bytes
        self.admission = admission
        self.default_agent = default_agent  # ATLAS_DEFAULT_AGENT; else the agent's first one
        self.default_provider_url = default_provider_url
        self.max_requests = max_requests
        self.conversation_turns = conversation_turns

    def credentials(self, room: Room | RoomSnapshot) -> Credentials | None:
        identity = room.identity
        if identity is None or not identity.virtual_key:
            return None
        key = identity.virtual_key
        if not key.isascii() or not key.isprintable() or " " in key:
            # It goes into a header: the auth API gave a key no provider could have issued.
            log.warning("user %s has a virtual key with characters a key cannot have", room.id)
            return None
        return Credentials(
            api_key=identity.virtual_key,
            api_url=identity.provider_url or self.default_provider_url,
            user_id=room.id,
        )

    async def start(self, room: Room, connection: Connection, message: AgentStream) -> None:
        request_id = message.id if message.id is not None else secrets.token_hex(6)

        async def refuse(code: str, text: str) -> None:
            await connection.send(error_frame(code, text, request_id))

        if not request_id or len(request_id) > MAX_REQUEST_ID_LENGTH:
            await refuse("bad_message", f"id must be 1-{MAX_REQUEST_ID_LENGTH} characters")
            return
        if request_id in connection.requests or request_id in connection.attached:
            await refuse("bad_message", f"request {request_id!r} is already in flight on this connection")
            return
        if not room.owned:
            # The room is being given up (its lease was lost with the database): no billable
            # work from a process that cannot reach the database.
            await refuse("store_unavailable", "the database is unavailable; try again shortly")
            return
        if self._taken(room, request_id):
            await refuse("bad_message", f"request id {request_id!r} can still be resumed in this room; use another")
            return
        if len(connection.requests) + len(connection.attached) >= self.max_requests:
            await refuse("too_many_requests", f"at most {self.max_requests} requests may be in flight per connection")
            return
        credentials = self.credentials(room)
        if credentials is None:
            await refuse("no_credentials", "this user has no virtual key; ask the operator to set one")
            return
        prefs = room.prefs
        agent_id = message.agent_id or _string(prefs.get("agentId")) or self.default_agent
        if agent_id is None:
            try:
                agent_id = await self.agent.default_agent_id()
            except AgentError as exc:
                await connection.send(encode_agent_error(request_id, exc))
                return
            if self._taken(room, request_id):  # taken while the agent list was fetched
                await refuse("bad_message", f"request id {request_id!r} can still be resumed in this room; use another")
                return
        default_options = prefs.get("options")
        options = dict(default_options) if isinstance(default_options, dict) else {}
        options.update(message.options or {})
        resumable = message.resumable if message.resumable is not None else prefs.get("resumable") is True
        if resumable and room.streams is not None and room.streams.running() >= self.max_resumable:
            await refuse("too_many_requests", f"at most {self.max_resumable} resumable requests may run per room")
            return
        scope = trio.CancelScope()
        streaming = not isinstance(message, AgentText)
        if resumable:
            streams = streams_of(room, grace=self.resume_grace_seconds, limit=self.resume_buffer_bytes)
            stream = Stream(request_id, agent_id, scope, streaming=streaming, room=streams)
            streams.add(stream)
            stream.attach(connection)
        else:
            stream = Stream(request_id, agent_id, scope, streaming=streaming, solo=connection)
            connection.requests[request_id] = scope
        room.start_request(lambda: self._serve(room, stream, message, options, credentials))

    def _taken(self, room: Room, request_id: str) -> bool:
        return room.streams is not None and room.streams.get(request_id) is not None

    async def cancel(self, room: Room, connection: Connection, request_id: str) -> None:
        """Cancel the connection's own request, or a resumable one of its room."""
        scope = connection.requests.get(request_id)
        if scope is not None:
            scope.cancel()
            return
        stream = room.streams.get(request_id) if room.streams is not None else None
        if stream is not None and stream.state == "running":
            stream.cancel()
            return
        await connection.send(
            error_frame("bad_message", f"no request {request_id!r} in flight on this connection", request_id)
        )

    async def resume(self, room: Room, connection: Connection, message: AgentResume) -> None:
        request_id, after = message.id, message.after
        stream = room.streams.get(request_id) if room.streams is not None else None
        if stream is None:
            await connection.send(error_frame(
                "unknown_request",
                f"no request {request_id!r} to resume in this room: unknown, expired, or not resumable",
                request_id,
            ))
            return
        if request_id in connection.attached:
            await connection.send(error_frame(
                "bad_message", f"request {request_id!r} is already streaming to this connection", request_id
            ))
            return
        if after > stream.seq:
            await connection.send(error_frame(
                "bad_message", f"after {after} is beyond request {request_id!r}'s seq {stream.seq}", request_id
            ))
            return
        await stream.resume(connection, after)

    async def list(self, room: Room, connection: Connection, message: AgentList) -> None:
        requests = room.streams.requests() if room.streams is not None else []
        await connection.send(encode(AgentRequests(requests)))

    async def _serve(
        self, room: Room, stream: Stream, message: AgentStream, options: dict[str, Any],
        credentials: Credentials,
    ) -> None:
        """Run the request; a resumable one is then kept for the grace period."""
        streams = stream.room
        try:
            await self._run(room, stream, message, options, credentials)
        finally:
            if streams is not None and stream.state == "running":
                streams.forget(stream)  # cancelled by the grace running out, or at shutdown
            elif stream.solo is not None:
                stream.solo.requests.pop(stream.id, None)
        if streams is not None:
            await streams.keep(stream)

    async def _run(
        self, room: Room, stream: Stream, message: AgentStream, options: dict[str, Any],
        credentials: Credentials,
    ) -> None:
        request_id, agent_id, scope = stream.id, stream.agent_id, stream.scope
        streaming = stream.streaming
        conversation_id = message.conversation_id
        history = room.conversation(conversation_id) if conversation_id else []
        agent_input: str | list[ChatMessage] = message.message
        if history:
            agent_input = [ChatMessage(t.role, t.content) for t in history]
            agent_input.append(ChatMessage("user", message.message))
        try:
            with scope:
                budget = await self.agent.budget(agent_id)
                prompt = agent_prompt_bound(budget, [t.content for t in history] + [message.message])
                replaceable, wanted = requested_output(options)
                limits = self.admission.limits_for(room.identity)
                async with self.admission.admit(
                    room.id, limits, prompt=prompt, output=wanted or budget.max_output_tokens,
                    path="ws", agent=agent_id,
                ) as ticket:
                    if ticket.cap is not None and replaceable:
                        options = {**options, "maxOutputTokens": ticket.cap}
                    finish = Finish("unknown", usage=AgentUsage())
                    async with self.agent.open_stream(agent_id, agent_input, options, credentials) as events:
                        ticket.answered()
                        # Started once the agent took the request: a refusal (a limit, unknown
                        # agent, bad options, a misconfigured agent secret, the provider's own)
                        # comes alone.
                        if streaming:
                            await stream.send(encode(AgentStart(request_id, agent_id)))
                        cap, size = self.max_reply_bytes, 0
                        async for event in events:
                            if isinstance(event, TextDelta):
                                if text := event.text:  # seq counts non-empty pieces
                                    if not stream.parts:
                                        ticket.first_token()
                                    size += utf8_size(text)
                                    if size > cap:
                                        raise reply_too_large(cap)  # settled by admission
                                    # Only a solo connection's delta waits (for room in its outbox).
                                    if (sending := stream.delta(text)) is not None:
                                        await sending
                            else:
                                finish = event
                    text = "".join(stream.parts)
                    await ticket.settle(finish.usage)  # durable before the client hears of it
                if conversation_id:
                    turns = [Turn("user", message.message), Turn("assistant", text)]
                    await room.append_turns(conversation_id, turns, self.conversation_turns)
                usage = finish.usage
                await stream.end(AgentDone(
                    request_id, text,
                    Usage(usage.prompt_tokens, usage.completion_tokens, usage.total_tokens),
                    finish.finish_reason, stream.seq,
                ), "done")
            # A resumable request whose grace ran out (or a server shutting down) tells no one:
            # it is forgotten, and a late resume is unknown_request.
            if scope.cancelled_caught and (stream.cancelled or not stream.resumable):
                await stream.end(error_frame("cancelled", "the request was cancelled", request_id), "error")
        except Refused as exc:
            await stream.end(error_frame(exc.code, exc.message, request_id, **exc.fields()), "error")
        except AgentError as exc:
            await stream.end(encode_agent_error(request_id, exc), "error")
        except (UserGone, LeaseLost):
            pass  # the room was given up: its connections were told and are closing
        except StoreUnavailable as exc:
            log.error("agent request %s in room %s: conversation not saved: %s", request_id, room.id, exc)
            await stream.end(error_frame(
                "store_unavailable", "the conversation could not be saved now; try again shortly", request_id
            ), "error")
        except Exception:
            # A bug or a failed write (disk full): the request fails, its room and connection live.
            log.exception("agent request %s in room %s failed", request_id, room.id)
            await stream.end(error_frame("internal", "internal error; see the server log", request_id), "error")


def encode_agent_error(request_id: str, exc: AgentError) -> str:
    code = WS_ERROR_CODES.get(exc.code, exc.code)
    return error_frame(code, exc.message, request_id)


def _string(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None

