"""The transport: the server, its ASGI app, the WebSocket endpoint and connections, the relay, the proxy and auth."""
