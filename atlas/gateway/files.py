"""The page's static files, served by Quart with a file body that cannot leak its file.

quart-trio's ``TrioFileBody.__aenter__`` opens the file (``trio.open_file``, a worker thread)
and then awaits ``seek``: a cancellation in between leaves the open file to the garbage
collector (``ResourceWarning: unclosed file``), since ``__aexit__`` only runs once
``__aenter__`` has returned. quart-trio cancels the response as soon as the client disconnects,
and a ``HEAD`` client disconnects as soon as it has the headers, which Hypercorn sends before
the first body chunk is read: every ``HEAD /static/...`` leaked its file (found by issue 14's
HTTP fuzzer; a ``GET`` whose client hangs up at the headers could too). Upstream reproduction
(quart-trio 0.12): a QuartTrio app with a static folder under ``hypercorn -k trio``, run with
``python -W always::ResourceWarning``; ``curl -I localhost:8000/static/some-file`` prints
``ResourceWarning: unclosed file`` once the file object is collected.
"""

from __future__ import annotations

import trio
from quart_trio.wrappers.response import TrioFileBody, TrioResponse


class ClosingFileBody(TrioFileBody):
    async def __aenter__(self) -> ClosingFileBody:
        with trio.CancelScope(shield=True):  # a file that was opened is always ours to close
            self.file = await trio.open_file(self.file_path, mode="rb")
        try:
            await self.file.seek(self.begin)
        except BaseException:
            await self.file.aclose()  # closes even when cancelled (trio shields the close)
            raise
        return self


class PageResponse(TrioResponse):
    file_body_class = ClosingFileBody  # type: ignore[assignment]
