"""The WebSocket relay: ``agent:stream`` / ``agent:text`` / ``agent:cancel`` for one room.

A request runs as a task in its room's nursery under its own cancel scope, kept in the
connection's ``requests`` so that ``agent:cancel`` and the connection's end both cancel it; leaving
the agent's stream context closes the provider request at once. The agent is anything with
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
from atlas.gateway.connection import Connection, DeltaBuffer
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
    AgentStart,
    AgentStream,
    AgentText,
    Usage,
    encode,
    error_frame,
)
from atlas.rooms import Room
from atlas.store import StoreUnavailable, Turn, UserGone

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
        conversation_turns: int, default_agent: str | None = None,
    ) -> None:
        self.agent = agent
        self.admission = admission
        self.default_agent = default_agent  # ATLAS_DEFAULT_AGENT; else the agent's first one
        self.default_provider_url = default_provider_url
        self.max_requests = max_requests
        self.conversation_turns = conversation_turns

    def credentials(self, room: Room) -> Credentials | None:
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
        if request_id in connection.requests:
            await refuse("bad_message", f"request {request_id!r} is already in flight on this connection")
            return
        if len(connection.requests) >= self.max_requests:
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
        default_options = prefs.get("options")
        options = dict(default_options) if isinstance(default_options, dict) else {}
        options.update(message.options or {})
        scope = trio.CancelScope()
        connection.requests[request_id] = scope
        room.start_request(lambda: self._run(
            room, connection, message, request_id, agent_id, options, credentials, scope
        ))

    async def cancel(self, connection: Connection, request_id: str) -> None:
        scope = connection.requests.get(request_id)
        if scope is None:
            await connection.send(
                error_frame("bad_message", f"no request {request_id!r} in flight on this connection", request_id)
            )
            return
        scope.cancel()

    async def _run(
        self, room: Room, connection: Connection, message: AgentStream, request_id: str,
        agent_id: str, options: dict[str, Any], credentials: Credentials, scope: trio.CancelScope,
    ) -> None:
        streaming = not isinstance(message, AgentText)
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
                    parts: list[str] = []
                    finish = Finish("unknown", usage=AgentUsage())
                    buffer = DeltaBuffer(request_id)
                    async with self.agent.open_stream(agent_id, agent_input, options, credentials) as events:
                        ticket.answered()
                        # Started once the agent took the request: a refusal (a limit, unknown
                        # agent, bad options, a misconfigured agent secret, the provider's own)
                        # comes alone.
                        if streaming:
                            await connection.send(encode(AgentStart(request_id, agent_id)))
                        async for event in events:
                            if isinstance(event, TextDelta):
                                if not parts:
                                    ticket.first_token()
                                parts.append(event.text)
                                if streaming:
                                    await connection.send_delta(buffer, event.text)
                            else:
                                finish = event
                    text = "".join(parts)
                    await ticket.settle(finish.usage)  # durable before the client hears of it
                if conversation_id:
                    turns = [Turn("user", message.message), Turn("assistant", text)]
                    await room.append_turns(conversation_id, turns, self.conversation_turns)
                usage = finish.usage
                await connection.send(encode(AgentDone(
                    request_id, text,
                    Usage(usage.prompt_tokens, usage.completion_tokens, usage.total_tokens),
                    finish.finish_reason,
                )))
            if scope.cancelled_caught:
                await connection.send(error_frame("cancelled", "the request was cancelled", request_id))
        except Refused as exc:
            await connection.send(error_frame(exc.code, exc.message, request_id, **exc.fields()))
        except AgentError as exc:
            await connection.send(encode_agent_error(request_id, exc))
        except UserGone:
            pass  # the room was revoked: its connections were told and are closing
        except StoreUnavailable as exc:
            log.error("agent request %s in room %s: conversation not saved: %s", request_id, room.id, exc)
            await connection.send(error_frame(
                "store_unavailable", "the conversation could not be saved now; try again shortly", request_id
            ))
        except Exception:
            # A bug or a failed write (disk full): the request fails, its room and connection live.
            log.exception("agent request %s in room %s failed", request_id, room.id)
            await connection.send(error_frame("internal", "internal error; see the server log", request_id))
        finally:
            connection.requests.pop(request_id, None)


def encode_agent_error(request_id: str, exc: AgentError) -> str:
    code = WS_ERROR_CODES.get(exc.code, exc.code)
    return error_frame(code, exc.message, request_id)


def _string(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None

