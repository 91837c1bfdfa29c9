"""Soak: mixed load on an ``atlas serve`` subprocess for a while (10 s quick, 60 s long,
``ATLAS_RELIABILITY_SOAK_SECONDS`` for any other length, 600 for the issue's ten minutes).

At once: streaming agent requests (one in six hits a provider fault: 401, 429, 503, a cut stream,
malformed SSE, a stall midway), prefs writes read back, broadcasts between two connections of a
room, clients that connect, ping and leave, and HTTP room status and proxied agent requests.
Every operation must end as expected; the server's memory is sampled every second and its growth
over the second half (a least-squares slope times the time) must stay under 2 MiB; its log must
hold no traceback and no internal error.
"""

from __future__ import annotations

import contextlib
import os
import random

import trio
from faulty_provider import EXPECTED, open_faulty_provider
from probes import Closed, RawWebSocket, raw_http, record, rss_bytes, scaled, slope
from servers import add_user, start_atlas_process

SECONDS = float(os.environ.get("ATLAS_RELIABILITY_SOAK_SECONDS", scaled(10, 60)))
USERS = ("ann", "ben", "cyd", "dee")
FAULTS = ("auth", "rate", "error503", "cut", "malformed", "stall_mid")
MiB = 1024 * 1024


class Soak:
    def __init__(self, port: int, tokens: dict[str, str], deadline: float) -> None:
        self.port = port
        self.tokens = tokens
        self.deadline = deadline
        self.ops: dict[str, int] = {}
        self.unexpected: list[str] = []
        self.rng = random.Random(14)

    def running(self) -> bool:
        return trio.current_time() < self.deadline

    def count(self, kind: str) -> None:
        self.ops[kind] = self.ops.get(kind, 0) + 1

    @staticmethod
    async def reply(ws: RawWebSocket, timeout: float = 10) -> dict:
        """The next frame that is not a room broadcast (every connection of a room gets those)."""
        with trio.fail_after(timeout):
            while (frame := await ws.receive_json(timeout))["type"] == "broadcast":
                pass
        return frame

    async def open(self, user: str) -> RawWebSocket:
        ws = await RawWebSocket.open(self.port, f"/party/{user}?token={self.tokens[user]}")
        frame = await ws.receive_json()
        if frame["type"] != "ready":
            self.unexpected.append(f"no ready: {frame}")
        return ws

    async def streams(self, user: str, worker: int) -> None:
        ws = await self.open(user)
        n = 0
        while self.running():
            n += 1
            fault = self.rng.choice(FAULTS) if n % 6 == 0 else "ok"
            request_id = f"w{worker}-{n}"
            await ws.send_json({"type": "agent:stream", "id": request_id, "message": f"fault:{fault}"})
            with trio.fail_after(10):
                while (last := await self.reply(ws))["type"] not in ("agent:done", "agent:error"):
                    pass
            code = "done" if last["type"] == "agent:done" else last["error"]["code"]
            if code != EXPECTED[fault] or last["id"] != request_id:
                self.unexpected.append(f"stream {fault}: {last}")
            self.count("stream" if fault == "ok" else "stream fault")
        await ws.close()

    async def prefs(self, user: str) -> None:
        ws = await self.open(user)
        n = 0
        while self.running():
            n += 1
            await ws.send_json({"type": "prefs:set", "prefs": {"soak": n, "theme": "dark" if n % 2 else None}})
            reply = await self.reply(ws)
            if reply.get("type") != "prefs" or reply["prefs"].get("soak") != n:
                self.unexpected.append(f"prefs: {reply}")
            self.count("prefs write")
        await ws.close()

    async def broadcasts(self, user: str) -> None:
        sender, receiver = await self.open(user), await self.open(user)
        async with trio.open_nursery() as nursery:
            # The sender reads too, as every real client does: it answers the server's pings
            # (a client that reads nothing for two ping intervals is closed as dead).
            nursery.start_soon(self.drain, sender)
            n = 0
            while self.running():
                n += 1
                await sender.send_json({"type": "broadcast", "data": {"n": n, "pad": "p" * 512}})
                frame = await receiver.receive_json()
                if frame.get("type") != "broadcast" or frame["data"]["n"] != n:
                    self.unexpected.append(f"broadcast: {frame}")
                self.count("broadcast")
            nursery.cancel_scope.cancel()
        await sender.close()
        await receiver.close()

    @staticmethod
    async def drain(ws: RawWebSocket) -> None:
        with contextlib.suppress(Closed):
            while True:
                await ws.receive()

    async def churn(self, user: str) -> None:
        while self.running():
            ws = await self.open(user)
            await ws.send_json({"type": "ping"})
            if (await self.reply(ws)).get("type") != "pong":
                self.unexpected.append("churn: no pong")
            await ws.close()
            self.count("connect+leave")

    async def http(self, user: str) -> None:
        bearer = [(b"authorization", f"Bearer {self.tokens[user]}".encode())]
        while self.running():
            status = await raw_http(self.port, b"GET", f"/party/{user}".encode(), bearer)
            proxied = await raw_http(self.port, b"POST", f"/party/{user}?proxy=/agents/atlas-assistant/text".encode(),
                                     bearer + [(b"content-type", b"application/json")], b'{"input": "fault:ok"}')
            for reply in (status, proxied):
                if reply is None or reply.status != 200:
                    self.unexpected.append(f"http: {reply}")
            self.count("http")


