"""The published ``partysocket`` npm client against Atlas, through ``tests/partysocket/check.mjs``:
ready, a streamed reply, a server restart on the same port that partysocket survives by
reconnecting, and a message sent while disconnected that it delivers after; and a resumable reply
whose connection is killed mid-way. The script prints one JSON event per line; the tests restart
the server, or cut the connection, on cue."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import trio
from fake_provider import Reply, open_fake_provider
from servers import WAIT, add_user, free_port, open_atlas, start_atlas_process
from tcp_proxy import open_tcp_proxy

HERE = Path(__file__).parent / "partysocket"
NODE = shutil.which("node")
pytestmark = pytest.mark.skipif(NODE is None, reason="node is not installed")
NOT_INSTALLED = 3  # check.mjs: partysocket/ws could not be installed (no registry)


class Events:
    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self.stream = stream
        self.buffer = b""
        self.seen: list[dict[str, Any]] = []

    async def next(self, name: str) -> dict[str, Any]:
        """The next event called ``name`` (others are kept in ``seen``)."""
        while True:
            while b"\n" in self.buffer:
                line, _, self.buffer = self.buffer.partition(b"\n")
                if not line.startswith(b"{"):
                    continue  # not an event (npm may print while installing)
                event = json.loads(line)
                self.seen.append(event)
                if event["event"] == "failed":
                    raise AssertionError(f"check.mjs failed: {event['message']}")
                if event["event"] == "not-installed":
                    pytest.skip(f"partysocket could not be installed: {event['message']}")
                if event["event"] == name:
                    return event
            data = await self.stream.receive_some(65536)
            if not data:
                raise AssertionError(f"check.mjs ended before {name!r}; events: {self.seen}")
            self.buffer += data


async def test_partysocket_streams_and_survives_a_restart(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    token = add_user(data_dir, "alice")
    bind = f"127.0.0.1:{free_port()}"
    servers = [await start_atlas_process(data_dir, bind=bind)]
    node_env = {k: v for k, v in os.environ.items() if not k.startswith("ATLAS_")}
    process = await trio.lowlevel.open_process(
        [NODE, str(HERE / "check.mjs"), "--url", servers[0].url, "--user", "alice",
         "--token", token, "--restart"],
        cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=node_env,
    )
    assert process.stdout is not None
    events = Events(process.stdout)
    try:
        # The first run may have to `npm install` (check.mjs does it), hence the longer wait.
        with trio.fail_after(WAIT * 12):
            ready = await events.next("ready")
        with trio.fail_after(WAIT * 3):
            assert ready["url"] == servers[0].url.replace("http://", "ws://") + "/parties/main/alice"
            first = await events.next("done")
            assert first["deltas"] >= 1 and "hello from partysocket" in first["text"]

            await events.next("waiting-for-restart")
            assert await trio.to_thread.run_sync(servers[0].terminate) == 0
            closed = await events.next("closed")
            assert closed["code"] == 1001  # the server said it was shutting down
            await events.next("queued")  # sent while disconnected
            servers.append(await start_atlas_process(data_dir, bind=bind))

            again = await events.next("reconnected")
            assert again["pk"] == ready["pk"]  # the same partysocket client, reconnected
            queued = await events.next("done")
            assert "queued while offline" in queued["text"]
            await events.next("passed")
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        if process.returncode not in (0, NOT_INSTALLED, None, -9) and process.stderr is not None:
            with trio.move_on_after(1):
                print((await process.stderr.receive_some(65536)).decode(errors="replace"))
        for server in servers:
            if server.process.poll() is None:
                server.kill()


async def test_partysocket_resumes_a_reply_after_its_connection_is_killed(tmp_path: Path) -> None:
    """The connection dies mid-reply (a TCP reset: no close frame); partysocket reconnects by
    itself, the client resumes from the last seq it showed, and the reply is printed whole, once.
    While the reply is held, the server's pings (every 0.5 s here) go unnoticed: partysocket's
    ``ws`` answers them, so the only reconnect is the one the cut causes."""
    pieces = ["Alpha ", "beta ", "gamma ", "delta."]
    async with open_fake_provider() as provider, open_atlas(
        tmp_path, users={"alice": None}, provider_url=provider.url, ws_ping_interval_seconds=0.5
    ) as server, open_tcp_proxy(int(server.url.rsplit(":", 1)[1])) as proxy:
        gate = trio.Event()
        provider.behaviour = Reply(deltas=pieces, gate=gate, hold_after=2)
        node_env = {k: v for k, v in os.environ.items() if not k.startswith("ATLAS_")}
        process = await trio.lowlevel.open_process(
            [NODE, str(HERE / "check.mjs"), "--url", proxy.url, "--user", "alice",
             "--token", server.tokens["alice"], "--resume"],
            cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=node_env,
        )
        assert process.stdout is not None
        events = Events(process.stdout)
        try:
            with trio.fail_after(WAIT * 12):
                ready = await events.next("ready")
            with trio.fail_after(WAIT * 3):
                holding = await events.next("holding")
                assert holding == {"event": "holding", "seq": 2, "text": "Alpha beta "}
                await trio.sleep(2.5)  # the time itself is the test: pings go back and forth
                assert proxy.accepted == 1
                assert await proxy.cut() == 1
                closed = await events.next("closed")
                assert closed["code"] == 1006  # no close frame: the connection died
                resumed = await events.next("resumed")
                assert resumed == {"event": "resumed", "id": "ps-r", "after": 2}
                gate.set()
                reply = await events.next("reply")
                assert reply["text"] == "".join(pieces) and reply["seq"] == len(pieces)
                await events.next("passed")
                assert await process.wait() == 0
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        assert [e["event"] for e in events.seen].count("reply") == 1
        assert proxy.accepted == 2 and ready["pk"]  # partysocket's own reconnect, through the proxy
        assert len(provider.completions()) == 1
