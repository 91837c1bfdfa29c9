"""The VoltAgent-compatible agent HTTP API: its ASGI app, SSE dialects, the remote-agent client and `atlas agent`."""
