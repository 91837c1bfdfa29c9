"""The ``atlas`` command as a user runs it: config errors, user management, signals, first run."""

from __future__ import annotations

import re
import subprocess

import httpx
import pytest
from servers import SECRETS, atlas_command, connect, new_key, ready, start_atlas_process
from test_websocket import closed_with


def atlas(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run(
        atlas_command(*args), capture_output=True, text=True, timeout=30,
        env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL,
    )


def test_version_and_help():
    assert atlas("--version").stdout.strip().startswith("atlas ")
    help_text = atlas("--help").stdout
    for command in ("serve", "agent", "user", "chat", "ask"):
        assert command in help_text


@pytest.mark.parametrize(
    "args, env, named",
    [
        (["serve", "--bind", "localhost"], {}, "--bind"),
        (["serve"], {"ATLAS_BIND": "127.0.0.1:99999"}, "ATLAS_BIND"),
        (["serve"], {"ATLAS_AUTH_URL": "ftp://auth"}, "ATLAS_AUTH_URL"),
        (["serve", "--room-idle-seconds", "-1"], {}, "--room-idle-seconds"),
        (["agent"], {"ATLAS_PROVIDER_URLS": "http://ok/v1,nonsense"}, "ATLAS_PROVIDER_URLS"),
    ],
)
def test_bad_settings_stop_with_one_line_and_exit_2(tmp_path, args, env, named):
    result = atlas(*args, "--data-dir", str(tmp_path / "data"), env=env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0], result.stderr


def test_unusable_data_directory_exits_2(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = atlas("serve", "--data-dir", str(blocker / "data"), "--bind", "127.0.0.1:0")
    assert result.returncode == 2
    assert "data directory" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_user_commands(tmp_path):
    data = ["--data-dir", str(tmp_path / "data")]
    key = new_key("cli")
    added = atlas("user", "add", "carol", "--virtual-key", key, *data)
    assert added.returncode == 0, added.stderr
    token = added.stdout.strip().splitlines()[-1]
    SECRETS.add(token)
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", token)
    assert key not in added.stdout
    stored = (tmp_path / "data" / "tokens").iterdir()
    assert token not in "".join(path.read_text() for path in stored)  # only its hash is kept

    listed = atlas("user", "list", *data)
    assert "carol" in listed.stdout and key[-4:] in listed.stdout and key not in listed.stdout

    duplicate = atlas("user", "add", "carol", "--virtual-key", key, *data)
    assert duplicate.returncode == 1 and "already exists" in duplicate.stderr
    bad_key = atlas("user", "add", "eve", "--virtual-key", "sk-a\nb", *data)
    assert bad_key.returncode == 2 and "invalid --virtual-key" in bad_key.stderr
    bad_id = atlas("user", "add", "no/slash", "--virtual-key", key, *data)
    assert bad_id.returncode == 2 and "invalid user id" in bad_id.stderr
    missing = atlas("user", "remove", "nobody", *data)
    assert missing.returncode == 1 and "no user" in missing.stderr


async def test_user_changes_apply_to_a_running_server(tmp_path):
    data_dir = tmp_path / "data"
    data = ["--data-dir", str(data_dir)]
    added = atlas("user", "add", "dave", "--virtual-key", new_key("dave"), *data)
    first = added.stdout.strip().splitlines()[-1]
    SECRETS.add(first)
    server = await start_atlas_process(
        data_dir, "--provider-url", "http://127.0.0.1:9/v1", "--auth-cache-seconds", "0"
    )
    try:
        ws_url = server.url.replace("http://", "ws://") + "/party/dave?token="
        async with connect(ws_url + first) as ws:
            await ready(ws)
            await ws.send_message('{"type": "prefs:set", "prefs": {"x": 1}}')
            await ws.get_message()

        new_key_value = new_key("dave2")
        assert atlas("user", "set-key", "dave", "--virtual-key", new_key_value, *data).returncode == 0
        async with httpx.AsyncClient() as client:
            status = await client.get(f"{server.url}/party/dave?token={first}")
        assert status.json()["virtualKey"] == "…" + new_key_value[-4:]

        rotated = atlas("user", "rotate-token", "dave", *data)
        second = rotated.stdout.strip().splitlines()[-1]
        SECRETS.add(second)
        async with connect(ws_url + first) as ws:
            _, code = await closed_with(ws)
            assert code == 4001
        async with connect(ws_url + second) as ws:
            await ready(ws)

        assert (data_dir / "rooms" / "dave.json").exists()
        assert atlas("user", "remove", "dave", *data).returncode == 0
        assert not (data_dir / "rooms" / "dave.json").exists()
        async with connect(ws_url + second) as ws:
            _, code = await closed_with(ws)
            assert code == 4001
    finally:
        server.kill()


async def test_sigterm_closes_connections_with_1001_and_exits_cleanly(tmp_path):
    data_dir = tmp_path / "data"
    token = atlas("user", "add", "erin", "--virtual-key", new_key("erin"), "--data-dir", str(data_dir))
    token = token.stdout.strip().splitlines()[-1]
    SECRETS.add(token)
    server = await start_atlas_process(data_dir, "--provider-url", "http://127.0.0.1:9/v1")
    async with connect(server.url.replace("http://", "ws://") + f"/party/erin?token={token}") as ws:
        await ready(ws)
        server.process.terminate()  # SIGTERM
        _, code = await closed_with(ws)
    assert code == 1001
    assert server.process.wait(10) == 0
    assert not list((data_dir / "rooms").glob(".*.tmp"))


async def test_first_run_creates_demo_user_once_and_prints_three_ways_in(tmp_path):
    data_dir = tmp_path / "data"
    server = await start_atlas_process(data_dir)
    try:
        output = server.stdout()
        match = re.search(r"--token (\S+)", output)
        assert match, output
        token = match.group(1)
        SECRETS.add(token)
        assert f"{server.url}/#user=demo&token={token}" in output
        assert f"atlas chat --url {server.url} --user demo --token {token}" in output
        assert "curl " in output and "proxy=/agents/atlas-assistant/text" in output
        assert "dev provider" in output and "dev provider" in server.log()
        async with connect(server.url.replace("http://", "ws://") + f"/party/demo?token={token}") as ws:
            assert (await ready(ws))["credentials"] is True
    finally:
        assert server.terminate() == 0
    again = await start_atlas_process(data_dir)
    try:
        assert "--token" not in again.stdout()
    finally:
        again.terminate()


@pytest.mark.parametrize("command", ["serve", "agent"])
def test_port_in_use_is_one_line_not_a_traceback(tmp_path, command):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        bind = "127.0.0.1:%d" % taken.getsockname()[1]
        result = atlas(command, "--bind", bind, "--data-dir", str(tmp_path / "data"),
                       "--provider-url", "http://127.0.0.1:9/v1")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == f"atlas: cannot listen on {bind}: Address already in use"
    assert "Traceback" not in result.stderr
