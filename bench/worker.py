"""A load client process: ``python -m bench.worker`` reads its job as one JSON line on stdin.

It speaks line-delimited JSON with the harness: it prints ``{"event": ...}`` lines on stdout and,
for jobs with phases, waits for the next command line on stdin. Everything is bounded by count
and by time. Jobs (``kind``):

- ``first_token``: sequential requests, each done straight to the provider and then through
  Atlas (interleaved, same conditions); time to the first delta of each.
- ``proxy``: sequential requests, straight to the provider and then ``POST /party/...?proxy=``;
  time to the whole response.
- ``streams``: hold N streams (WebSocket to Atlas, or HTTP straight to the provider); on ``go``
  start each at its offset and record every delta's delay: receive time minus provider stamp,
  plus how long its stream's request took to reach the provider (so that a request held back
  makes its deltas late).
- ``idle``: open many WebSocket connections and keep them; on ``ping`` measure ping round trips
  on a sample of them; on ``close`` leave.
- ``cold``: for each user, the first connection (to ``ready``), then a second, warm one.
"""

from __future__ import annotations

import array
import asyncio
import json
import random
import re
import resource
import sys
import time
from functools import partial
from typing import Any
from urllib.parse import quote, urlsplit

from .netclient import HttpConnection, SseStream, open_websocket

STAMP = re.compile(rb"@([0-9]+\.[0-9]+);")
PING = b'{"type":"ping"}'


def emit(event: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"event": event, "cpu_s": time.process_time(), **fields}) + "\n")
    sys.stdout.flush()


async def command(timeout: float) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    line = await asyncio.wait_for(loop.run_in_executor(None, sys.stdin.readline), timeout)
    if not line:
        raise SystemExit(0)
    return json.loads(line)


def ws_url(base: str, user: str, token: str, pk: str = "") -> str:
    parts = urlsplit(base)
    url = f"ws://{parts.netloc}/parties/main/{quote(user)}?token={quote(token)}"
    return url + (f"&_pk={pk}" if pk else "")


def provider_request(provider: str, spec: str) -> tuple[str, int, str, bytes]:
    parts = urlsplit(provider)
    body = json.dumps({
        "model": "bench", "stream": True, "stream_options": {"include_usage": True},
        "messages": [{"role": "system", "content": "You are a bench."}, {"role": "user", "content": spec}],
    }).encode()
    return parts.hostname or "127.0.0.1", parts.port or 80, parts.path + "/chat/completions", body


async def wait_type(ws: Any, kind: str, timeout: float = 10.0) -> tuple[Any, float]:
    deadline = time.monotonic() + timeout
    while True:
        message, t = await ws.receive(max(0.001, deadline - time.monotonic()))
        if message.get("type") == kind:
            return message, t
        if message.get("type") in ("agent:error", "error"):
            raise RuntimeError(f"server error: {message}")


# Sequential scenarios


async def first_token(job: dict[str, Any]) -> None:
    host, port, path, body = provider_request(job["provider"], job["spec"])
    direct = HttpConnection(host, port)
    ws = await open_websocket(ws_url(job["url"], job["user"], job["token"]))
    await wait_type(ws, "ready")
    atlas_ms, direct_ms = [], []
    # Split at the provider's stamp on the first delta: "in" = request sent -> provider wrote its
    # first delta (includes the provider's own work), "out" = that write -> the client has it.
    split: dict[str, list[float]] = {"atlas_in_ms": [], "atlas_out_ms": [], "direct_in_ms": [], "direct_out_ms": []}
    count, warmup = job["count"], job["warmup"]
    for i in range(warmup + count):
        first: list[float] = []
        t0 = time.monotonic()
        _, reply = await direct.request("POST", path, body, {"authorization": "Bearer bench"}, first.append)
        stamp = STAMP.search(reply)
        if i >= warmup:
            direct_ms.append((first[0] - t0) * 1000)
            if stamp:
                split["direct_in_ms"].append((float(stamp.group(1)) - t0) * 1000)
                split["direct_out_ms"].append((first[0] - float(stamp.group(1))) * 1000)
        request = json.dumps({"type": "agent:stream", "message": job["spec"], "id": f"r{i}"}).encode()
        t0 = time.monotonic()
        ws.send(request)
        delta, t_delta = await wait_type(ws, "agent:delta")
        await wait_type(ws, "agent:done")
        stamp = STAMP.search(delta.get("text", "").encode())
        if i >= warmup:
            atlas_ms.append((t_delta - t0) * 1000)
            if stamp:
                split["atlas_in_ms"].append((float(stamp.group(1)) - t0) * 1000)
                split["atlas_out_ms"].append((t_delta - float(stamp.group(1))) * 1000)
        if i % 20 == 0:
            emit("progress", done=i + 1, total=warmup + count)
    ws.close()
    direct.close()
    emit("result", atlas_ms=atlas_ms, direct_ms=direct_ms, **split)


