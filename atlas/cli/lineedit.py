"""Line editing and history for ``atlas chat``: GNU readline, driven from the trio loop.

Python's ``input()`` would block the loop, and in a worker thread it could not be interrupted:
Ctrl-C at the prompt would leave a thread inside readline with the terminal in its raw mode, and
printing a notice while the user types would race with it. So ``LineEditor`` uses readline's
alternate interface instead (the one made for programs with an event loop): the prompt is
installed with ``rl_callback_handler_install``, and each time the terminal is readable the loop
hands readline one key with ``rl_callback_read_char``. Everything runs in the one trio thread;
readline only edits, it never sees a signal (Ctrl-C stays ``chat``'s SIGINT, as before).

The library is the one Python's own ``readline`` module is linked with, reached through
``ctypes``, so that both share one history and the user's ``~/.inputrc``. Where it is not GNU
readline (libedit on macOS) or the terminal is not one, ``LineEditor.open`` returns None and chat
reads plain lines as before.

``History`` keeps the lines in a file, one per line, appended as they are typed (so a session
that is killed keeps them) and trimmed to the last ``HISTORY_LINES`` when a session starts.
"""

from __future__ import annotations

import ctypes
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

import trio

HISTORY_LINES = 1000
_LINE_HANDLER = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


def history_path(environ: Mapping[str, str] | None = None) -> Path | None:
    """``ATLAS_HISTORY_FILE`` (empty: keep no file), else ``$XDG_STATE_HOME/atlas/history``,
    else ``~/.local/state/atlas/history``."""
    environ = os.environ if environ is None else environ
    explicit = environ.get("ATLAS_HISTORY_FILE")
    if explicit is not None:
        return Path(explicit).expanduser() if explicit.strip() else None
    state = environ.get("XDG_STATE_HOME", "")
    base = Path(state) if os.path.isabs(state) else Path.home() / ".local" / "state"
    return base / "atlas" / "history"


class History:
    """The lines typed at the prompt, newest last. A line typed with a leading space is not kept
    (as in a shell: a way to keep a secret out of the file), nor a repeat of the line before."""

    def __init__(self, path: Path | None, limit: int = HISTORY_LINES) -> None:
        self.path = path
        self.limit = limit
        self.lines: list[str] = []
        self.problem: str | None = None  # why the file cannot be used, said once by chat

    def load(self) -> list[str]:
        if self.path is None:
            return self.lines
        try:
            with open(self.path, encoding="utf-8", errors="replace") as file:
                lines = file.read().splitlines()
        except FileNotFoundError:
            return self.lines
        except OSError as exc:
            self._failed(exc)
            return self.lines
        self.lines = lines[-self.limit:]
        if len(lines) > self.limit:
            self._rewrite()
        return self.lines

    def add(self, line: str) -> str | None:
        """Keep ``line`` (without trailing blanks); what was kept, or None."""
        kept = line.rstrip()
        if not kept or line[0].isspace() or "\n" in kept or (self.lines and self.lines[-1] == kept):
            return None
        self.lines.append(kept)
        del self.lines[: -self.limit]
        if self.path is not None and self.problem is None:
            try:
                self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                with open(fd, "a", encoding="utf-8") as file:
                    file.write(kept + "\n")
            except OSError as exc:
                self._failed(exc)
        return kept

    def _rewrite(self) -> None:
        """The file again with the kept lines only: a new file renamed over the old one."""
        assert self.path is not None
        try:
            fd, temporary = tempfile.mkstemp(prefix=".history-", dir=self.path.parent)
            try:
                with open(fd, "w", encoding="utf-8") as file:
                    file.writelines(line + "\n" for line in self.lines)
                os.replace(temporary, self.path)
            except BaseException:
                os.unlink(temporary)
                raise
        except OSError as exc:
            self._failed(exc)

    def _failed(self, exc: OSError) -> None:
        self.problem = f"history is not saved to {self.path}: {exc.strerror or exc}"


