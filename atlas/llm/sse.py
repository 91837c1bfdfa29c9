"""The one ``text/event-stream`` reader: provider streams (``provider``) and remote agents'
streams (``atlas.agent_api.remote``) are both read with it."""

from __future__ import annotations

# One event, every line of it counted up to its blank line (comments and unknown fields too): a
# provider's chunk is a few hundred bytes, and an event cut into many lines must not slip past a
# bound that counts one line at a time.
MAX_SSE_EVENT = 1024 * 1024


class SseTooLong(ValueError):
    """An event grew past ``MAX_SSE_EVENT`` without ending: not a stream this reader accepts."""


class SseDataParser:
    """Incremental ``text/event-stream`` parser keeping only what OpenAI's and VoltAgent's streams
    use: the ``data`` of each event (its ``data:`` lines joined with newlines; an event ends at a
    blank line). Comments, other fields and keep-alive blank lines are skipped."""

    def __init__(self) -> None:
        self._buffer = b""
        self._data: list[bytes] = []
        self._event_bytes = 0  # bytes of the event's complete lines so far

    def feed(self, chunk: bytes) -> list[bytes]:
        if (
            not self._buffer and not self._data and chunk.startswith(b"data: ")
            and chunk.endswith(b"\n\n") and chunk.find(b"\n", 6, -2) < 0
            and self._event_bytes + len(chunk) <= MAX_SSE_EVENT
        ):
            # What a provider sends per delta: one whole event of one ``data:`` line, alone in
            # its read. The same result as the lines below, without splitting and looping.
            self._event_bytes = 0
            return [chunk[6:-2].rstrip(b"\r")]
        self._buffer += chunk
        if b"\n" not in chunk:
            self._check_size(len(self._buffer))
            return []
        *lines, self._buffer = self._buffer.split(b"\n")
        events: list[bytes] = []
        for line in lines:
            self._line(line.rstrip(b"\r"), events)
        self._check_size(len(self._buffer))
        return events

    def _check_size(self, pending: int) -> None:
        if self._event_bytes + pending > MAX_SSE_EVENT:
            raise SseTooLong(f"a stream event is longer than {MAX_SSE_EVENT} bytes")

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
            self._event_bytes = 0
            return
        self._event_bytes += len(line) + 1
        self._check_size(0)
        field, _, value = line.partition(b":")
        if field == b"data":
            self._data.append(value[1:] if value.startswith(b" ") else value)
