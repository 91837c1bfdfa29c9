"""Streams that survive a dropped connection: a real server on port 0, real WebSocket clients, the
fake provider held mid-reply by a gate so that every drop happens exactly where the test says.

The rule every test checks: the text a client had before it dropped, plus the text it got after
``agent:resume``, is ``agent:done``'s text, exactly: nothing lost, nothing twice."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
from fake_provider import FakeProvider, Reply, open_fake_provider
from servers import WAIT, AtlasServer, connect, open_atlas, ready, send_json
from trio_websocket import WebSocketConnection

PIECES = ["Alpha ", "beta ", "gamma ", "delta."]
REPLY = "".join(PIECES)
REFUSALS = ("bad_message", "unknown_request")  # answers to a message, not ends of a request


@dataclass
class Client:
    """One connection of alice's, keeping what it was told of each request: the text of its
    deltas (each ``seq`` must grow) and its final frame."""

    ws: WebSocketConnection
    text: dict[str, str] = field(default_factory=dict)
    seq: dict[str, int] = field(default_factory=dict)
    final: dict[str, dict[str, Any]] = field(default_factory=dict)

    async def send(self, message: dict[str, Any]) -> None:
        await send_json(self.ws, message)

    async def until(self, predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        with trio.fail_after(WAIT):
            while True:
                frame = json.loads(await self.ws.get_message())
                request_id = frame.get("id")
                if frame["type"] == "agent:delta":
                    assert frame["seq"] > self.seq.get(request_id, 0), frame  # never back, never twice
                    self.text[request_id] = self.text.get(request_id, "") + frame["text"]
                    self.seq[request_id] = frame["seq"]
                elif frame["type"] == "agent:done" or (
                    frame["type"] == "agent:error" and frame["error"]["code"] not in REFUSALS
                ):
                    assert request_id not in self.final, frame  # one end per request
                    self.final[request_id] = frame
                if predicate(frame):
                    return frame

    async def until_seq(self, request_id: str, seq: int) -> None:
        if self.seq.get(request_id, 0) < seq:
            await self.until(lambda f: self.seq.get(request_id, 0) >= seq)

    async def until_end(self, request_id: str) -> dict[str, Any]:
        return await self.until(lambda f: f.get("id") == request_id and f["type"] in ("agent:done", "agent:error"))

    async def answer(self, message: dict[str, Any], kind: str) -> dict[str, Any]:
        await self.send(message)
        return await self.until(lambda f: f["type"] == kind)

    async def requests(self) -> dict[str, dict[str, Any]]:
        listed = await self.answer({"type": "agent:list"}, "agent:requests")
        return {r["id"]: r for r in listed["requests"]}


@asynccontextmanager
async def open_server(tmp_path: Path, **settings: Any) -> AsyncIterator[tuple[AtlasServer, FakeProvider]]:
    async with open_fake_provider() as provider, open_atlas(
        tmp_path, users={"alice": None}, provider_url=provider.url, provider_retries=0, **settings
    ) as server:
        yield server, provider


@asynccontextmanager
async def open_client(server: AtlasServer) -> AsyncIterator[Client]:
    async with connect(server.ws_url("alice", server.tokens["alice"])) as ws:
        await ready(ws)
        yield Client(ws)


def stream(request_id: str, **fields: Any) -> dict[str, Any]:
    return {"type": "agent:stream", "id": request_id, "message": "tell me", "resumable": True, **fields}


async def wait_state(client: Client, request_id: str, state: str) -> dict[str, Any]:
    """Ask ``agent:list`` until the request is in ``state`` (each ask is a round trip)."""
    with trio.fail_after(WAIT):
        while (entry := (await client.requests()).get(request_id, {})).get("state") != state:
            await trio.sleep(0.01)
    return entry


# Where the first connection drops: after k of the 4 pieces (the provider held there), with the
# request still running; or after 2 pieces, the request finishing while no one is attached.
@pytest.mark.parametrize("k, finish_while_away", [(0, False), (2, False), (4, False), (2, True)],
                         ids=["before-any-delta", "mid-reply", "after-the-last-delta", "done-while-away"])
async def test_drop_after_k_deltas_and_resume(tmp_path: Path, k: int, finish_while_away: bool) -> None:
    async with open_server(tmp_path) as (server, provider):
        gate = trio.Event()
        provider.behaviour = Reply(deltas=PIECES, gate=gate, hold_after=k)
        async with open_client(server) as first:
            await first.send(stream("r1"))
            await first.until(lambda f: f["type"] == "agent:start")
            await first.until_seq("r1", k)
            before = first.text.get("r1", "")
            after = first.seq.get("r1", 0)
            assert after == k and before == "".join(PIECES[:k])
        async with open_client(server) as second:
            if finish_while_away:
                gate.set()
                await wait_state(second, "r1", "done")
            await second.send({"type": "agent:resume", "id": "r1", "after": after})
            gate.set()
            done = await second.until_end("r1")
    assert done["type"] == "agent:done", done
    assert before + second.text.get("r1", "") == done["text"] == REPLY
    assert done["seq"] == len(PIECES)
    assert len(provider.completions()) == 1  # resumed, never asked again


async def test_a_finished_request_replays_from_any_point_for_the_grace_period(tmp_path: Path) -> None:
    async with open_server(tmp_path) as (server, provider):
        provider.behaviour = Reply(deltas=PIECES)
        async with open_client(server) as first:
            await first.send(stream("r1"))
            done = await first.until_end("r1")
            assert first.text["r1"] == done["text"] == REPLY and done["seq"] == 4
        async with open_client(server) as later:
            for after in range(len(PIECES) + 1):
                await later.send({"type": "agent:resume", "id": "r1", "after": after})
                replayed = await later.until(lambda f: f["type"] == "agent:done")
                later.final.clear()
                text = later.text.pop("r1", "")
                later.seq.clear()
                assert "".join(PIECES[:after]) + text == replayed["text"] == REPLY
                assert replayed["seq"] == len(PIECES)


async def test_a_second_connection_resumes_while_the_first_is_still_attached(tmp_path: Path) -> None:
    async with open_server(tmp_path) as (server, provider):
        gate = trio.Event()
        provider.behaviour = Reply(deltas=PIECES, gate=gate, hold_after=2)
        async with open_client(server) as first, open_client(server) as second:
            await first.send(stream("r1"))
            await first.until_seq("r1", 2)
            await second.send({"type": "agent:resume", "id": "r1", "after": 1})
            await second.until_seq("r1", 2)  # the catch-up: piece 2, as one delta
            assert second.text["r1"] == PIECES[1]
            gate.set()
            done_first = await first.until_end("r1")
            done_second = await second.until_end("r1")
    assert first.text["r1"] == done_first["text"] == REPLY
    assert PIECES[0] + second.text["r1"] == done_second["text"] == REPLY


async def test_not_resumable_the_drop_cancels_and_closes_the_provider_request(tmp_path: Path) -> None:
    async with open_server(tmp_path) as (server, provider):
        provider.behaviour = Reply(deltas=PIECES, gate=trio.Event(), hold_after=1)
        async with open_client(server) as first:
            await first.send({"type": "agent:stream", "id": "r1", "message": "x"})  # resumable: default off
            await first.until_seq("r1", 1)
        with trio.fail_after(WAIT):
            await provider.wait_disconnect()
        async with open_client(server) as second:
            unknown = await second.answer({"type": "agent:resume", "id": "r1", "after": 1}, "agent:error")
            assert unknown["id"] == "r1" and unknown["error"]["code"] == "unknown_request"
            assert await second.requests() == {}


async def test_prefs_make_requests_resumable_by_default(tmp_path: Path) -> None:
    async with open_server(tmp_path) as (server, provider):
        gate = trio.Event()
        provider.behaviour = Reply(deltas=PIECES, gate=gate, hold_after=1)
        async with open_client(server) as first:
            await first.answer({"type": "prefs:set", "prefs": {"resumable": True}}, "prefs")
            await first.send({"type": "agent:stream", "id": "r1", "message": "x"})
            await first.until_seq("r1", 1)
        async with open_client(server) as second:
            await second.send({"type": "agent:resume", "id": "r1", "after": 1})
            gate.set()
            done = await second.until_end("r1")
    assert PIECES[0] + second.text["r1"] == done["text"] == REPLY


async def test_the_grace_running_out_cancels_the_provider_request(tmp_path: Path) -> None:
    async with open_server(tmp_path, resume_grace_seconds=0.2) as (server, provider):
        provider.behaviour = Reply(deltas=PIECES, gate=trio.Event(), hold_after=1)
        async with open_client(server) as first:
            await first.send(stream("r1"))
            await first.until_seq("r1", 1)
        with trio.fail_after(WAIT):
            await provider.wait_disconnect()  # the grace ran out: the provider request closed
        async with open_client(server) as second:
            unknown = await second.answer({"type": "agent:resume", "id": "r1", "after": 1}, "agent:error")
            assert unknown["error"]["code"] == "unknown_request"
            # A finished request is forgotten when its grace runs out, too.
            provider.behaviour = Reply(deltas=PIECES)
            await second.send(stream("r2"))
            await second.until_end("r2")
            with trio.fail_after(WAIT):
                while "r2" in await second.requests():
                    await trio.sleep(0.02)
            unknown = await second.answer({"type": "agent:resume", "id": "r2", "after": 0}, "agent:error")
            assert unknown["error"]["code"] == "unknown_request"


async def test_the_buffer_bound_holds_under_a_long_reply(tmp_path: Path) -> None:
    bound = 100
    long_pieces = [f"{n:09d}," for n in range(30)]  # 300 characters, three times the bound
    async with open_server(tmp_path, resume_buffer_bytes=bound) as (server, provider):
        async with open_client(server) as client:
            provider.behaviour = Reply(deltas=["short ", "one"])
            await client.send(stream("short"))
            await client.until_end("short")
            assert (await client.requests())["short"]["state"] == "done"  # 9 characters: kept

            gate = trio.Event()
            provider.behaviour = Reply(deltas=long_pieces, gate=gate, hold_after=15)
            await client.send(stream("long"))
            await client.until_seq("long", 15)
            # 150 characters running: over the bound, so the finished reply made room...
            kept = await client.requests()
            assert list(kept) == ["long"] and kept["long"] == {
                "id": "long", "agentId": "atlas-assistant", "state": "running", "seq": 15}
            # ...but a running reply is never cut: a resume from the start is still exact.
            async with open_client(server) as other:
                await other.send({"type": "agent:resume", "id": "long", "after": 0})
                await other.until_seq("long", 15)
                gate.set()
                done = await other.until_end("long")
                assert other.text["long"] == done["text"] == "".join(long_pieces)
            await client.until_end("long")
            # Ended larger than the bound: not kept.
            assert await client.requests() == {}
            unknown = await client.answer({"type": "agent:resume", "id": "long", "after": 30}, "agent:error")
            assert unknown["error"]["code"] == "unknown_request"

            # Finished replies are kept while they fit, the oldest going first.
            provider.behaviour = Reply(deltas=["x" * 40])
            for n in range(4):
                await client.send(stream(f"f{n}"))
                await client.until_end(f"f{n}")
                kept = await client.requests()
                assert sum(40 for _ in kept) <= bound
                assert list(kept) == [f"f{m}" for m in range(max(0, n - 1), n + 1)]


async def test_cancel_a_resumed_request_from_another_connection(tmp_path: Path) -> None:
    async with open_server(tmp_path) as (server, provider):
        provider.behaviour = Reply(deltas=PIECES, gate=trio.Event(), hold_after=1)
        async with open_client(server) as first:
            await first.send(stream("r1"))
            await first.until_seq("r1", 1)
        async with open_client(server) as resumed, open_client(server) as other:
            await resumed.send({"type": "agent:resume", "id": "r1", "after": 1})
            await wait_state(other, "r1", "running")
            await other.send({"type": "agent:cancel", "id": "r1"})
            cancelled = await resumed.until_end("r1")
            assert cancelled["type"] == "agent:error" and cancelled["error"]["code"] == "cancelled"
            with trio.fail_after(WAIT):
                await provider.wait_disconnect()
            # It stays listed as ended in error, and resuming it says how it ended.
            assert (await other.requests())["r1"]["state"] == "error"
            await other.send({"type": "agent:resume", "id": "r1", "after": 0})
            again = await other.until_end("r1")
            assert again["error"]["code"] == "cancelled" and other.text["r1"] == PIECES[0]
            # A request that is over cannot be cancelled.
            late = await other.answer({"type": "agent:cancel", "id": "r1"}, "agent:error")
            assert late["error"]["code"] == "bad_message"


async def test_agent_list_after_a_reload(tmp_path: Path) -> None:
    async with open_server(tmp_path) as (server, provider):
        gate = trio.Event()
        async with open_client(server) as page:
            provider.behaviour = Reply(deltas=["done", " already"])
            await page.send(stream("old", agentId="atlas-assistant"))
            await page.until_end("old")
            provider.behaviour = Reply(deltas=PIECES, gate=gate, hold_after=3)
            await page.send(stream("new"))
            await page.until_seq("new", 3)
            await page.send({"type": "agent:stream", "id": "plain", "message": "not resumable"})
            await page.until_seq("plain", 3)
        async with open_client(server) as reloaded:  # the page lost its ids
            listed = await reloaded.answer({"type": "agent:list"}, "agent:requests")
            assert listed == {"type": "agent:requests", "requests": [
                {"id": "old", "agentId": "atlas-assistant", "state": "done", "seq": 2},
                {"id": "new", "agentId": "atlas-assistant", "state": "running", "seq": 3},
            ]}
            await reloaded.send({"type": "agent:resume", "id": "new", "after": 0})
            gate.set()
            done = await reloaded.until_end("new")
    assert reloaded.text["new"] == done["text"] == REPLY


async def test_unknown_ids_reused_ids_and_bad_resumes(tmp_path: Path) -> None:
    async with open_server(tmp_path) as (server, provider):
        gate = trio.Event()
        provider.behaviour = Reply(deltas=PIECES, gate=gate, hold_after=2)
        async with open_client(server) as client, open_client(server) as other:
            unknown = await client.answer({"type": "agent:resume", "id": "nope", "after": 0}, "agent:error")
            assert unknown == {"type": "agent:error", "id": "nope", "error": {
                "code": "unknown_request", "message": unknown["error"]["message"]}}

            await client.send(stream("r1"))
            await client.until_seq("r1", 2)
            for connection in (client, other):  # the id is taken in the whole room
                for resumable in (True, False):
                    reused = await connection.answer(stream("r1", resumable=resumable), "agent:error")
                    assert reused["id"] == "r1" and reused["error"]["code"] == "bad_message"
            twice = await client.answer({"type": "agent:resume", "id": "r1", "after": 0}, "agent:error")
            assert twice["error"]["code"] == "bad_message"  # already streaming to this connection
            beyond = await other.answer({"type": "agent:resume", "id": "r1", "after": 3}, "agent:error")
            assert beyond["error"]["code"] == "bad_message"
            negative = await other.answer({"type": "agent:resume", "id": "r1", "after": -1}, "agent:error")
            assert negative["error"]["code"] == "bad_message"
            gate.set()
            await client.until_end("r1")
            reused = await other.answer(stream("r1"), "agent:error")
            assert reused["error"]["code"] == "bad_message"  # still resumable once ended
        assert len(provider.completions()) == 1


async def test_a_connection_too_far_behind_is_dropped_and_the_others_go_on() -> None:
    from atlas.gateway.connection import OUTBOX_SIZE, Connection
    from atlas.gateway.streams import RoomStreams, Stream
    from atlas.protocol import CLOSE_TOO_SLOW

    streams = RoomStreams(grace=60, limit=1000)
    stream = Stream("r1", "atlas-assistant", trio.CancelScope(), streaming=True, room=streams)
    streams.add(stream)
    fast, slow = Connection("fast"), Connection("slow")
    for _ in range(OUTBOX_SIZE):
        assert slow.send_nowait("{}")  # a client that stopped reading
    stream.attach(fast)
    stream.attach(slow)
    assert stream.delta("Alpha ") is None  # a resumable request's delta never waits
    assert slow.close_code == CLOSE_TOO_SLOW and list(stream.attached) == [fast]
    assert stream.delta("beta ") is None
    frame = json.loads(fast._outbox_receive.receive_nowait().take_frame())
    assert frame == {"type": "agent:delta", "id": "r1", "text": "Alpha beta ", "seq": 2}
    assert streams.size == len("Alpha beta ")


async def test_shutdown_cancels_resumable_requests_at_once(tmp_path: Path) -> None:
    with trio.fail_after(WAIT):
        async with open_server(tmp_path, shutdown_seconds=60) as (server, provider):
            provider.behaviour = Reply(deltas=PIECES, gate=trio.Event(), hold_after=1)
            async with open_client(server) as client:
                await client.send(stream("r1"))
                await client.until_seq("r1", 1)
            provider.behaviour = Reply(deltas=PIECES)
            async with open_client(server) as client:
                await client.send(stream("r2"))
                await client.until_end("r2")
        # The server stopped without waiting for either grace period (60 s) or its drain (60 s).
        assert provider.completions()[0].disconnected


async def test_a_room_runs_no_more_resumable_requests_than_its_users_connections_could(tmp_path: Path) -> None:
    """They outlive their connection, so reconnecting must not start more and more of them: at
    most ATLAS_MAX_REQUESTS_PER_CONNECTION x ATLAS_MAX_CONNECTIONS_PER_USER run per room."""
    async with open_server(tmp_path, max_requests_per_connection=1, max_connections_per_user=2) as (server, provider):
        gate = trio.Event()
        provider.behaviour = Reply(deltas=PIECES, gate=gate, hold_after=1)
        for request_id in ("r1", "r2"):
            async with open_client(server) as client:
                await client.send(stream(request_id))
                await client.until_seq(request_id, 1)
        async with open_client(server) as client:  # r1 and r2 run on, in their grace period
            refused = await client.answer(stream("r3"), "agent:error")
            assert refused["id"] == "r3" and refused["error"]["code"] == "too_many_requests", refused
            await client.send({"type": "agent:cancel", "id": "r1"})
            await wait_state(client, "r1", "error")
            await client.send(stream("r4"))  # room again
            gate.set()
            done = await client.until_end("r4")
    assert done["type"] == "agent:done" and done["text"] == REPLY
