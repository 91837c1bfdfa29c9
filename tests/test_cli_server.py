"""The ``atlas`` command as a user runs it: config errors, user management, signals, first run."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import trio
from servers import PROCESS_LOGS, SECRETS, atlas_command, connect, new_key, ready, start_atlas_process
from test_websocket import closed_with


def atlas(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run(
        atlas_command(*args), capture_output=True, text=True, timeout=30,
        env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL,
    )


def assert_printed_command_works(output: str, url: str, token: str) -> None:
    """The banner's Terminal line runs as printed, from a shell whose PATH has no virtualenv."""
    line = next(line for line in output.splitlines() if "Terminal:" in line)
    words = shlex.split(line.split("Terminal:", 1)[1])
    prefix = words[: words.index("chat")]
    env = {**os.environ, "PATH": "/usr/bin:/bin"}
    asked = subprocess.run(
        [*prefix, "ask", "--url", url, "--user", "demo", "--token", token, "hello"],
        capture_output=True, text=True, timeout=30, env=env, stdin=subprocess.DEVNULL,
    )
    assert asked.returncode == 0 and asked.stdout.strip(), (prefix, asked.stderr)


async def test_first_run_banner_names_the_installed_script_when_it_is_not_on_the_path(tmp_path):
    script = Path(sys.executable).parent / "atlas"
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [str(script), "serve", "--bind", "0.0.0.0:0", "--data-dir", str(tmp_path / "data")],
            stdout=subprocess.PIPE, stderr=log_file, cwd=tmp_path, stdin=subprocess.DEVNULL,
            env={**os.environ, "PATH": "/usr/bin:/bin", "PYTHONUNBUFFERED": "1"},
        )
    PROCESS_LOGS.append(log_path)
    try:
        with trio.fail_after(20):
            while "listening on" not in log_path.read_text():
                await trio.sleep(0.02)  # polling the log for the start-up line
        listening = [line for line in log_path.read_text().splitlines() if "listening on" in line]
        assert len(listening) == 1, listening  # said once
        url = listening[0].split("listening on ", 1)[1].split()[0]
        port = url.rsplit(":", 1)[1]
        assert listening[0].endswith(f"(bound to 0.0.0.0:{port}: every interface)"), listening
        output = ""
        with trio.fail_after(20):
            while "--token" not in output:
                output += (await trio.to_thread.run_sync(process.stdout.readline)).decode()
        token = re.search(r"--token (\S+)", output).group(1)
        SECRETS.add(token)
        assert f"{script} chat --url" in output  # the script by its path: PATH does not find it
        assert_printed_command_works(output, url, token)
    finally:
        process.terminate()
        process.wait(10)
        process.stdout.close()


def test_help_names_every_setting_with_its_variable_and_default():
    from atlas.config import SETTINGS

    serve_help = " ".join(atlas("serve", "--help").stdout.split())
    for setting in SETTINGS:
        assert setting.env[0] in serve_help, setting.name
    for shown in ("ATLAS_PROVIDER_TIMEOUT; default 60.0", "ATLAS_BIND; default 127.0.0.1:1999",
                  "ATLAS_DATA_DIR; default ./data", "ATLAS_AGENT_SECRET:"):
        assert shown in serve_help, shown
    agent_help = " ".join(atlas("agent", "--help").stdout.split())
    assert "ATLAS_BIND; default 127.0.0.1:8788" in agent_help and "ATLAS_AGENT_SECRET:" in agent_help


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
        assert_printed_command_works(output, server.url, token)
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
