"""Fuzzing the WebSocket protocol with hypothesis against a real in-process server.

Each example opens a connection and sends a few generated frames: valid messages with random
content, valid-shaped messages with wrong field types or unknown fields, garbage text, JSON that
is not an object, huge strings, deep nesting, binary frames, unknown types, and floods of one
frame repeated hundreds of times. Then, for every example:

- every frame the server sent is a known server message, and every error in it carries a code
  the contract names, never ``internal``;
- the connection is still open (``ping`` gets ``pong``), unless a frame was over the size limit,
  in which case it was closed with 1009, the only close the contract names for a client's frame;
- once the connection is gone, the server's task count is back to its baseline (nothing leaks per
  connection, per request or per frame).

Invalid UTF-8 and other WebSocket protocol violations are not generated here: they end the
connection by the RFC; what the server does then is checked on its own below.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pytest
import trio
import wsproto
from fake_provider import Reply
from fuzzing import CLIENT_ERROR_CODES, fuzz_settings, in_trio, run_given
from hypothesis import given
from hypothesis import strategies as st
from probes import Closed, RawWebSocket, atlas_connections, atlas_requests, atlas_tasks, frame, idle_atlas_tasks, record, scaled, wait_for
from servers import open_atlas

MAX_MESSAGE = 128 * 1024  # smaller than the default 1 MiB so that the over-size path is cheap
SERVER_TYPES = frozenset({
    "ready", "agent:start", "agent:delta", "agent:done", "agent:error", "prefs", "broadcast",
    "pong", "error", "usage", "agent:requests",
})
CLIENT_TYPES = ("agent:stream", "agent:text", "agent:cancel", "prefs:get", "prefs:set", "broadcast", "ping",
                "usage:get", "agent:resume", "agent:list")
BROKEN = (Closed, trio.BrokenResourceError, trio.ClosedResourceError, wsproto.utilities.LocalProtocolError)


@dataclass(frozen=True)
class Frame:
    payload: str | bytes
    repeat: int = 1

    def __repr__(self) -> str:
        shown = self.payload if len(self.payload) <= 120 else self.payload[:100]
        more = "" if shown is self.payload else f"...<{len(self.payload)} in all>"
        return f"Frame({shown!r}{more}, repeat={self.repeat})"

    @property
    def oversize(self) -> bool:
        size = len(self.payload) if isinstance(self.payload, bytes) else len(self.payload.encode())
        return size > MAX_MESSAGE


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=16),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
short_ids = st.text(min_size=0, max_size=140)


def text_frame(value: Any) -> Frame:
    return Frame(json.dumps(value, ensure_ascii=False))


valid = st.one_of(
    st.just({"type": "ping"}),
    st.just({"type": "prefs:get"}),
    st.builds(lambda p: {"type": "prefs:set", "prefs": p},
              st.dictionaries(st.sampled_from(["theme", "agentId", "options", "x", "y"]), json_values, max_size=3)),
    st.builds(lambda kind, message, request_id: {"type": kind, "message": message, "id": request_id},
              st.sampled_from(["agent:text", "agent:stream"]), st.text(max_size=64), short_ids),
    st.builds(lambda kind, message, options: {"type": kind, "message": message, "options": options},
              st.sampled_from(["agent:text", "agent:stream"]), st.text(max_size=16),
              st.dictionaries(st.sampled_from(["temperature", "maxOutputTokens", "topP", "seed", "zzz"]),
                              json_values, max_size=2)),
    st.builds(lambda data: {"type": "broadcast", "data": data}, json_values),
    st.builds(lambda request_id: {"type": "agent:cancel", "id": request_id}, short_ids),
    st.builds(lambda kind, message, request_id: {"type": kind, "message": message, "id": request_id,
                                                 "resumable": True},
              st.sampled_from(["agent:text", "agent:stream"]), st.text(max_size=16), short_ids),
    st.builds(lambda request_id, after: {"type": "agent:resume", "id": request_id, "after": after},
              short_ids, json_values),
    st.just({"type": "agent:list"}),
    st.builds(lambda since: {"type": "usage:get", "since": since},
              st.sampled_from(["2026-01-01", "1999-12-31", "2026-02-30", "yesterday", ""])),
).map(text_frame)

shaped = st.builds(
    lambda kind, fields: {"type": kind, **fields},
    st.sampled_from(CLIENT_TYPES),
    st.dictionaries(
        st.sampled_from(["message", "id", "agentId", "conversationId", "options", "prefs", "data", "since",
                         "resumable", "after", "extra"]),
        json_values, max_size=4,
    ),
).map(text_frame)

garbage = st.one_of(
    st.text(max_size=200).map(Frame),
    json_values.filter(lambda v: not isinstance(v, dict)).map(text_frame),
    st.builds(lambda t: {"type": t}, json_values).map(text_frame),  # unknown or mistyped type
    st.binary(max_size=512).map(Frame),  # a binary frame
)

huge = st.builds(
    lambda kind, field, size: Frame(json.dumps({"type": kind, field: "x" * size})),
    st.sampled_from(CLIENT_TYPES), st.sampled_from(["message", "data", "id", "prefs", "extra"]),
    st.sampled_from([MAX_MESSAGE // 2, MAX_MESSAGE - 100, MAX_MESSAGE + 1, MAX_MESSAGE * 3]),
)


def nest(depth: int, where: str) -> str:
    inner = "[" * depth + "]" * depth
    return {
        "frame": inner,
        "data": '{"type":"broadcast","data":' + inner + "}",
        "prefs": '{"type":"prefs:set","prefs":{"deep":' + inner + "}}",
        "options": '{"type":"agent:text","message":"hi","options":{"o":' + inner + "}}",
        "object": '{"type":"broadcast","data":' + '{"a":' * depth + "1" + "}" * depth + "}",
    }[where]


deep = st.builds(
    lambda depth, where: Frame(nest(depth, where)),
    st.one_of(st.integers(1, 64), st.integers(64, 60_000)),
    st.sampled_from(["frame", "data", "prefs", "options", "object"]),
)

# Floods of valid prefs:set are left out: each is a durable write (an fsync), so 600 of them
# measure the disk, not the protocol.
flood = st.builds(
    lambda one, repeat: Frame(one.payload, repeat),
    st.one_of(st.just(Frame('{"type":"ping"}')), st.just(Frame('{"type":"prefs:get"}')), valid, shaped)
    .filter(lambda one: '"prefs:set"' not in str(one.payload)),
    st.integers(50, 600),
)

frames = st.lists(st.one_of(valid, shaped, garbage, huge, deep, flood), min_size=1, max_size=5)


def check_frame(raw: str | bytes) -> dict[str, Any]:
    assert isinstance(raw, str), f"a binary frame from the server: {raw[:80]!r}"
    message = json.loads(raw)
    assert message.get("type") in SERVER_TYPES, message
    if message["type"] in ("error", "agent:error"):
        assert message["error"]["code"] in CLIENT_ERROR_CODES, message
    return message


class Session:
    """One connection of the fuzz, its reader collecting every frame the server sends."""

    def __init__(self, ws: RawWebSocket) -> None:
        self.ws = ws
        self.received: list[dict[str, Any]] = []
        self.closed: Closed | None = None
        self.changed = trio.Event()

    async def read(self) -> None:
        try:
            while True:
                message = check_frame(await self.ws.receive())
                self.received.append(message)
                self.changed.set()
                self.changed = trio.Event()
        except Closed as closed:
            self.closed = closed
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.closed = Closed(None, "connection broken")
        finally:
            self.changed.set()

    async def close(self) -> None:
        await self.ws.send_close()
        with trio.move_on_after(5):
            await self.wait_for(lambda: False)
        await self.ws.abort()

    async def wait_for(self, predicate: Any, timeout: float = 10) -> None:
        """Until ``predicate()`` or the connection is closed."""
        with trio.fail_after(timeout):
            while not predicate() and self.closed is None:
                await self.changed.wait()

    async def wait_answered(self, marker: str) -> None:
        """Until the reply to an ``agent:cancel`` for ``marker``, an id that is never in flight:
        it comes after the replies to every frame sent before it."""
        await self.ws.send_json({"type": "agent:cancel", "id": marker})
        await self.wait_for(lambda: any(m.get("id") == marker for m in self.received))

    def unfinished_requests(self) -> set[str]:
        started = {m["id"] for m in self.received if m["type"] == "agent:start"}
        ended = {m["id"] for m in self.received if m["type"] in ("agent:done", "agent:error")}
        return started - ended


@asynccontextmanager
async def open_session(port: int, token: str) -> AsyncIterator[Session]:
    ws = await RawWebSocket.open(port, f"/party/alice?token={token}")
    try:
        assert (await ws.receive_json())["type"] == "ready"
        session = Session(ws)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(session.read)
            try:
                yield session
            finally:
                with trio.CancelScope(shield=True):
                    await session.close()
    finally:
        await ws.abort()


async def ping_pong(session: Session) -> None:
    await session.ws.send_json({"type": "ping"})
    count = sum(m["type"] == "pong" for m in session.received)
    await session.wait_for(lambda: sum(m["type"] == "pong" for m in session.received) > count)
    assert session.closed is None, session.closed


async def test_fuzzed_frames_get_contract_answers_and_leave_nothing_behind(tmp_path, provider):
    provider.behaviour = Reply(deltas=["fuzz ", "reply"])
    stats = {"examples": 0, "frames": 0, "closed_1009": 0}
    # A resumable request is kept for the grace period after it ends or its connection drops:
    # short here, so that the task count can return to its baseline between examples.
    async with open_atlas(tmp_path, users={"alice": None}, provider_url=provider.url,
                          max_message_bytes=MAX_MESSAGE, resume_grace_seconds=0.2) as server:
        port = int(server.url.rsplit(":", 1)[1])
        token = server.tokens["alice"]
        async with open_session(port, token) as session:  # the room is loaded, the pool is open
            await session.ws.send_json({"type": "agent:text", "message": "warm up"})
            await session.wait_for(lambda: any(m["type"] == "agent:done" for m in session.received))
        baseline = await idle_atlas_tasks()

        async def send_all(session: Session, sent: list[Frame]) -> None:
            try:
                for item in sent:
                    for _ in range(item.repeat):
                        stats["frames"] += 1
                        if isinstance(item.payload, bytes):
                            await session.ws.send_bytes(item.payload)
                        else:
                            await session.ws.send_text(item.payload)
            except BROKEN:
                pass  # closed under us: checked by the caller

        async def example(sent: list[Frame]) -> None:
            stats["examples"] += 1
            oversize = any(item.oversize for item in sent)
            async with open_session(port, token) as session:
                await send_all(session, sent)
                if oversize:
                    await session.wait_for(lambda: False)
                    assert session.closed is not None and session.closed.code == 1009, session.closed
                    stats["closed_1009"] += 1
                else:
                    await session.wait_answered("marker-1")
                    await wait_for(lambda: atlas_requests() == 0, 10, "every agent request ends")
                    await session.wait_answered("marker-2")
                    assert not session.unfinished_requests(), session.received[-10:]
                    await ping_pong(session)
            if oversize:
                async with open_session(port, token) as session:
                    await ping_pong(session)
            await wait_for(lambda: atlas_tasks() <= baseline, 10,
                           lambda: f"the server's tasks back to {baseline} (now {atlas_tasks()})")

        @fuzz_settings(100, 2000)
        @given(frames)
        def check(sent: list[Frame]) -> None:
            in_trio(example)(sent)

        await run_given(check)
        assert atlas_tasks() <= baseline
    record("fuzz websocket", examples=stats["examples"], frames=stats["frames"],
           closed_1009=stats["closed_1009"], failed=0, task_baseline=baseline)


async def test_huge_floods_are_all_answered_in_order(tmp_path):
    """A client that sends thousands of frames without reading gets every answer, in order (it
    only slows itself down), and a peer in the same room is unaffected."""
    count = scaled(2000, 50_000)
    async with open_atlas(tmp_path, users={"alice": None}) as server:
        port = int(server.url.rsplit(":", 1)[1])
        token = server.tokens["alice"]
        async with open_session(port, token) as flooder, open_session(port, token) as peer:
            for n in range(count):
                await flooder.ws.send_json({"type": "agent:cancel", "id": f"n{n}"})
            await flooder.wait_for(lambda: len(flooder.received) >= count, timeout=scaled(10, 120))
            assert [m["id"] for m in flooder.received] == [f"n{n}" for n in range(count)]
            await ping_pong(peer)


def unmasked(opcode: int, payload: bytes) -> bytes:
    return bytes([0x80 | opcode, len(payload)]) + payload  # a client frame must be masked


@pytest.mark.parametrize(("payload", "code"), [
    pytest.param(frame(0x1, b'{"type":"ping"}\xff'), 1007, id="invalid-utf8"),
    pytest.param(frame(0x1, '{"type":"ping","x":"\u00e9"}'.encode()[:-3] + b'"}'), 1007, id="truncated-utf8"),
    pytest.param(frame(0x1, b'{"type":"ping"}', fin=False) + frame(0x0, b"\xc3"), 1007, id="utf8-split-at-the-end"),
    pytest.param(unmasked(0x1, b'{"type":"ping"}'), 1002, id="unmasked"),
    pytest.param(frame(0x3, b"x"), 1002, id="reserved-opcode"),
])
async def test_a_protocol_violation_is_closed_with_its_code(tmp_path, payload, code):
    """Found by this suite: Hypercorn dropped the TCP connection without a close frame (the
    client saw 1006). RFC 6455 7.1.7 and 8.1: a close frame with 1007 for a text message that is
    not UTF-8, 1002 for other violations (atlas/gateway/websocket_stream.py)."""
    async with open_atlas(tmp_path, users={"alice": None}) as server:
        port = int(server.url.rsplit(":", 1)[1])
        ws = await RawWebSocket.open(port, f"/party/alice?token={server.tokens['alice']}")
        assert (await ws.receive_json())["type"] == "ready"
        await ws.send_raw(payload)
        with pytest.raises(Closed) as closed:
            await ws.receive_json()
        await ws.abort()
        assert closed.value.code == code, closed.value
        await wait_for(lambda: atlas_connections() == 0, 5, "the connection gone")


async def test_the_size_limit_counts_bytes(tmp_path):
    async with open_atlas(tmp_path, users={"alice": None}, max_message_bytes=MAX_MESSAGE) as server:
        port = int(server.url.rsplit(":", 1)[1])
        async with open_session(port, server.tokens["alice"]) as session:
            # 60,000 characters, 240,000 bytes: well over the 128 KiB limit.
            data = "\U0001F600" * 60_000
            await session.ws.send_text(json.dumps({"type": "broadcast", "data": data}, ensure_ascii=False))
            await session.ws.send_json({"type": "ping"})  # answered only if the frame was taken
            await session.wait_for(lambda: any(m["type"] == "pong" for m in session.received))
            assert session.closed is not None and session.closed.code == 1009, session.received
