"""PROPOSAL support: CPU per delta of reading a provider's SSE stream, four ways, in one process.

    .venv/bin/python -m bench.proposals.read_path MODE STREAMS DELTAS

MODE: ``httpx`` (atlas.provider as it is), ``raw`` (httpx ``aiter_raw``), ``lean``
(``bench/proposals/provider_http.py``'s way: a trio stream and a hand-parsed chunked body), ``bare``
(a trio ``receive_some`` loop that parses nothing: the floor). Starts ``bench.provider`` itself;
the streams start 1/STREAMS s apart and get 30 deltas/s each.
"""
import sys, time, json, trio, subprocess
from atlas.provider import ProviderClient, RetryPolicy, open_http_client, SseDataParser, _Reply
from atlas.agent_types import TextDelta
from atlas.config import Settings

N = int(sys.argv[2]); DELTAS = int(sys.argv[3]); RATE = 30
mode = sys.argv[1]
body = json.dumps({"model": "m", "stream": True, "messages": [{"role": "user", "content": f"bench deltas={DELTAS} rate={RATE}"}]}).encode()

async def httpx_stream(client, url, counts):
    async with client.open_completion(url, "k", body) as events:
        async for e in events:
            if isinstance(e, TextDelta):
                counts[0] += 1

async def raw_stream(http, url, counts):
    import httpx
    req = http.build_request("POST", f"{url}/chat/completions", content=body, headers={"Authorization": "Bearer k", "Content-Type": "application/json"})
    resp = await http.send(req, stream=True)
    parser = SseDataParser(); reply = _Reply()
    try:
        async for raw in resp.aiter_raw():
            for ev in parser.feed(raw):
                if ev == b"[DONE]": continue
                counts[0] += len(reply.apply(ev))
    finally:
        await resp.aclose()

async def bare_stream(host, port, counts):
    stream = await trio.open_tcp_stream(host, port)
    req = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer k\r\n"
           f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
    await stream.send_all(req)
    tail = b""
    while True:
        chunk = await stream.receive_some(65536)
        if not chunk: break
        counts[0] += chunk.count(b"@")
        tail = (tail + chunk)[-7:]
        if tail.endswith(b"0\r\n\r\n"): break
    await stream.aclose()

async def lean_stream(host, port, counts):
    stream = await trio.open_tcp_stream(host, port)
    req = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer k\r\n"
           f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
    await stream.send_all(req)
    buf = b""; parser = SseDataParser(); reply = _Reply()
    # headers
    while b"\r\n\r\n" not in buf:
        buf += await stream.receive_some(65536)
    head, _, buf = buf.partition(b"\r\n\r\n")
    done = False
    with trio.CancelScope() as scope:
        while not done:
            # chunked: size line, data, CRLF
            while True:
                i = buf.find(b"\r\n")
                if i < 0: break
                size = int(buf[:i], 16)
                if len(buf) < i + 2 + size + 2: break
                data = buf[i+2:i+2+size]; buf = buf[i+2+size+2:]
                if size == 0:
                    done = True; break
                for ev in parser.feed(data):
                    if ev == b"[DONE]": continue
                    counts[0] += len(reply.apply(ev))
            if done: break
            scope.deadline = trio.current_time() + 60
            chunk = await stream.receive_some(65536)
            if not chunk: break
            buf += chunk
    await stream.aclose()

async def main():
    proc = await trio.lowlevel.open_process([sys.executable, "-m", "bench.provider"], stdout=subprocess.PIPE, cwd=str(__import__("pathlib").Path(__file__).resolve().parents[2]))
    line = b""
    while not line.endswith(b"\n"):
        line += await proc.stdout.receive_some(100)
    url = line.split()[1].decode()
    host, port = "127.0.0.1", int(url.rsplit(":", 1)[1].split("/")[0])
    counts = [0]
    async with open_http_client(Settings()) as http:
        client = ProviderClient(http, RetryPolicy())
        t = time.process_time(); w = time.monotonic()
        async with trio.open_nursery() as n:
            for i in range(N):
                if mode == "httpx":
                    n.start_soon(httpx_stream, client, url, counts)
                elif mode == "bare":
                    n.start_soon(bare_stream, host, port, counts)
                elif mode == "raw":
                    n.start_soon(raw_stream, http, url, counts)
                else:
                    n.start_soon(lean_stream, host, port, counts)
                await trio.sleep(1.0 / N)
        cpu = time.process_time() - t
    import resource; ru = resource.getrusage(resource.RUSAGE_SELF); print("utime", ru.ru_utime, "stime", ru.ru_stime, "nvcsw", ru.ru_nvcsw, "nivcsw", ru.ru_nivcsw)
    print(f"{mode}: {N} streams, {counts[0]} deltas, {cpu/counts[0]*1e6:.1f} us CPU/delta, wall {time.monotonic()-w:.1f}s")
    proc.kill()

trio.run(main)
