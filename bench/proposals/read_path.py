"""PROPOSAL support: CPU per delta of reading a provider's SSE stream, several ways, in one process.

    .venv/bin/python -m bench.proposals.read_path MODE STREAMS DELTAS

MODE: ``client`` (``httpx.AsyncClient`` streaming, ``aiter_bytes``), ``transport`` (httpx's
``AsyncHTTPTransport`` used directly, iterating ``response.stream``), ``lean``
(``atlas.lean_http.LeanTransport``, the same way), ``bare`` (a trio
``receive_some`` loop that parses nothing: the floor). Every mode but ``bare`` parses the events
with ``atlas.llm.provider``'s SSE parser and chunk decoder. Starts ``bench.provider`` itself; the
streams start 1/STREAMS s apart and get 30 deltas/s each; prints CPU seconds per delta.
"""
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import httpx
import trio

from atlas.llm.provider import _Reply
from atlas.llm.sse import SseDataParser
from bench.proposals.lean_http_baseline import LeanTransport

REPO = Path(__file__).resolve().parents[2]
RATE = 30


def request_body(deltas: int) -> bytes:
    return json.dumps({"model": "m", "stream": True, "messages": [
        {"role": "user", "content": f"bench deltas={deltas} rate={RATE}"}]}).encode()


def parse(chunk: bytes, parser: SseDataParser, reply: _Reply) -> int:
    count = 0
    for event in parser.feed(chunk):
        if event != b"[DONE]":
            count += len(reply.apply(event))
    return count


async def via_client(client: httpx.AsyncClient, url: str, body: bytes, counts: list[int]) -> None:
    request = client.build_request("POST", f"{url}/chat/completions", content=body,
                                   headers={"Authorization": "Bearer k", "Content-Type": "application/json"})
    response = await client.send(request, stream=True)
    parser, reply = SseDataParser(), _Reply()
    try:
        async for chunk in response.aiter_bytes():
            counts[0] += parse(chunk, parser, reply)
    finally:
        await response.aclose()


async def via_transport(transport: httpx.AsyncBaseTransport, url: str, body: bytes, counts: list[int]) -> None:
    request = httpx.Request("POST", f"{url}/chat/completions", content=body,
                            headers={"Authorization": "Bearer k", "Content-Type": "application/json"},
                            extensions={"timeout": httpx.Timeout(60.0).as_dict()})
    response = await transport.handle_async_request(request)
    parser, reply = SseDataParser(), _Reply()
    try:
        async for chunk in response.stream:  # type: ignore[union-attr]
            counts[0] += parse(chunk, parser, reply)
    finally:
        await response.aclose()


async def bare(host: str, port: int, body: bytes, counts: list[int]) -> None:
    stream = await trio.open_tcp_stream(host, port)
    await stream.send_all((
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer k\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body)
    tail = b""
    while chunk := await stream.receive_some(65536):
        counts[0] += chunk.count(b"@")
        tail = (tail + chunk)[-7:]
        if tail.endswith(b"0\r\n\r\n"):
            break
    await stream.aclose()


async def main(mode: str, streams: int, deltas: int) -> None:
    provider = await trio.lowlevel.open_process(
        [sys.executable, "-m", "bench.provider"], stdout=subprocess.PIPE, cwd=str(REPO))
    line = b""
    while not line.endswith(b"\n"):
        line += await provider.stdout.receive_some(100)  # type: ignore[union-attr]
    url = line.split()[1].decode()
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    body = request_body(deltas)
    counts = [0]
    client = httpx.AsyncClient(trust_env=False, timeout=60.0,
                               limits=httpx.Limits(max_connections=1000, max_keepalive_connections=100))
    transport: httpx.AsyncBaseTransport = (
        LeanTransport() if mode == "lean" else
        httpx.AsyncHTTPTransport(limits=httpx.Limits(max_connections=1000, max_keepalive_connections=100))
    )
    async with client, transport:
        cpu, wall = time.process_time(), time.monotonic()
        async with trio.open_nursery() as nursery:
            for _ in range(streams):
                if mode == "client":
                    nursery.start_soon(via_client, client, url, body, counts)
                elif mode == "bare":
                    nursery.start_soon(bare, "127.0.0.1", port, body, counts)
                else:
                    nursery.start_soon(via_transport, transport, url, body, counts)
                await trio.sleep(1.0 / streams)
        cpu = time.process_time() - cpu
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(f"{mode}: {streams} streams, {counts[0]} deltas, {cpu / max(1, counts[0]) * 1e6:.1f} us CPU/delta "
          f"(wall {time.monotonic() - wall:.1f}s, voluntary switches {usage.ru_nvcsw})")
    provider.kill()


if __name__ == "__main__":
    trio.run(main, sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
