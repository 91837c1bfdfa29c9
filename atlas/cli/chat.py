"""``atlas chat``: an interactive chat with an agent, in the terminal.

Three tasks share one ``Chat``: ``keep_connected`` owns the WebSocket (and reconnects with
backoff when it drops, saying so, and resumes the reply in flight from the last ``seq`` printed:
replies are sent ``resumable``), ``converse`` reads the user's lines and waits for each reply,
``handle_signals`` turns Ctrl-C into ``agent:cancel`` during a reply and, at the prompt, into
clearing the line typed or (on an empty line) leaving. Whichever task ends first ends the
session. Replies are printed by the connection task as frames arrive. On a terminal, lines are
read with editing and history (``lineedit.py``); otherwise as plain lines.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

import trio

from atlas.cli.client import (
    ClientError,
    Closed,
    Connection,
    Target,
    backoff,
    lookup_user,
    open_connection,
    resolve_target,
    when_reset,
)
from atlas.cli.lineedit import History, LineEditor, history_path

CANCEL_WAIT_SECONDS = 5.0
PREFS_WAIT_SECONDS = 10.0
HELP = """\
Type a message and press Enter; the reply streams in as it is written.
  /usage              today's usage, what your limits leave, and the last reply
  /prefs              show your preferences
  /prefs KEY=VALUE    set one (VALUE is JSON if it parses, else text; KEY=null deletes it)
  /new                start a new conversation
  /help               this help
  /quit               leave (or Ctrl-D, or Ctrl-C on an empty line)