async def proxy(job: dict[str, Any]) -> None:
    host, port, path, body = provider_request(job["provider"], job["spec"])
    direct = HttpConnection(host, port)
    parts = urlsplit(job["url"])
    atlas = HttpConnection(parts.hostname or "127.0.0.1", parts.port or 80)
    target = f"/party/{quote(job['user'])}?proxy=/agents/atlas-assistant/text"
    atlas_body = json.dumps({"input": job["spec"]}).encode()
    auth = {"authorization": f"Bearer {job['token']}"}
    atlas_ms, direct_ms = [], []
    count, warmup = job["count"], job["warmup"]
    for i in range(warmup + count):
        t0 = time.monotonic()
        status, _ = await direct.request("POST", path, body, {"authorization": "Bearer bench"})
        t1 = time.monotonic()
        if status != 200:
            raise RuntimeError(f"provider answered {status}")
        status, reply = await atlas.request("POST", target, atlas_body, auth)
        t2 = time.monotonic()
        if status != 200:
            raise RuntimeError(f"proxy answered {status}: {reply[:200]!r}")
        if i >= warmup:
            direct_ms.append((t1 - t0) * 1000)
            atlas_ms.append((t2 - t1) * 1000)
        if i % 20 == 0:
            emit("progress", done=i + 1, total=warmup + count)
    atlas.close()
    direct.close()
    emit("result", atlas_ms=atlas_ms, direct_ms=direct_ms)


# Streaming capacity


async def streams(job: dict[str, Any]) -> None:
    loop = asyncio.get_running_loop()
    delays = array.array("d")
    stamps = array.array("d")
    done_times: list[float] = []
    counts = {"deltas": 0, "done": 0, "errors": 0}
    spec = job["spec"]
    finished = asyncio.Event()
    total = len(job["streams"])
    error_samples: list[str] = []

    def done_one() -> None:
        counts["done"] += 1
        if counts["done"] >= total:
            finished.set()

    starters: list[tuple[float, Any]] = []
    # A stream's deltas are late by their own delay (arrival - the provider's stamp) plus how long
    # its request took to reach the provider (first stamp - request sent): a server that holds a
    # request back (a full connection pool) makes every delta of it late, though each one, once
    # sent, arrives at once.
    requested: dict[Any, float] = {}
    start_lag: dict[Any, float] = {}

    def on_stamps(stream: Any, data: bytes, t: float) -> None:
        for stamp in STAMP.findall(data):
            sent = float(stamp)
            lag = start_lag.get(stream)
            if lag is None:
                lag = start_lag[stream] = max(0.0, sent - requested.get(stream, sent))
            delays.append(t - sent + lag)
            stamps.append(sent)
            counts["deltas"] += 1

    def request(stream: Any, send: Any) -> None:
        requested[stream] = loop.time()  # time.monotonic(), the provider's clock for its stamps
        send()

    if job["mode"] == "atlas":

        def on_message(message: Any, t: float) -> None:
            kind = message.get("type")
            if kind == "agent:delta":
                on_stamps(message.get("id"), message["text"].encode(), t)
            elif kind == "agent:done":
                done_times.append(t)
                done_one()
            elif kind in ("agent:error", "error"):
                counts["errors"] += 1
                if len(error_samples) < 3:
                    error_samples.append(json.dumps(message)[:300])
                if kind == "agent:error":
                    done_one()

        sockets = []
        semaphore = asyncio.Semaphore(32)

        async def connect(user: str, token: str) -> Any:
            async with semaphore:
                ws = await open_websocket(ws_url(job["url"], user, token))
                await wait_type(ws, "ready")
                ws.on_message = on_message
                return ws

        sockets = await asyncio.gather(*(connect(u, t) for u, t, _ in job["streams"]))
        for index, (ws, (_, _, offset)) in enumerate(zip(sockets, job["streams"])):
            payload = json.dumps({"type": "agent:stream", "message": spec, "id": f"s{index}"}).encode()
            starters.append((offset, partial(request, f"s{index}", partial(ws.send, payload))))
    else:
        host, port, path, body = provider_request(job["provider"], spec)
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nauthorization: Bearer bench\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
        ).encode() + body

        sockets = []
        for index, (_, _, offset) in enumerate(job["streams"]):
            done = loop.create_future()
            done.add_done_callback(lambda _: done_one())
            _, stream = await loop.create_connection(
                lambda done=done, index=index: SseStream(head, partial(on_stamps, index), done), host, port
            )
            sockets.append(stream)
            starters.append((offset, partial(request, index, stream.start)))
    emit("connected", count=len(sockets))
    go = await command(timeout=120)
    start = go["start"]
    for offset, starter in starters:
        loop.call_at(start + offset, starter)  # loop.time() is time.monotonic() on Linux
    try:
        await asyncio.wait_for(finished.wait(), job["timeout"])
    except asyncio.TimeoutError:
        pass
    for ws in sockets:
        if hasattr(ws, "close"):
            ws.close()
        elif ws.transport is not None:
            ws.transport.close()
    # (when the provider sent it, relative to the start, in ms; its delay in us), in arrival order
    emit("result", done_ms=sorted(round((t - start) * 1000, 1) for t in done_times), sent_ms=[round((s - start) * 1000, 2) for s in stamps], delays_us=[int(d * 1e6) for d in delays], start_lags_us=[int(lag * 1e6) for lag in start_lag.values()], deltas=counts["deltas"], done=counts["done"], errors=counts["errors"],
         error_samples=error_samples, streams=total)