class LineEditor:
    """Reads lines with editing and history. One ``read_line`` at a time; while it waits,
    ``hide`` and ``show`` let others print above the line being typed. ``close`` at the end."""

    def __init__(self, lib: ctypes.CDLL, readline: Any, stdin: TextIO, stdout: TextIO, history: History) -> None:
        self._lib = lib
        self._readline = readline  # Python's module: the same library, for history and completion
        self._fd = stdin.fileno()
        self._out = stdout
        self.history = history
        self._libc = _bind_libc(ctypes.CDLL(None))
        self._handler = _LINE_HANDLER(self._on_line)  # kept: readline holds a pointer to it
        self._prompt = b""
        self._installed = False
        self._done = False
        self._line: bytes | None = None
        self._screen: os.terminal_size | None = None

    @classmethod
    def open(cls, stdin: TextIO, stdout: TextIO, history: History) -> LineEditor | None:
        """A line editor on this terminal, or None (not a terminal, or no GNU readline)."""
        try:
            if not (stdin.isatty() and stdout.isatty()):
                return None
            import readline
        except (ImportError, ValueError, OSError):
            return None
        if "libedit" in (readline.__doc__ or ""):
            return None
        try:
            lib = _bind(ctypes.CDLL(getattr(readline, "__file__", None)))
        except (OSError, AttributeError):
            return None
        # Signals stay with the program (chat turns Ctrl-C into cancel or leave itself).
        ctypes.c_int.in_dll(lib, "rl_catch_signals").value = 0
        ctypes.c_int.in_dll(lib, "rl_catch_sigwinch").value = 0
        # The terminal stays in readline's mode from the first prompt to ``close``, not only
        # while a prompt shows: keys typed during a reply are then neither echoed into it nor
        # turned by the kernel's line discipline (a Ctrl-D typed ahead would become a NUL);
        # readline gets them, as typed, at the next prompt.
        ctypes.c_void_p.in_dll(lib, "rl_deprep_term_function").value = None
        readline.set_auto_history(False)
        readline.clear_history()
        lib.stifle_history(history.limit)
        for line in history.load():
            readline.add_history(line)
        readline.set_completer_delims(" \t\n")
        readline.parse_and_bind("tab: complete")  # Python's module binds Tab to insert a tab
        return cls(lib, readline, stdin, stdout, history)

    def close(self) -> None:
        """Give the terminal its own modes back."""
        self._remove()
        self._lib.rl_deprep_terminal()
        self._libc.fflush(None)

    def set_commands(self, commands: list[str]) -> None:
        """Tab completes these at the start of a line."""

        def complete(text: str, state: int) -> str | None:
            if self._readline.get_begidx() != 0:
                return None
            matches = [command + " " for command in commands if command.startswith(text)]
            return matches[state] if state < len(matches) else None

        self._readline.set_completer(complete)

    @staticmethod
    def prompt(text: str, style: str | None) -> str:
        """``text`` styled for readline, which must be told which bytes take no room."""
        return f"\x01\x1b[{style}m\x02{text}\x01\x1b[0m\x02" if style else text

    async def read_line(self, prompt: str) -> str | None:
        """Show ``prompt`` and read one edited line; None at end of input (Ctrl-D)."""
        self._prompt = prompt.encode()
        self._done, self._line = False, None
        self._fit_screen()
        self._install()
        try:
            while not self._done:
                await trio.lowlevel.wait_readable(self._fd)
                self._fit_screen()
                self._lib.rl_callback_read_char()
        finally:
            self._remove()
        if self._line is None:
            return None
        line = self._line.decode("utf-8", errors="replace")
        kept = self.history.add(line)
        if kept is not None:
            self._readline.add_history(kept)
        return line

    def hide(self) -> None:
        """Clear the line being typed from the screen, to print something in its place."""
        if self._installed:
            self._lib.rl_clear_visible_line()
            self._libc.fflush(None)

    def show(self) -> None:
        """Draw the prompt and the line being typed again, on a line of their own."""
        if self._installed:
            self._lib.rl_on_new_line()
            self._lib.rl_redisplay()

    def discard_line(self) -> bool:
        """Ctrl-C at the prompt: drop what was typed and prompt again below it, as a shell does.
        False when nothing was typed."""
        if not self._installed or ctypes.c_int.in_dll(self._lib, "rl_end").value == 0:
            return False
        ctypes.c_int.in_dll(self._lib, "rl_point").value = ctypes.c_int.in_dll(self._lib, "rl_end").value
        self._lib.rl_redisplay()
        self._out.write("^C\n")
        self._out.flush()
        self._lib.rl_callback_sigcleanup()
        self._lib.rl_free_line_state()
        self._remove()
        self._lib.using_history()
        self._install()
        return True

    # -- readline's side -------------------------------------------------------------------

    def _install(self) -> None:
        self._lib.rl_callback_handler_install(self._prompt, self._handler)
        self._installed = True

    def _remove(self) -> None:
        if self._installed:
            self._installed = False
            self._lib.rl_callback_handler_remove()
            self._libc.fflush(None)

    def _on_line(self, pointer: int | None) -> None:
        # Called by readline inside rl_callback_read_char with the line (NULL at end of input).
        # Removing the handler here, as readline's manual does, keeps it from prompting again.
        self._line = None if pointer is None else ctypes.string_at(pointer)
        if pointer is not None:
            self._libc.free(pointer)
        self._done = True
        self._remove()

    def _fit_screen(self) -> None:
        try:
            size = os.get_terminal_size(self._out.fileno())
        except OSError:
            return
        if size != self._screen:
            self._screen = size
            self._lib.rl_set_screen_size(size.lines, size.columns)


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Declare the readline functions used here; AttributeError when one is missing."""
    signatures: dict[str, tuple[list[Any], Any]] = {
        "rl_callback_handler_install": ([ctypes.c_char_p, _LINE_HANDLER], None),
        "rl_callback_read_char": ([], None),
        "rl_callback_handler_remove": ([], None),
        "rl_callback_sigcleanup": ([], None),
        "rl_free_line_state": ([], None),
        "rl_clear_visible_line": ([], ctypes.c_int),
        "rl_on_new_line": ([], ctypes.c_int),
        "rl_redisplay": ([], None),
        "rl_set_screen_size": ([ctypes.c_int, ctypes.c_int], None),
        "rl_deprep_terminal": ([], None),
        "using_history": ([], None),
        "stifle_history": ([ctypes.c_int], None),
    }
    return _declare(lib, signatures)


def _bind_libc(libc: ctypes.CDLL) -> ctypes.CDLL:
    # free: readline hands over each line in memory from malloc. fflush: readline writes through
    # C's stdout, Python through its own buffer; flushing keeps the two in order on the screen.
    return _declare(libc, {"free": ([ctypes.c_void_p], None), "fflush": ([ctypes.c_void_p], ctypes.c_int)})


def _declare(lib: ctypes.CDLL, signatures: dict[str, tuple[list[Any], Any]]) -> ctypes.CDLL:
    for name, (argtypes, restype) in signatures.items():
        function = getattr(lib, name)
        function.argtypes = argtypes
        function.restype = restype
    return lib