Ctrl-C while a reply streams stops that reply and keeps the session; on a line being typed it
clears the line. Arrows, Home, End and the usual readline keys edit the line; Up and Down recall
earlier lines (a line typed with a leading space is not kept), Ctrl-R searches them."""
COMMANDS = ["/usage", "/prefs", "/new", "/help", "/quit"]


class Terminal:
    """The screen: reply text, notices and errors, without mangling a prompt on display."""

    def __init__(self, out: TextIO, stdin_fd: int, editor: LineEditor | None = None) -> None:
        self.out = out
        self.stdin_fd = stdin_fd
        self.editor = editor
        self.color = out.isatty() and "NO_COLOR" not in os.environ and os.environ.get("TERM") != "dumb"
        self.prompt_text = self.style("you> ", "1;36")
        self.editor_prompt = LineEditor.prompt("you> ", "1;36" if self.color else None)
        self.at_prompt = False
        self.mid_line = False
        self._buffer = b""
        self._eof = False
        self._stream: trio.lowlevel.FdStream | None = None

    def style(self, text: str, code: str) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if self.color else text

    def write(self, text: str) -> None:
        if text:
            self.out.write(text)
            self.out.flush()
            self.mid_line = not text.endswith("\n")

    def end_line(self) -> None:
        if self.mid_line:
            self.write("\n")

    def notice(self, text: str, code: str = "2") -> None:
        """A line of its own; when the prompt is showing, it is redrawn below the line."""
        if self.at_prompt and self.editor is not None:
            self.editor.hide()
            self.write(self.style(text, code) + "\n")
            self.editor.show()
            self.mid_line = True
            return
        if self.at_prompt:
            self.write("\r\x1b[K" if self.color else "\n")
        else:
            self.end_line()
        self.write(self.style(text, code) + "\n")
        if self.at_prompt:
            self.write(self.prompt_text)

    def error(self, error: ClientError) -> None:
        self.notice(f"[error] {error.code}: {error.message}", "31")

    async def read_line(self) -> str | None:
        """Show the prompt and read one line; ``None`` at end of input (Ctrl-D)."""
        if self.editor is not None:
            return await self._edit_line(self.editor)
        if self._stream is None:
            self._stream = trio.lowlevel.FdStream(os.dup(self.stdin_fd))
        self.end_line()
        self.write(self.prompt_text)
        self.at_prompt = True
        try:
            while b"\n" not in self._buffer and not self._eof:
                data = await self._stream.receive_some(4096)
                self._eof = not data
                self._buffer += data
        finally:
            self.at_prompt = False
        if not self._buffer:
            self.write("\n")
            return None
        line, _, self._buffer = self._buffer.partition(b"\n")
        self.mid_line = False  # the terminal echoed the newline
        return line.decode("utf-8", errors="replace")

    async def _edit_line(self, editor: LineEditor) -> str | None:
        self.end_line()
        self.at_prompt = self.mid_line = True  # readline draws the prompt
        try:
            line = await editor.read_line(self.editor_prompt)
        finally:
            self.at_prompt = False
        self.mid_line = False  # readline ended the line
        if line is None:
            self.write("\n")
        return line

    def discard_line(self) -> bool:
        """Ctrl-C at the prompt: clear what was typed; False when there is nothing to clear."""
        return self.at_prompt and self.editor is not None and self.editor.discard_line()

    async def aclose(self) -> None:
        if self.editor is not None:
            self.editor.close()
        if self._stream is not None:
            await self._stream.aclose()  # also restores the descriptor's blocking mode


@dataclass
class Reply:
    id: str
    finished: trio.Event = field(default_factory=trio.Event)
    printed: bool = False
    seq: int = 0  # the provider pieces printed so far: where a resume starts
    sent: bool = False  # the server has (or had) it: after a drop, it is resumed
    cancelling: bool = False
    unsent: trio.CancelScope | None = None  # while waiting for a connection to send it


class Chat:
    def __init__(self, target: Target, user: str, args: argparse.Namespace, term: Terminal) -> None:
        self.target = target
        self.user = user
        self.agent: str | None = args.agent
        self.conversation: str = args.conversation or new_conversation_id()
        self.term = term
        self.connection: Connection | None = None
        self.connected = trio.Event()
        self.reply: Reply | None = None
        self.last_done: dict[str, Any] | None = None
        self.prefs: dict[str, Any] = {}
        self.prefs_answer: trio.MemorySendChannel[dict[str, Any] | ClientError] | None = None
        self.usage_answer: trio.MemorySendChannel[dict[str, Any]] | None = None
        self.failure: ClientError | None = None
        self.cancel_on_reconnect: str | None = None  # a reply given up while disconnected
        self._cancel_all = trio.CancelScope()

    async def run(self) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
            async with trio.open_nursery() as nursery:
                self._cancel_all = nursery.cancel_scope
                nursery.start_soon(self._guard, self.keep_connected)
                nursery.start_soon(self._guard, self.converse)
                nursery.start_soon(self._guard, self.handle_signals, signals, nursery)
        if self.failure is not None:
            raise self.failure

    async def _guard(self, task: Callable[..., Awaitable[None]], *args: Any) -> None:
        """Run one of the session's tasks; the first to end, for any reason, ends them all."""
        try:
            await task(*args)
        except ClientError as exc:
            self.failure = self.failure or exc
        finally:
            self._cancel_all.cancel()

    # -- the connection ----------------------------------------------------------------------

    async def keep_connected(self) -> None:
        delays = None  # None until the first connection: failing that one is final
        lost: ClientError | None = None
        while True:
            attempt_failed = False
            try:
                async with open_connection(self.target, self.user) as connection:
                    self.on_connected(connection, reconnected=delays is not None)
                    delays, lost = backoff(), None
                    await self.resume_reply(connection)
                    async for frame in connection:
                        self.on_frame(frame)
            except ClientError as exc:
                if delays is None or (isinstance(exc, Closed) and exc.fatal):
                    raise
                attempt_failed, lost = lost is not None, exc
            finally:
                self.on_disconnected()
            delay = next(delays)
            reason = lost.message.rpartition(": ")[2] if lost.code == "unreachable" else lost.message
            if attempt_failed:
                self.term.notice(f"still disconnected ({reason}); next try in {delay:.1f}s")
            else:
                self.term.notice(f"connection lost ({reason}); reconnecting in {delay:.1f}s", "33")
            await trio.sleep(delay)

    def on_connected(self, connection: Connection, *, reconnected: bool) -> None:
        self.connection = connection
        self.prefs = dict(connection.ready.get("prefs") or {})
        self.connected.set()
        if reconnected:
            self.term.notice("reconnected", "32")

    async def resume_reply(self, connection: Connection) -> None:
        """After a reconnect: ask for the rest of the reply in flight, from the last piece
        printed (the server sends what came meanwhile, then the rest as it comes)."""
        if self.cancel_on_reconnect is not None:
            request_id, self.cancel_on_reconnect = self.cancel_on_reconnect, None
            await connection.send({"type": "agent:cancel", "id": request_id})
        reply = self.reply
        if reply is None or not reply.sent or reply.finished.is_set():
            return
        await connection.send({"type": "agent:resume", "id": reply.id, "after": reply.seq})

    def on_disconnected(self) -> None:
        self.connection = None
        if self.connected.is_set():
            self.connected = trio.Event()
        reply = self.reply
        if reply is None or reply.unsent is not None or reply.finished.is_set():
            return  # nothing in flight (a message not sent yet waits for the next connection)
        if not reply.cancelling:
            return  # the reply runs on in the room: resumed once reconnected
        self.reply = None
        self.cancel_on_reconnect = reply.id  # so that it does not run on until its grace ends
        self.term.notice("[cancelled]")
        reply.finished.set()

    def on_frame(self, frame: dict[str, Any]) -> None:
        kind, reply = frame["type"], self.reply
        if reply is not None and frame.get("id") == reply.id:
            if kind == "agent:delta":
                seq = frame.get("seq")
                if isinstance(seq, int):
                    if seq <= reply.seq:
                        return  # printed already
                    reply.seq = seq
                self.term.write(str(frame.get("text", "")))
                reply.printed = True
            elif kind == "agent:done":
                if not reply.printed:
                    self.term.write(str(frame.get("text", "")))
                self.term.end_line()
                self.last_done = frame
                reply.finished.set()
            elif kind == "agent:error":
                error = ClientError.from_error(frame.get("error"))
                if error.code == "cancelled":
                    self.term.notice("[cancelled]")
                elif error.code == "unknown_request":
                    self.term.error(ClientError(
                        "disconnected", "the connection dropped and the server no longer has that reply"
                    ))
                else:
                    self.term.error(error)
                reply.finished.set()
        elif kind == "prefs":
            self.prefs = dict(frame.get("prefs") or {})
            self._answer_prefs(self.prefs)
        elif kind == "usage" and self.usage_answer is not None:
            with contextlib.suppress(trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                self.usage_answer.send_nowait(frame)
        elif kind == "error":
            error = ClientError.from_error(frame.get("error"))
            if not self._answer_prefs(error):
                self.term.error(error)

    def _answer_prefs(self, answer: dict[str, Any] | ClientError) -> bool:
        if self.prefs_answer is None:
            return False
        try:
            self.prefs_answer.send_nowait(answer)
        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        return True

    async def wait_connected(self, *, quiet: bool = False) -> Connection:
        if self.connection is None and not quiet:
            self.term.notice("waiting for the connection... (Ctrl-C cancels this message)")
        while self.connection is None:
            await self.connected.wait()
        return self.connection

    # -- the user ----------------------------------------------------------------------------

    async def converse(self) -> None:
        connection = await self.wait_connected(quiet=True)
        self.welcome(connection)
        while True:
            line = await self.term.read_line()
            if line is None:
                return
            line = line.strip()
            if line.startswith("/"):
                if not await self.command(line):
                    return
            elif line:
                await self.send_message(line)

    def welcome(self, connection: Connection) -> None:
        agent = self.agent or self.prefs.get("agentId") or "the default agent"
        self.term.notice(
            f"Connected to {self.target.shown()} as {self.user}, talking to {agent}.\n"
            "/help for commands; Ctrl-C stops a reply; Ctrl-D leaves."
        )
        if self.term.editor is not None:
            self.term.editor.set_commands(COMMANDS)
            if self.term.editor.history.problem:
                self.term.notice(self.term.editor.history.problem, "33")
        if connection.ready.get("credentials") is False:
            self.term.notice(
                "Note: this user has no provider key yet; replies will fail with no_credentials.", "33"
            )

    async def send_message(self, text: str) -> None:
        reply = Reply(id=f"chat-{secrets.token_hex(6)}")
        message: dict[str, Any] = {
            "type": "agent:stream", "id": reply.id, "message": text,
            "conversationId": self.conversation, "resumable": True,
        }
        if self.agent:
            message["agentId"] = self.agent
        self.reply = reply
        with trio.CancelScope() as waiting:
            reply.unsent = waiting
            connection = await self.wait_connected()
            reply.unsent = None
            reply.sent = True
            try:
                await connection.send(message)
            except Closed:
                pass  # keep_connected sees the same close; the reply is resumed or reported lost
        if waiting.cancelled_caught:
            self.term.notice("[not sent]")
            reply.finished.set()
        await reply.finished.wait()
        if self.reply is reply:
            self.reply = None

    async def command(self, line: str) -> bool:
        """Run a /command; False means leave."""
        name, _, rest = line.partition(" ")
        rest = rest.strip()
        if name in ("/quit", "/exit", "/q"):
            return False
        if name in ("/help", "/?"):
            self.term.notice(HELP, "0")
        elif name == "/usage":
            await self.show_usage()
        elif name == "/prefs":
            await self.prefs_command(rest)
        elif name == "/new":
            self.conversation = new_conversation_id()
            self.term.notice(f"new conversation {self.conversation}")
        else:
            self.term.notice(f"unknown command {name}; /help lists them", "33")
        return True

    async def show_usage(self) -> None:
        connection = await self.wait_connected()
        send, receive = trio.open_memory_channel[dict[str, Any]](1)
        self.usage_answer = send
        report = None
        try:
            await connection.send({"type": "usage:get"})
            with trio.move_on_after(PREFS_WAIT_SECONDS):
                report = await receive.receive()
        except Closed as exc:
            self.term.error(exc)
        finally:
            self.usage_answer = None
        lines = format_usage(report) if report is not None else ["usage: no answer from the server"]
        if self.last_done is not None:
            usage = self.last_done.get("usage") or {}
            lines.append("last reply: {p} prompt + {c} completion = {t} tokens (finish: {f})".format(
                p=usage.get("promptTokens", "?"), c=usage.get("completionTokens", "?"),
                t=usage.get("totalTokens", "?"), f=self.last_done.get("finishReason", "?"),
            ))
        self.term.notice("\n".join(lines), "0")

    async def prefs_command(self, rest: str) -> None:
        if not rest:
            prefs = await self.prefs_request({"type": "prefs:get"})
        else:
            key, sep, raw = rest.partition("=")
            key = key.strip()
            if not sep or not key:
                self.term.notice("usage: /prefs KEY=VALUE (for example /prefs temperature=0.2)", "33")
                return
            prefs = await self.prefs_request({"type": "prefs:set", "prefs": {key: parse_value(raw)}})
        if prefs is not None:
            self.term.notice(format_prefs(prefs), "0")

    async def prefs_request(self, message: dict[str, Any]) -> dict[str, Any] | None:
        connection = await self.wait_connected()
        send, receive = trio.open_memory_channel[dict[str, Any] | ClientError](1)
        self.prefs_answer = send
        try:
            await connection.send(message)
            with trio.move_on_after(PREFS_WAIT_SECONDS):
                answer = await receive.receive()
                if isinstance(answer, ClientError):
                    self.term.error(answer)
                    return None
                return answer
            self.term.error(ClientError("timeout", "no answer from the server"))
        except Closed as exc:
            self.term.error(exc)
        finally:
            self.prefs_answer = None
        return None

    async def handle_signals(self, signals: Any, nursery: trio.Nursery) -> None:
        """Ctrl-C: during a reply, cancel it; at the prompt, clear the line typed, or leave when
        there is none (a second Ctrl-C during a reply leaves too). SIGTERM and SIGHUP leave, so
        that the terminal gets its modes back."""
        async for signum in signals:
            reply = self.reply
            if signum == signal.SIGINT and self.term.discard_line():
                continue
            if signum != signal.SIGINT or reply is None or reply.cancelling or reply.finished.is_set():
                self.term.end_line()
                if self.term.at_prompt:
                    self.term.write("\n")
                return
            reply.cancelling = True
            if reply.unsent is not None:
                reply.unsent.cancel()
                continue
            connection = self.connection
            if connection is None:  # given up here; cancelled in the room once reconnected
                self.cancel_on_reconnect = reply.id
                self.term.notice("[cancelled]")
                reply.finished.set()
                continue
            try:
                await connection.send({"type": "agent:cancel", "id": reply.id})
            except Closed:
                pass
            nursery.start_soon(self.expire_cancel, reply)

    async def expire_cancel(self, reply: Reply) -> None:
        """A server that never answers a cancel does not keep the prompt away."""
        with trio.move_on_after(CANCEL_WAIT_SECONDS):
            await reply.finished.wait()
            return
        self.term.notice("[stopped waiting for the reply]")
        reply.finished.set()


def format_usage(report: dict[str, Any]) -> list[str]:
    """``usage`` frame -> today's totals and what the limits leave, for a person."""
    today = time.strftime("%Y-%m-%d", time.gmtime())
    day = next((d for d in report.get("days") or () if d.get("date") == today), None) or {}
    lines = ["today: {r} requests, {t:,} tokens ({p:,} prompt + {c:,} completion)".format(
        r=day.get("requests", 0), t=day.get("totalTokens", 0), p=day.get("promptTokens", 0),
        c=day.get("completionTokens", 0),
    )]
    limits, remaining = report.get("limits") or {}, report.get("remaining") or {}
    left = []
    if "tokensPerDay" in limits:
        left.append(f"{remaining.get('tokensToday', 0):,} of {limits['tokensPerDay']:,} tokens today "
                    f"({when_reset(next_utc_midnight()).replace(' (', ', at ').rstrip(')')})")
    if "tokensPerMonth" in limits:
        left.append(f"{remaining.get('tokensThisMonth', 0):,} of {limits['tokensPerMonth']:,} this month")
    lines.append("left: " + ", ".join(left) if left else "left: no token limit")
    rates = [f"{limits[k]} {label}" for k, label in (("requestsPerMinute", "requests per minute"),
                                                     ("concurrentRequests", "at once")) if k in limits]
    if rates:
        lines.append("rate limits: " + ", ".join(rates))
    return lines


def next_utc_midnight() -> str:
    tomorrow = time.gmtime(time.time() + 86400)
    return time.strftime("%Y-%m-%dT00:00:00Z", tomorrow)


def new_conversation_id() -> str:
    return f"chat-{secrets.token_hex(6)}"


def parse_value(raw: str) -> Any:
    raw = raw.strip()
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def format_prefs(prefs: dict[str, Any]) -> str:
    if not prefs:
        return "no preferences set"
    width = max(len(key) for key in prefs)
    return "\n".join(
        f"{key.ljust(width)} = {json.dumps(value, ensure_ascii=False)}" for key, value in sorted(prefs.items())
    )


async def run(args: argparse.Namespace, term: Terminal) -> None:
    target = resolve_target(args.url, args.user, args.token)
    user = target.user or await lookup_user(target)
    chat = Chat(target, user, args, term)
    try:
        await chat.run()
    finally:
        await term.aclose()


def main(args: argparse.Namespace) -> int:
    editor = LineEditor.open(sys.stdin, sys.stdout, History(history_path()))
    term = Terminal(sys.stdout, sys.stdin.fileno(), editor)
    try:
        trio.run(run, args, term)
    except ClientError as exc:
        term.end_line()
        print(f"atlas chat: {exc}", file=sys.stderr)
        return exc.exit_status
    return 0
