import trio, json, sys
from servers import open_atlas
from fake_provider import Reply
from probes import RawWebSocket, atlas_tasks, task_stacks, _atlas_task, idle_atlas_tasks, wait_for, atlas_connections
from test_fuzz_websocket import open_session, ping_pong
import hypercorn.protocol.ws_stream as W

LOG = {}
orig_handle = W.WSStream.handle
async def handle(self, event):
    LOG.setdefault(id(self), []).append(("in", type(event).__name__, self.closed, self.state.name if hasattr(self.state, "name") else self.state))
    await orig_handle(self, event)
    LOG[id(self)].append(("in-done", type(event).__name__))
W.WSStream.handle = handle
orig_put = None

async def test_explore(tmp_path, provider):
    provider.behaviour = Reply(deltas=["fuzz ", "reply"])
    async with open_atlas(tmp_path, users={"alice": None}, provider_url=provider.url) as server:
        port = int(server.url.rsplit(":", 1)[1])
        tok = server.tokens['alice']
        base = await idle_atlas_tasks()
        for i in range(300):
            LOG.clear()
            async with trio.open_nursery() as nursery:
                s = await open_session(port, tok, nursery)
                await s.ws.send_text(json.dumps({"type": "agent:stream", "message": "\u00bd\U000b248b", "options": {}}, ensure_ascii=False))
                await s.ws.send_text('{"type": "prefs:get"}')
                await s.wait_for(lambda: any(m["type"] == "agent:done" for m in s.received))
                await ping_pong(s, "m")
                await s.close()
            if i == 0:
                base = await idle_atlas_tasks()
            try:
                await wait_for(lambda: atlas_tasks() <= base, 3, "x")
            except AssertionError:
                print("STUCK at", i, s.received, s.closed)
                for k, v in LOG.items(): print(k, v)
                print("\n".join(task_stacks(_atlas_task())))
                raise
