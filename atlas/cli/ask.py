"""``atlas ask "question"``: one question, the answer streamed to stdout and nothing else.

Made for shell scripts: the answer (or, with ``--json``, the final ``agent:done`` object) is the
only thing on stdout; a failure is one line ``atlas ask: CODE: message`` on stderr. Exit status:
0 answered, 1 the server or the network failed, 2 bad usage (URL, token, empty question),
130 interrupted (the reply is cancelled on the server first).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import sys
from typing import Any, TextIO

import trio

from atlas.cli.client import ClientError, Connection, UsageError, lookup_user, open_connection, resolve_target

CANCEL_WAIT_SECONDS = 3.0


class Interrupted(Exception):
    pass


def read_question(question: str, stdin: TextIO) -> str:
    text = stdin.read() if question == "-" else question
    if not text.strip():
        raise UsageError("the question is empty" + (" (nothing on stdin)" if question == "-" else ""))
    return text.strip("\n") if question == "-" else text


def request(args: argparse.Namespace, question: str, request_id: str) -> dict[str, Any]:
    message: dict[str, Any] = {"type": "agent:stream", "id": request_id, "message": question}
    if args.agent:
        message["agentId"] = args.agent
    if args.conversation:
        message["conversationId"] = args.conversation
    return message


async def stream_answer(
    connection: Connection, args: argparse.Namespace, question: str, out: TextIO
) -> dict[str, Any]:
    """Send the question and write the reply as it arrives; return the ``agent:done`` frame.
    Ctrl-C cancels the request on the server, then raises ``Interrupted``."""
    request_id = f"ask-{secrets.token_hex(6)}"
    interrupted = False
    outcome: dict[str, Any] | ClientError | None = None
    printed = False
    await connection.send(request(args, question, request_id))
    with trio.open_signal_receiver(signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:

            async def cancel_on_signal() -> None:
                nonlocal interrupted
                async for _ in signals:
                    interrupted = True
                    await connection.send({"type": "agent:cancel", "id": request_id})
                    nursery.cancel_scope.deadline = trio.current_time() + CANCEL_WAIT_SECONDS

            nursery.start_soon(cancel_on_signal)
            async for frame in connection:
                kind, frame_id = frame["type"], frame.get("id")
                if kind == "agent:delta" and frame_id == request_id and not args.json:
                    try:
                        out.write(str(frame.get("text", "")))
                        out.flush()
                    except BrokenPipeError:
                        # The reader went away (`atlas ask ... | head -1`): stop the reply.
                        await connection.send({"type": "agent:cancel", "id": request_id})
                        outcome = ClientError("broken_pipe", "stdout was closed")
                    printed = True
                elif kind == "agent:done" and frame_id == request_id:
                    outcome = frame
                elif (kind == "agent:error" and frame_id == request_id) or kind == "error":
                    outcome = ClientError.from_error(frame.get("error"))
                if outcome is not None:
                    nursery.cancel_scope.cancel()
                    break
    if interrupted or outcome is None or (
        isinstance(outcome, ClientError) and outcome.code == "cancelled"
    ):
        raise Interrupted
    if isinstance(outcome, ClientError):
        if outcome.code == "broken_pipe":
            raise BrokenPipeError
        raise outcome
    if not printed and not args.json:
        out.write(str(outcome.get("text", "")))  # a server that sent no deltas
    return outcome


async def run(args: argparse.Namespace, question: str, out: TextIO) -> dict[str, Any]:
    target = resolve_target(args.url, args.user, args.token)
    user = target.user or await lookup_user(target)
    async with open_connection(target, user) as connection:
        return await stream_answer(connection, args, question, out)


def main(args: argparse.Namespace) -> int:
    out = sys.stdout
    try:
        question = read_question(args.question, sys.stdin)
        done = trio.run(run, args, question, out)
    except ClientError as exc:
        print(f"atlas ask: {exc}", file=sys.stderr)
        return exc.exit_status
    except Interrupted:
        print("\natlas ask: cancelled", file=sys.stderr)
        return 130
    except BrokenPipeError:
        silence_stdout()
        return 0  # the reader went away (`atlas ask ... | head -1`): not an error
    try:
        if args.json:
            out.write(json.dumps(done, ensure_ascii=False) + "\n")
        elif done.get("text") and not str(done["text"]).endswith("\n"):
            out.write("\n")
        out.flush()
    except BrokenPipeError:
        silence_stdout()
    return 0


def silence_stdout() -> None:
    """After a broken pipe, point stdout at /dev/null so that the interpreter's final flush
    does not print a second error."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