# Idle connections


async def idle(job: dict[str, Any]) -> None:
    semaphore = asyncio.Semaphore(job.get("concurrency", 32))
    failures: list[str] = []
    t0 = time.monotonic()

    async def connect(url: str) -> Any:
        async with semaphore:
            try:
                ws = await open_websocket(url, timeout=30, deflate=job.get("deflate", False))
                await wait_type(ws, "ready", 30)
                return ws
            except Exception as exc:  # counted and reported, the run goes on
                if len(failures) < 5:
                    failures.append(f"{type(exc).__name__}: {exc}")
                else:
                    failures.append("")
                return None

    urls = [ws_url(job["url"], user, token) if user else job["url"] for user, token in job["targets"]]
    sockets = [ws for ws in await asyncio.gather(*(connect(u) for u in urls)) if ws is not None]
    emit("connected", ok=len(sockets), failed=len(failures), errors=[f for f in failures if f][:5],
         seconds=time.monotonic() - t0)
    while True:
        cmd = await command(timeout=600)
        if cmd.get("cmd") == "ping":
            rtts = []
            rng = random.Random(cmd.get("seed", 1))
            deadline = time.monotonic() + cmd.get("max_seconds", 30)
            for _ in range(cmd["count"]):
                if not sockets or time.monotonic() > deadline:
                    break
                ws = rng.choice(sockets)
                t = time.monotonic()
                ws.send(PING)
                _, t_pong = await wait_type(ws, "pong", 10)
                rtts.append((t_pong - t) * 1000)
            alive = sum(1 for ws in sockets if not ws.closed.done())
            emit("pinged", rtt_ms=rtts, alive=alive)
        else:
            for ws in sockets:
                ws.close()
            await asyncio.sleep(0.2)
            emit("closed")
            return


# Cold users


async def cold(job: dict[str, Any]) -> None:
    cold_ms, warm_ms = [], []
    for i, (user, token) in enumerate(job["users"]):
        for bucket in (cold_ms, warm_ms):
            t0 = time.monotonic()
            ws = await open_websocket(ws_url(job["url"], user, token))
            _, t = await wait_type(ws, "ready")
            bucket.append((t - t0) * 1000)
            ws.close()
        if i % 25 == 0:
            emit("progress", done=i + 1, total=len(job["users"]))
    emit("result", cold_ms=cold_ms, warm_ms=warm_ms)


JOBS = {"first_token": first_token, "proxy": proxy, "streams": streams, "idle": idle, "cold": cold}


def main() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    job = json.loads(sys.stdin.readline())
    try:
        asyncio.run(asyncio.wait_for(JOBS[job["kind"]](job), job.get("deadline", 600)))
    except Exception as exc:
        emit("failed", error=f"{type(exc).__name__}: {exc}")
        raise SystemExit(1)


if __name__ == "__main__":
    main()
