"""The one ``text/event-stream`` reader: provider streams (``provider``) and remote agents'
streams (``atlas.agent_api.remote``) are both read with it."""

from __future__ import annotations

MAX_SSE_LINE = 1024 * 1024


class SseTooLong(ValueError):
    """A line grew past ``MAX_SSE_LINE`` without ending: not a stream this reader accepts."""


class SseDataParser:
    """Incremental ``text/event-stream`` parser keeping only what OpenAI's and VoltAgent's streams
    use: the ``data`` of each event (its ``data:`` lines joined with newlines; an event ends at a
    blank line). Comments, other fields and keep-alive blank lines are skipped."""

    def __init__(self) -> None:
        self._buffer = b""
        self._data: list[bytes] = []

    def feed(self, chunk: bytes) -> list[bytes]:
        self._buffer += chunk
        if b"\n" not in chunk:
            if len(self._buffer) > MAX_SSE_LINE:
                raise SseTooLong(f"a stream line is longer than {MAX_SSE_LINE} bytes")
            return []
        *lines, self._buffer = self._buffer.split(b"\n")
        events: list[bytes] = []
        for line in lines:
            self._line(line.rstrip(b"\r"), events)
        return events

    def close(self) -> list[bytes]:
        events: list[bytes] = []
        if self._buffer:
            self._line(self._buffer.rstrip(b"\r"), events)
            self._buffer = b""
        self._line(b"", events)
        return events

    def _line(self, line: bytes, events: list[bytes]) -> None:
        if not line:
            if self._data:
                events.append(b"\n".join(self._data))
                self._data = []
            return
        field, _, value = line.partition(b":")
        if field == b"data":
            self._data.append(value[1:] if value.startswith(b" ") else value)
