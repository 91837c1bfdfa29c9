"""Take the web page's screenshots used in docs/clients.md.

    .venv/bin/python scripts/screenshots.py docs/screenshots

Starts a real Atlas server and the tests' fake provider on port 0 (with a scripted conversation),
opens the page in headless Chromium at a desktop and a phone size, and writes ``web-desktop.png``
and ``web-phone.png`` into the given directory. It reuses the test suite's helpers
(``tests/servers.py``, ``tests/fake_provider.py``, ``tests/browser.py``), so it needs the test
dependencies: ``pip install -e '.[test]'`` and ``scripts/install-test-deps.sh`` (Chromium).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from browser import ONLINE, in_browser, send, sign_in_url  # noqa: E402
from fake_provider import Reply, open_fake_provider  # noqa: E402
from servers import open_atlas  # noqa: E402

CONVERSATION = [
    ("What can you help me with?",
     ["I can answer questions, draft and edit text, explain code, and think through problems "
      "with you. ", "Your messages go through your own Atlas server, billed to your own key."]),
    ("Give me three tips for naming things in code.",
     ["1. Name things for **what they mean**, not how they are stored.\n",
      "2. Prefer a longer clear name over a short puzzling one.\n",
      "3. Keep one word per idea across the codebase, for example:\n\n",
      "```python\ndef fetch_user(user_id: str) -> User:\n    ...\n```\n",
      "See `fetch_user`, not `get_usr`."]),
]

VIEWPORTS = [
    ("web-desktop.png", {"viewport": {"width": 1280, "height": 800}}),
    ("web-phone.png", {"viewport": {"width": 390, "height": 844}, "device_scale_factor": 2,
                       "is_mobile": True, "has_touch": True}),
]


async def take_screenshots(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    with tempfile.TemporaryDirectory(prefix="atlas-screenshots-") as tmp:
        async with open_fake_provider() as provider, open_atlas(
            Path(tmp), users={"alice": None}, provider_url=provider.url
        ) as server:
            for name, context in VIEWPORTS:
                def steps(page: Any, name: str = name) -> None:
                    page.emulate_media(reduced_motion="reduce")
                    page.wait_for_selector(ONLINE)
                    for index, (question, deltas) in enumerate(CONVERSATION):
                        provider.behaviour = Reply(deltas=deltas)
                        send(page, question)
                        page.wait_for_selector(f'.msg.assistant[data-status="done"] >> nth={index}')
                    page.screenshot(path=str(out / name))

                await in_browser(sign_in_url(server.url, "alice", server.tokens["alice"]), steps, **context)
                written.append(out / name)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description="Take the web page's screenshots for the docs.")
    parser.add_argument("outdir", type=Path, help="where to write web-desktop.png and web-phone.png")
    args = parser.parse_args()
    for path in trio.run(take_screenshots, args.outdir):
        print(path)


if __name__ == "__main__":
    main()
