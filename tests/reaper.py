"""Cleans up after a test process that ended without cleaning up (SIGTERM, SIGKILL, a crash).

    reaper = start_reaper(directory)   # beside a server whose processes run in `directory`
    ...                                 # the test stops the server and removes the directory
    stop_reaper(reaper)                 # nothing is left to do

``Started`` is the context-manager half the servers using a reaper share (pg_cluster.py,
haproxy_proc.py): start on entering, close on leaving, and close what a failed start left.

``start_reaper`` runs this file as a script in a session of its own, with a pipe on its stdin
whose write end only the test process holds. When that end closes, however the test process ended,
the script SIGKILLs every process whose working directory is ``directory`` or under it, then
removes ``directory``. atexit handlers and fixture finalizers do not run on SIGTERM or SIGKILL
(``timeout`` and CI runners send SIGTERM); this does.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Self

PREFIX = "atlas-"  # only directories the tests made: never a path that names anything else
WAIT = 10.0


class Started:
    def start(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def start_reaper(directory: Path) -> subprocess.Popen[bytes]:
    if not directory.name.startswith(PREFIX):
        raise ValueError(f"{directory} is not a test directory ({PREFIX}*)")
    return subprocess.Popen(
        [sys.executable, __file__, str(directory)],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, start_new_session=True,
    )


def stop_reaper(reaper: subprocess.Popen[bytes]) -> None:
    assert reaper.stdin is not None
    reaper.stdin.close()
    try:
        reaper.wait(WAIT)
    except subprocess.TimeoutExpired:
        reaper.kill()
        reaper.wait(WAIT)


def processes_under(directory: str) -> list[int]:
    """Live processes (no zombies) whose working directory is ``directory`` or inside it."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cwd = os.readlink(entry / "cwd")
            except OSError:  # gone, a zombie, or not ours to read
                continue
            if cwd == directory or cwd.startswith(directory + "/"):
                found.append(int(entry.name))
    return sorted(found)


def main(directory: str) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.stdin.buffer.read()  # until the test process closes its end, or ends
    deadline = time.monotonic() + WAIT
    while (pids := processes_under(directory)) and time.monotonic() < deadline:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.01)
    shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    path = os.path.realpath(sys.argv[1])
    if not os.path.basename(path).startswith(PREFIX):
        sys.exit(f"reaper: {path} is not a test directory ({PREFIX}*)")
    main(path)
