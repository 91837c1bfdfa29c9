"""Agents config loading, the dev provider, ``serve_agent`` and ``atlas agent``."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys

import httpx
import pytest
import trio
from agent_fixtures import agent_settings, credentials, open_agent, sse_events

from atlas.cli.main import main as cli_main
from atlas.config import ConfigError
from atlas.llm.agents import DEFAULT_AGENT, load_agents
from atlas.llm.devprovider import DevProviderConfig, serve_dev_provider, split_text

AGENTS_TOML = '''
[[agents]]
id = "poet"
name = "Poet"
description = "Writes short poems."
instructions = "You answer in verse."
model = "gpt-4o"
temperature = 1.1
maxOutputTokens = 200

[[agents]]
id = "terse"
model = "small-model"
'''


def test_default_agent_without_file(tmp_path):
    settings = agent_settings(None, tmp_path)
    assert load_agents(settings) == {"atlas-assistant": DEFAULT_AGENT}


def test_agents_from_data_dir(tmp_path):
    (tmp_path / "agents.toml").write_text(AGENTS_TOML)
    agents = load_agents(agent_settings(None, tmp_path))
    assert list(agents) == ["poet", "terse"]
    poet = agents["poet"]
    assert (poet.temperature, poet.max_output_tokens, poet.instructions) == (1.1, 200, "You answer in verse.")
    assert poet.describe()["name"] == "Poet" and agents["terse"].describe()["name"] == "terse"


@pytest.mark.parametrize(("text", "agent", "field"), [
    ('[[agents]]\nid = "a"\nmodel = "m"\ntemprature = 1\n', "'a'", "temprature"),
    ('[[agents]]\nid = "a"\nmodel = "m"\ntemperature = "warm"\n', "'a'", "temperature"),
    ('[[agents]]\nid = "a"\nmodel = "m"\nmaxOutputTokens = 1.5\n', "'a'", "maxOutputTokens"),
    ('[[agents]]\nid = "a"\n', "'a'", "model"),
    ('[[agents]]\nid = "a"\nmodel = "m"\n[[agents]]\nid = "a"\nmodel = "n"\n', "'a'", "id"),
    ('[[agents]]\nid = "has space"\nmodel = "m"\n', "'has space'", "id"),
    ('[[agents]]\nmodel = "m"\n', "agents[0]", "id"),
    ('agent = 1\n', None, "agent"),
    ('[[agents]\n', None, "TOML"),
])
def test_bad_config_names_file_agent_and_field(tmp_path, text, agent, field):
    path = tmp_path / "my-agents.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_agents(agent_settings(None, tmp_path, agents_file=path))
    message = str(caught.value)
    assert str(path) in message and field in message, message
    if agent:
        assert f"{agent}:" in message, message
    assert "\n" not in message


def test_missing_agents_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="my-agents.toml"):
        load_agents(agent_settings(None, tmp_path, agents_file=tmp_path / "my-agents.toml"))


def test_cli_exits_2_with_one_line_on_bad_config(tmp_path, capsys):
    path = tmp_path / "agents.toml"
    path.write_text('[[agents]]\nid = "a"\nmodel = "m"\nbogus = true\n')
    status = cli_main(["agent", "--data-dir", str(tmp_path), "--bind", "127.0.0.1:0"])
    assert status == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bogus" in err and "'a'" in err and str(path) in err


async def test_dev_provider_streams_and_answers():
    config = DevProviderConfig(reply="Echo: {message}!", deltas=3)
    async with trio.open_nursery() as nursery:
        url = await nursery.start(lambda task_status: serve_dev_provider(config=config, task_status=task_status))
        assert url.endswith("/v1")
        async with httpx.AsyncClient() as client:
            body = {"model": "x", "messages": [{"role": "user", "content": "ping pong"}]}
            auth = {"Authorization": "Bearer anything"}
            plain = (await client.post(f"{url}/chat/completions", json=body, headers=auth)).json()
            assert plain["choices"][0]["message"]["content"] == "Echo: ping pong!"
            assert plain["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}
            streamed = await client.post(f"{url}/chat/completions", json={**body, "stream": True}, headers=auth)
            events = sse_events(streamed.text)
            assert events[-1] == "[DONE]"
            deltas = [c["delta"].get("content") for e in events[:-1] for c in e["choices"]]
            assert [d for d in deltas if d] == ["Echo: ", "ping ", "pong!"]
            assert events[-2]["usage"]["total_tokens"] == 5
            assert (await client.post(f"{url}/chat/completions", json=body)).status_code == 401
            # OpenAI's API takes null for "not streamed" (schemathesis sent it through /v1).
            null = await client.post(f"{url}/chat/completions", json={**body, "stream": None}, headers=auth)
            assert null.json()["choices"][0]["message"]["content"] == "Echo: ping pong!"
            refused = await client.post(f"{url}/chat/completions", json={"model": "x"}, headers=auth)
            assert refused.status_code == 400 and refused.json()["error"]["param"] is None  # OpenAI's shape
        nursery.cancel_scope.cancel()


def test_split_text():
    assert split_text("abcdefg", 3) == ["abc", "de", "fg"]
    assert split_text("ab", 5) == ["a", "b"]
    assert split_text("hello world", 4) == ["hel", "lo ", "wor", "ld"]
    assert split_text("", 3) == [""]


async def test_serve_agent_with_dev_provider(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    async with open_agent(agent_settings(None, tmp_path)) as agent:
        dev_url = next(r.args[0] for r in caplog.records if "dev provider" in r.getMessage())
        assert "not a real model" in caplog.text
        response = await agent.client.post(
            "/agents/atlas-assistant/stream", json={"input": "marco polo"},
            headers=credentials(dev_url))
        text = "".join(e["text"] for e in sse_events(response.text) if e["type"] == "text-delta")
        assert "marco polo" in text
        # Any other provider URL stays closed, even with the dev provider.
        response = await agent.client.post(
            "/agents/atlas-assistant/text", json={"input": "x"},
            headers=credentials("https://api.openai.com/v1"))
        assert response.json()["code"] == "provider_not_allowed"


async def test_serve_agent_with_agents_file(tmp_path):
    (tmp_path / "agents.toml").write_text(AGENTS_TOML)
    async with open_agent(agent_settings(None, tmp_path)) as agent:
        listed = (await agent.client.get("/agents")).json()["data"]
        assert [a["id"] for a in listed] == ["poet", "terse"]
        assert listed[0]["model"] == "gpt-4o"


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_atlas_agent_command_starts_and_stops_on_sigterm(tmp_path):
    process = subprocess.Popen(
        [sys.executable, "-m", "atlas", "agent", "--bind", "127.0.0.1:0", "--data-dir", str(tmp_path)],
        stderr=subprocess.PIPE, text=True, env={**os.environ, "ATLAS_AGENT_SECRET": ""},
    )
    try:
        lines = []
        for line in process.stderr:
            lines.append(line)
            if "Atlas agent listening on" in line:
                break
        url = lines[-1].rsplit(" ", 1)[1].strip()
        assert url.startswith("http://127.0.0.1:")
        assert any("dev provider" in line for line in lines)
        assert httpx.get(f"{url}/healthz").json() == {"ok": True}
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        process.kill()
        process.wait()
        process.stderr.close()
        process.wait()