async def test_soak(tmp_path):
    async with open_faulty_provider() as provider:
        data_dir = tmp_path / "data"
        tokens = {user: add_user(data_dir, user) for user in USERS}
        process = await start_atlas_process(data_dir, env={
            "ATLAS_PROVIDER_URL": provider.url, "ATLAS_PROVIDER_TIMEOUT": "1", "ATLAS_PROVIDER_RETRIES": "0",
        })
        try:
            pid = process.process.pid
            soak = Soak(int(process.url.rsplit(":", 1)[1]), tokens, trio.current_time() + SECONDS)
            samples: list[tuple[float, float]] = []
            async with trio.open_nursery() as nursery:
                for n, user in enumerate(USERS):
                    nursery.start_soon(soak.streams, user, 2 * n)
                    nursery.start_soon(soak.streams, user, 2 * n + 1)
                    nursery.start_soon(soak.prefs, user)
                    nursery.start_soon(soak.broadcasts, user)
                    nursery.start_soon(soak.churn, user)
                nursery.start_soon(soak.http, USERS[0])
                start = trio.current_time()
                while soak.running():
                    samples.append((trio.current_time() - start, rss_bytes(pid) / MiB))
                    await trio.sleep(1)  # sampling memory once a second
            log = process.log()
            alive = process.process.poll() is None
        finally:
            if process.process.poll() is None:
                process.terminate()
    second_half = samples[len(samples) // 2:]
    mib_per_s = slope(second_half)
    record("soak", seconds=SECONDS, operations=sum(soak.ops.values()), by_kind=soak.ops,
           unexpected=len(soak.unexpected), rss_start_mib=round(samples[0][1], 1),
           rss_end_mib=round(samples[-1][1], 1), rss_slope_second_half_mib_per_min=round(mib_per_s * 60, 2),
           rss_every_10s_mib=[round(rss, 1) for _, rss in samples[::10]])
    assert alive
    assert not soak.unexpected, soak.unexpected[:10]
    assert "Traceback" not in log and "internal" not in log, log[-3000:]
    # About zero: the fitted growth over the second half (after CPython's warm-up) under 2 MiB,
    # whatever the length (over a 10-minute soak, 0.4 MiB a minute). Measured: 0.55 MiB in 10 s,
    # 0.8 MiB in 60 s, 1 MiB in 300 s; a leak of a few KiB per operation would be tens of MiB.
    half_seconds = second_half[-1][0] - second_half[0][0]
    assert mib_per_s * half_seconds < 2.0, samples
