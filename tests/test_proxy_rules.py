"""The proxy's rules as plain functions: which paths may pass, which headers and parameters go on."""

from __future__ import annotations

import pytest

from atlas.gateway.proxy import ProxyRefused, agent_path, forwarded_headers, forwarded_query
from atlas.llm.types import Credentials


@pytest.mark.parametrize("path, expected", [
    ("/agents", "/agents"),
    ("/agents/", "/agents/"),
    ("/agents/atlas-assistant/stream", "/agents/atlas-assistant/stream"),
    ("/agents/atlas%2Dassistant/text", "/agents/atlas-assistant/text"),
])
def test_agent_routes_pass_decoded(path, expected):
    assert agent_path(path) == expected


@pytest.mark.parametrize("path", [
    "/agents/%2e%2e/admin", "/agents/%252e%252e/admin", "/agents/%25252e%25252e/x",
    "/agents%2f..%2fhealthz", "/agents/a%5cb", "/agents/%0d%0aHost:evil", "https:/agents",
    "/agents?x=1", "/agents#frag", "/%61gents/../v1",
])
def test_disguised_paths_are_refused(path):
    with pytest.raises(ProxyRefused):
        agent_path(path)


def test_query_keeps_the_clients_parameters_but_never_the_transports():
    assert forwarded_query(b"proxy=/agents&token=secret&_pk=abc&limit=5&q=a+b") == b"limit=5&q=a+b"


def test_headers_lose_credentials_and_hop_by_hop_and_gain_the_rooms():
    client_headers = [
        (b"content-type", b"application/json"), (b"authorization", b"Bearer t"),
        (b"x-provider-api-key", b"spoof"), (b"x-provider-api-url", b"http://evil/v1"),
        (b"x-user-id", b"mallory"), (b"x-atlas-agent-secret", b"guess"), (b"cookie", b"s=1"),
        (b"connection", b"keep-alive, x-secret-hop"), (b"x-secret-hop", b"1"), (b"te", b"trailers"),
        (b"host", b"atlas"), (b"accept", b"text/event-stream"),
        # Spellings some servers read as X-Provider-API-Key and X-User-ID, and a stranger.
        (b"x_provider_api_key", b"spoof"), (b"x_user_id", b"mallory"), (b"x-custom", b"1"),
        (b"traceparent", b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
    ]
    credentials = Credentials(api_key="sk-room", api_url="http://provider/v1", user_id="alice")
    headers = forwarded_headers(client_headers, credentials, "shared-secret")
    assert headers == [
        (b"content-type", b"application/json"), (b"accept", b"text/event-stream"),
        (b"traceparent", b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        (b"x-provider-api-key", b"sk-room"), (b"x-provider-api-url", b"http://provider/v1"),
        (b"x-user-id", b"alice"), (b"x-atlas-agent-secret", b"shared-secret"),
    ]
