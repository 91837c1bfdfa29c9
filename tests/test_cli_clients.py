"""``atlas ask`` and ``atlas chat`` driven as a person would: real subprocesses against a real
server, ``chat`` on a pseudo-terminal where Ctrl-C is the byte the keyboard sends (0x03)."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import signal
import socket
import subprocess
import sys
import termios
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from fake_provider import Reply, Status, open_fake_provider
from servers import WAIT, add_user, free_port, open_atlas, start_atlas_process
from tcp_proxy import open_tcp_proxy

ATLAS = [sys.executable, "-m", "atlas"]


def client_env(url: str, token: str | None = None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ATLAS_")}
    # No history file unless a test asks for one: never the real one in the user's home.
    env.update(NO_COLOR="1", PYTHONUNBUFFERED="1", ATLAS_URL=url, ATLAS_HISTORY_FILE="")
    env.update(extra)
    if token is not None:
        env["ATLAS_TOKEN"] = token
    return env


async def ask(*args: str, env: dict[str, str], stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(WAIT):
        return await trio.run_process(
            [*ATLAS, "ask", *args], stdin=stdin, capture_stdout=True, capture_stderr=True,
            check=False, env=env,
        )


UP, LEFT, HOME = "\x1b[A", "\x1b[D", "\x01"  # the keys' bytes on an xterm (Ctrl-A: start of line)


class Terminal:
    """A program on a pseudo-terminal that is its controlling terminal, as in a shell."""

    def __init__(self, process: trio.Process, stream: trio.lowlevel.FdStream, modes: list) -> None:
        self.process = process
        self.stream = stream
        self.modes = modes  # the terminal's modes before the program started
        self.output = ""
        self.seen = 0  # expect() looks only after what it already matched

    async def expect(self, text: str, timeout: float = WAIT) -> None:
        try:
            with trio.fail_after(timeout):
                while (index := self.output.find(text, self.seen)) < 0:
                    try:
                        data = await self.stream.receive_some(4096)
                    except (OSError, trio.BrokenResourceError):  # EIO: the program exited
                        data = b""
                    if not data:
                        raise AssertionError(f"the program ended before showing {text!r}")
                    self.output += data.decode("utf-8", errors="replace").replace("\r\n", "\n")
        except (trio.TooSlowError, AssertionError) as exc:
            raise AssertionError(f"{text!r} not shown ({exc!r}); the screen so far:\n{self.output}") from None
        self.seen = index + len(text)

    def current_modes(self) -> list:
        return termios.tcgetattr(self.stream.fileno())  # a pty's two ends share their modes

    async def type(self, keys: str) -> None:
        await self.stream.send_all(keys.encode())

    async def wait_exit(self) -> int:
        with trio.fail_after(WAIT):
            # Keep reading so that the program never blocks on a full terminal buffer.
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._drain)
                code = await self.process.wait()
                nursery.cancel_scope.cancel()
            return code

    async def _drain(self) -> None:
        try:
            while data := await self.stream.receive_some(4096):
                self.output += data.decode("utf-8", errors="replace").replace("\r\n", "\n")
        except (OSError, trio.BrokenResourceError):
            pass


def _controlling_terminal() -> None:
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


@asynccontextmanager
async def open_terminal(args: list[str], env: dict[str, str]) -> AsyncIterator[Terminal]:
    master, slave = pty.openpty()
    modes = termios.tcgetattr(slave)
    try:
        process = await trio.lowlevel.open_process(
            args, stdin=slave, stdout=slave, stderr=slave, env=env,
            preexec_fn=_controlling_terminal,  # so that Ctrl-C (0x03) becomes SIGINT
        )
    finally:
        os.close(slave)
    term = Terminal(process, trio.lowlevel.FdStream(master), modes)
    try:
        yield term
    finally:
        if process.returncode is None:
            process.kill()
            with trio.move_on_after(WAIT):
                await process.wait()
        await term.stream.aclose()


# -- atlas ask ------------------------------------------------------------------------------


async def test_ask_prints_the_answer_and_nothing_else(tmp_path: Path) -> None:
    async with open_atlas(tmp_path, users={"alice": None}) as server:
        env = client_env(server.url, server.tokens["alice"])
        result = await ask("--user", "alice", "what is up?", env=env)
        assert result.returncode == 0, result.stderr
        assert result.stderr == b""
        assert b"You said: what is up?" in result.stdout
        assert result.stdout.endswith(b"\n") and result.stdout.count(b"\n") == 1

        # No --user: with built-in auth the token says whose it is. Question from stdin.
        result = await ask("--json", "-", env=env, stdin=b"from stdin\n")
        assert result.returncode == 0, result.stderr
        done = json.loads(result.stdout)
        assert done["type"] == "agent:done" and "You said: from stdin" in done["text"]
        assert done["usage"]["totalTokens"] > 0


async def test_ask_streams_before_the_reply_ends_and_ctrl_c_cancels(tmp_path: Path) -> None:
    async with open_fake_provider() as provider, open_atlas(
        tmp_path, users={"alice": None}, provider_url=provider.url
    ) as server:
        gate = trio.Event()
        provider.behaviour = Reply(deltas=["First words", " and the rest"], gate=gate, hold_after=1)
        env = client_env(server.url, server.tokens["alice"], ATLAS_USER="alice")
        process = await trio.lowlevel.open_process(
            [*ATLAS, "ask", "tell me"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
        )
        assert process.stdout is not None and process.stderr is not None
        with trio.fail_after(WAIT):
            seen = b""
            while b"First words" not in seen:  # shown while the provider still holds the rest
                seen += await process.stdout.receive_some(4096)
            process.send_signal(signal.SIGINT)
            disconnected = await provider.wait_disconnect()  # the cancel reached the provider
            assert disconnected.api_key is not None
            assert await process.wait() == 130
            stderr = b""
            while chunk := await process.stderr.receive_some(4096):
                stderr += chunk
        assert b"cancelled" in stderr and b"Traceback" not in stderr
        await process.stdout.aclose()
        await process.stderr.aclose()


async def test_ask_failures_are_one_line_with_the_code(tmp_path: Path) -> None:
    async with open_fake_provider() as provider, open_atlas(
        tmp_path, users={"alice": None}, provider_url=provider.url
    ) as server:
        token = server.tokens["alice"]
        provider.behaviour = Status(401)
        result = await ask("--user", "alice", "hi", env=client_env(server.url, token))
        assert (result.returncode, result.stdout) == (1, b"")
        assert result.stderr.decode().startswith("atlas ask: provider_auth: ")
        assert result.stderr.count(b"\n") == 1

        result = await ask("--user", "alice", "hi", env=client_env(server.url, "not-a-token"))
        assert result.returncode == 1 and b"atlas ask: unauthorized: " in result.stderr
        result = await ask("--user", "bob", "hi", env=client_env(server.url, token))
        assert result.returncode == 1 and b"atlas ask: forbidden: " in result.stderr

    for args, env, expected in [
        (["hi"], client_env("http://127.0.0.1:1"), b"no token"),
        (["--url", "ftp://example", "hi"], client_env("x", "t"), b"invalid URL"),
        ([""], client_env("http://127.0.0.1:1", "t"), b"the question is empty"),
    ]:
        result = await ask(*args, env=env)
        assert result.returncode == 2, (args, result.stderr)
        assert expected in result.stderr and result.stderr.count(b"\n") == 1

    with socket.socket() as unused:  # a port that nobody listens on
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    result = await ask("--user", "a", "hi", env=client_env(f"ws://127.0.0.1:{port}", "t"))
    assert result.returncode == 1 and b"atlas ask: unreachable: " in result.stderr


# -- atlas chat -----------------------------------------------------------------------------


async def test_chat_session_with_commands(tmp_path: Path) -> None:
    async with open_atlas(tmp_path, users={"alice": None}) as server:
        env = client_env(server.url.replace("http://", "ws://"), server.tokens["alice"])
        async with open_terminal([*ATLAS, "chat", "--user", "alice"], env) as term:
            await term.expect("as alice")
            await term.expect("you> ")
            await term.type("hello atlas\r")
            await term.expect("You said: hello atlas")
            await term.expect("you> ")
            await term.type("/usage\r")
            await term.expect("tokens (finish: stop)")
            await term.type("/prefs temperature=0.25\r")
            await term.expect("temperature = 0.25")
            await term.type("/prefs\r")
            await term.expect("temperature = 0.25")
            await term.type("/help\r")
            await term.expect("/prefs KEY=VALUE")
            await term.expect("you> ")
            await term.type("\x04")  # Ctrl-D at the prompt leaves
            assert await term.wait_exit() == 0
        assert "Traceback" not in term.output


async def test_chat_ctrl_c_cancels_the_reply_and_keeps_the_session(tmp_path: Path) -> None:
    async with open_fake_provider() as provider, open_atlas(
        tmp_path, users={"alice": None}, provider_url=provider.url
    ) as server:
        provider.behaviour = Reply(deltas=["Thinking hard", " forever"], gate=trio.Event())
        env = client_env(server.url, server.tokens["alice"], ATLAS_USER="alice")
        async with open_terminal([*ATLAS, "chat"], env) as term:
            await term.expect("you> ")
            await term.type("a long question\r")
            await term.expect("Thinking hard")
            await term.type("\x03")  # Ctrl-C during the reply
            await term.expect("[cancelled]")
            await provider.wait_disconnect()
            await term.expect("you> ")

            provider.behaviour = Reply(deltas=["Still", " here"])
            await term.type("are you there?\r")
            await term.expect("Still here")
            await term.expect("you> ")
            await term.type("\x03")  # Ctrl-C at the prompt leaves
            assert await term.wait_exit() == 0
        assert "Traceback" not in term.output


async def test_chat_line_editing_and_history(tmp_path: Path) -> None:
    async with open_atlas(tmp_path, users={"alice": None}) as server:
        state = tmp_path / "state"
        env = client_env(server.url, server.tokens["alice"], ATLAS_USER="alice", XDG_STATE_HOME=str(state))
        del env["ATLAS_HISTORY_FILE"]
        async with open_terminal([*ATLAS, "chat"], env) as term:
            await term.expect("you> ")
            await term.type("first line\r")
            await term.expect("You said: first line.")
            await term.expect("you> ")
            await term.type(UP + "\r")  # the line before, sent again
            await term.expect("You said: first line.")
            await term.expect("you> ")
            await term.type("helo" + LEFT + "l\r")  # edited in the middle
            await term.expect("You said: hello.")
            await term.expect("you> ")
            await term.type("orld" + HOME + "w\r")
            await term.expect("You said: world.")
            await term.expect("you> ")
            await term.type(" a secret\r")  # a leading space: sent, not kept
            await term.expect("You said: a secret.")
            await term.expect("you> ")
            await term.type("a draft")
            await term.expect("a draft")
            await term.type("\x03")  # Ctrl-C on a typed line clears it; the session goes on
            await term.expect("^C")
            await term.expect("you> ")
            await term.type(UP + UP + "\r")
            await term.expect("You said: hello.")
            await term.expect("you> ")
            await term.type("/he\t\r")  # Tab completes a command
            await term.expect("/prefs KEY=VALUE")
            await term.expect("you> ")
            await term.type("\x04")
            assert await term.wait_exit() == 0
            assert term.current_modes() == term.modes  # the terminal has its own modes back
        assert "Traceback" not in term.output

        history = state / "atlas" / "history"
        assert history.read_text().splitlines() == ["first line", "hello", "world", "hello", "/help"]
        assert history.stat().st_mode & 0o777 == 0o600

        # The next session recalls the last one's lines.
        async with open_terminal([*ATLAS, "chat"], env) as term:
            await term.expect("you> ")
            await term.type(UP + UP + UP + "\r")
            await term.expect("You said: world.")
            await term.expect("you> ")
            await term.type("\x03")  # Ctrl-C on an empty line leaves
            assert await term.wait_exit() == 0
            assert term.current_modes() == term.modes


def test_history_file_is_bounded_and_private(tmp_path: Path) -> None:
    from atlas.cli.lineedit import History, history_path

    assert history_path({"XDG_STATE_HOME": "/s"}) == Path("/s/atlas/history")
    assert history_path({"XDG_STATE_HOME": "relative"}) == Path.home() / ".local/state/atlas/history"
    assert history_path({"ATLAS_HISTORY_FILE": "/h", "XDG_STATE_HOME": "/s"}) == Path("/h")
    assert history_path({"ATLAS_HISTORY_FILE": ""}) is None

    path = tmp_path / "deep" / "history"
    history = History(path, limit=3)
    assert history.load() == []
    kept = [history.add(line) for line in ["one", "one ", " secret", "", "two", "three", "four"]]
    assert kept == ["one", None, None, None, "two", "three", "four"]
    assert history.lines == ["two", "three", "four"]
    assert path.read_text().splitlines() == ["one", "two", "three", "four"]  # appended as typed
    assert path.stat().st_mode & 0o777 == 0o600
    assert History(path, limit=3).load() == ["two", "three", "four"]
    assert path.read_text().splitlines() == ["two", "three", "four"]  # trimmed at the next start

    blocked = tmp_path / "file"
    blocked.write_text("")
    unwritable = History(blocked / "history")
    assert unwritable.add("line") and unwritable.problem and "history is not saved" in unwritable.problem


async def test_chat_errors_are_one_readable_line(tmp_path: Path) -> None:
    async with open_fake_provider() as provider, open_atlas(
        tmp_path, users={"alice": None}, provider_url=provider.url
    ) as server:
        provider.behaviour = Status(401)
        env = client_env(server.url, server.tokens["alice"], ATLAS_USER="alice")
        async with open_terminal([*ATLAS, "chat"], env) as term:
            await term.expect("you> ")
            await term.type("hi\r")
            await term.expect("[error] provider_auth: ")
            await term.expect("you> ")
            await term.type("/quit\r")
            assert await term.wait_exit() == 0

        env = client_env(server.url, "wrong-token", ATLAS_USER="alice")
        async with open_terminal([*ATLAS, "chat"], env) as term:
            await term.expect("atlas chat: unauthorized: ")
            assert await term.wait_exit() == 1
        assert "Traceback" not in term.output


async def test_chat_reconnects_after_a_server_restart(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    token = add_user(data_dir, "alice")
    bind = f"127.0.0.1:{free_port()}"
    server = await start_atlas_process(data_dir, bind=bind)
    try:
        env = client_env(server.url, token, ATLAS_USER="alice")
        async with open_terminal([*ATLAS, "chat"], env) as term:
            await term.expect("you> ")
            await term.type("before\r")
            await term.expect("You said: before")
            await term.expect("you> ")
            await term.type("aft")  # typed, not sent yet

            assert await trio.to_thread.run_sync(server.terminate) == 0
            await term.expect("connection lost (")
            await term.expect("you> aft")  # the line being typed, drawn again below the notice
            server = await start_atlas_process(data_dir, bind=bind)
            await term.expect("reconnected")
            await term.expect("you> aft")

            await term.type("er\r")
            await term.expect("You said: after")
            await term.type("\x04")
            assert await term.wait_exit() == 0
        assert "Traceback" not in term.output
    finally:
        if server.process.poll() is None:
            server.kill()


async def test_chat_resumes_the_reply_in_flight_after_its_reconnect(tmp_path: Path) -> None:
    pieces = ["Alpha ", "beta ", "gamma ", "delta."]
    async with open_fake_provider() as provider, open_atlas(
        tmp_path, users={"alice": None}, provider_url=provider.url
    ) as server, open_tcp_proxy(int(server.url.rsplit(":", 1)[1])) as proxy:
        gate = trio.Event()
        provider.behaviour = Reply(deltas=pieces, gate=gate, hold_after=2)
        env = client_env(proxy.url, server.tokens["alice"], ATLAS_USER="alice")
        async with open_terminal([*ATLAS, "chat"], env) as term:
            await term.expect("you> ")
            await term.type("a long answer\r")
            await term.expect("Alpha beta ")
            assert await proxy.cut() == 1  # the network drops mid-reply: no close frame
            await term.expect("connection lost (")
            await term.expect("reconnected")
            gate.set()
            await term.expect("gamma delta.")
            await term.expect("you> ")
            await term.type("\x04")
            assert await term.wait_exit() == 0
    assert term.output.count("Alpha beta ") == 1 and term.output.count("gamma delta.") == 1
    assert "lost" not in term.output.split("reconnected", 1)[1]
    assert "Traceback" not in term.output
    assert len(provider.completions()) == 1


@pytest.mark.parametrize("url, expected", [
    ("http://h:1/", "ws://h:1/parties/main/a%20b?token=t%26k"),
    ("ws://h:1", "ws://h:1/parties/main/a%20b?token=t%26k"),
    ("https://h/atlas/", "wss://h/atlas/parties/main/a%20b?token=t%26k"),
    ("wss://h:443/atlas", "wss://h:443/atlas/parties/main/a%20b?token=t%26k"),
    ("wss://h/atlas/parties/main", "wss://h/atlas/parties/main/a%20b?token=t%26k"),  # a pasted room URL prefix
])
def test_base_urls_in_every_scheme(url: str, expected: str) -> None:
    from atlas.cli.client import resolve_target

    target = resolve_target(url, "a b", "t&k", environ={})
    assert target.room_url("a b") == expected
