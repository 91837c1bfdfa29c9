"""Shutdown ends what uses a resource before the resource: the room tasks (and the requests in
them) end before the provider transport and the clients they call are closed."""

from __future__ import annotations

import trio
from fake_provider import Reply, open_fake_provider
from servers import connect, open_atlas, ready, receive_until, send_json

import atlas.llm.transport
import atlas.rooms


async def test_rooms_end_before_the_provider_transport_is_closed(tmp_path, monkeypatch):
    live_rooms = 0
    rooms_alive_at_close: list[int] = []
    real_run, real_aclose = atlas.rooms.Room.run, atlas.llm.transport.ProviderTransport.aclose

    async def counted_run(self, *args, **kwargs):
        nonlocal live_rooms
        live_rooms += 1
        try:
            await real_run(self, *args, **kwargs)
        finally:
            live_rooms -= 1

    async def recorded_aclose(self):
        rooms_alive_at_close.append(live_rooms)
        await real_aclose(self)

    monkeypatch.setattr(atlas.rooms.Room, "run", counted_run)
    monkeypatch.setattr(atlas.llm.transport.ProviderTransport, "aclose", recorded_aclose)
    async with open_fake_provider() as provider:
        provider.behaviour = Reply(deltas=["a", "b"], gate=trio.Event(), hold_after=1)  # never ends
        async with open_atlas(tmp_path, users={"alice": None}, provider_url=provider.url) as server:
            async with connect(server.ws_url("alice", server.tokens["alice"])) as ws:
                await ready(ws)
                await send_json(ws, {"type": "agent:stream", "id": "s", "message": "hi"})
                await receive_until(ws, "agent:delta")
                assert live_rooms == 1
    assert rooms_alive_at_close == [0]
