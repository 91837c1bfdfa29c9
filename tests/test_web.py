"""The web chat page in real headless Chromium (Debian's ``chromium``, driven by Playwright).

The browser helpers are in ``browser.py`` (``scripts/screenshots.py`` uses them too).
``scripts/install-test-deps.sh`` installs Chromium and Playwright; without them these tests skip.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from fake_provider import Reply, open_fake_provider
from servers import WAIT, add_user, free_port, open_atlas, start_atlas_process
from tcp_proxy import open_tcp_proxy

pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (scripts/install-test-deps.sh)")
from browser import CHROMIUM, ONLINE, in_browser, send, sign_in_url  # noqa: E402 (needs Playwright)

pytestmark = pytest.mark.skipif(
    not os.path.exists(CHROMIUM), reason="Chromium is not installed (scripts/install-test-deps.sh)"
)


async def test_streamed_reply_html_shown_as_text_and_kept_across_reload(tmp_path: Path) -> None:
    hostile = ['<b id="injected">bold</b> ', "<script>window.pwned = 1</script>",
               ' <img src=x onerror="window.pwned = 2">']
    async with open_fake_provider() as provider, open_atlas(
        tmp_path, users={"alice": None}, provider_url=provider.url
    ) as server:
        gate = trio.Event()
        provider.behaviour = Reply(deltas=hostile, gate=gate, hold_after=1)

        def steps(page: Any) -> dict[str, Any]:
            page.wait_for_selector(ONLINE)
            assert page.evaluate("location.hash") == ""  # the token left the address bar
            send(page, "show me some html")
            reply = page.locator(".msg.assistant").last
            # The first delta is on screen while the provider still holds the rest back.
            page.wait_for_selector('.msg.assistant[data-status="streaming"]')
            assert reply.locator(".text").text_content() == hostile[0]
            assert page.is_visible("#stop")
            trio.from_thread.run_sync(gate.set)
            page.wait_for_selector('.msg.assistant[data-status="done"]')
            shown = reply.locator(".text").text_content()
            facts = {
                "shown": shown,
                "injected": page.locator("#injected").count(),
                "pwned": page.evaluate("window.pwned === undefined ? null : window.pwned"),
                "conversation": page.evaluate("localStorage.getItem('atlas.conversationId')"),
            }
            page.reload()
            page.wait_for_selector(ONLINE)
            facts["after_reload"] = page.locator(".msg").all_text_contents()
            facts["conversation_after"] = page.evaluate("localStorage.getItem('atlas.conversationId')")
            provider.behaviour = Reply(deltas=["second answer"])
            send(page, "and again")
            page.wait_for_selector('.msg.assistant[data-status="done"] >> nth=1')
            return facts

        facts = await in_browser(sign_in_url(server.url, "alice", server.tokens["alice"]), steps)
        assert facts["shown"] == "".join(hostile)
        assert facts["injected"] == 0 and facts["pwned"] is None
        assert facts["conversation"] and facts["conversation_after"] == facts["conversation"]
        assert any("show me some html" in text for text in facts["after_reload"])
        assert any("<script>window.pwned = 1</script>" in text for text in facts["after_reload"])
        # The same conversation continued on the server: the earlier turn went to the provider.
        history = [m.get("content") for m in provider.requests[-1].body["messages"]]
        assert "show me some html" in history and "and again" in history


async def test_stop_button_cancels_the_reply(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Also: the browser answers the server's pings (every 0.5 s here) by itself, so a page
    waiting on a reply for many intervals keeps its connection (a drop would end the reply)."""
    async with open_fake_provider() as provider, open_atlas(
        tmp_path, users={"alice": None}, provider_url=provider.url, ws_ping_interval_seconds=0.5
    ) as server:
        provider.behaviour = Reply(deltas=["Working on it", " forever"], gate=trio.Event())

        def steps(page: Any) -> dict[str, Any]:
            page.wait_for_selector(ONLINE)
            send(page, "a long job")
            page.wait_for_selector('.msg.assistant[data-status="streaming"]')
            page.wait_for_timeout(2500)  # the time itself is the test: pings go back and forth
            page.wait_for_selector('.msg.assistant[data-status="streaming"]')
            page.click("#stop")
            page.wait_for_selector('.msg.assistant[data-status="cancelled"]')
            return {
                "meta": page.locator(".msg.assistant .meta").last.text_content(),
                "send_visible": page.is_visible("#send"),
            }

        facts = await in_browser(sign_in_url(server.url, "alice", server.tokens["alice"]), steps)
        assert facts == {"meta": "Stopped", "send_visible": True}
        with trio.fail_after(WAIT):
            await provider.wait_disconnect()
    assert not [r for r in caplog.records if "answered no ping" in r.getMessage()]


RESUMED = ["Alpha ", "beta ", "gamma ", "delta."]
LAST_REPLY_TEXT = "() => { const t = [...document.querySelectorAll('.msg.assistant .text')].pop(); return t && t.textContent; }"


async def test_reload_mid_reply_resumes_and_the_reply_completes(tmp_path: Path) -> None:
    async with open_fake_provider() as provider, open_atlas(
        tmp_path, users={"alice": None}, provider_url=provider.url
    ) as server:
        gate = trio.Event()
        provider.behaviour = Reply(deltas=RESUMED, gate=gate, hold_after=2)

        def steps(page: Any) -> dict[str, Any]:
            page.wait_for_selector(ONLINE)
            send(page, "a reply worth keeping")
            page.wait_for_function(f"() => ({LAST_REPLY_TEXT})() === 'Alpha beta '")
            page.reload()
            page.wait_for_selector(ONLINE)
            trio.from_thread.run_sync(gate.set)
            page.wait_for_selector('.msg.assistant[data-status="done"]')
            return {
                "replies": page.locator(".msg.assistant .text").all_text_contents(),
                "stop_hidden": page.is_hidden("#stop"),
                "stored": page.evaluate(
                    "() => JSON.parse(localStorage.getItem(Object.keys(localStorage)"
                    ".find((k) => k.startsWith('atlas.messages.')))).map((m) => [m.status, m.text])"),
            }

        facts = await in_browser(sign_in_url(server.url, "alice", server.tokens["alice"]), steps)
    assert facts["replies"] == ["".join(RESUMED)]
    assert facts["stop_hidden"]
    assert facts["stored"] == [["done", "a reply worth keeping"], ["done", "".join(RESUMED)]]
    assert len(provider.completions()) == 1  # resumed, not asked again


async def test_a_dropped_connection_resumes_the_reply_in_flight(tmp_path: Path) -> None:
    async with open_fake_provider() as provider, open_atlas(
        tmp_path, users={"alice": None}, provider_url=provider.url
    ) as server, open_tcp_proxy(int(server.url.rsplit(":", 1)[1])) as proxy:
        gate = trio.Event()
        provider.behaviour = Reply(deltas=RESUMED, gate=gate, hold_after=2)

        def steps(page: Any) -> dict[str, Any]:
            page.wait_for_selector(ONLINE)
            send(page, "keep going")
            page.wait_for_function(f"() => ({LAST_REPLY_TEXT})() === 'Alpha beta '")
            trio.from_thread.run(proxy.cut)  # the network drops: no close frame
            page.wait_for_selector('#status[data-state="reconnecting"]')
            page.wait_for_selector(ONLINE)
            trio.from_thread.run_sync(gate.set)
            page.wait_for_selector('.msg.assistant[data-status="done"]')
            return {"replies": page.locator(".msg.assistant .text").all_text_contents()}

        facts = await in_browser(sign_in_url(proxy.url, "alice", server.tokens["alice"]), steps)
    assert facts["replies"] == ["".join(RESUMED)]
    assert len(provider.completions()) == 1


async def test_reconnects_after_a_server_restart(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    token = add_user(data_dir, "alice")
    bind = f"127.0.0.1:{free_port()}"
    servers = [await start_atlas_process(data_dir, bind=bind)]

    async def restart() -> None:
        assert await trio.to_thread.run_sync(servers[-1].terminate) == 0
        servers.append(await start_atlas_process(data_dir, bind=bind))

    def steps(page: Any) -> dict[str, Any]:
        page.wait_for_selector(ONLINE)
        send(page, "before the restart")
        page.wait_for_selector('.msg.assistant[data-status="done"]')
        page.evaluate("""() => {
            window.seenStates = [];
            const status = document.getElementById('status');
            new MutationObserver(() => window.seenStates.push(
                status.dataset.state + ': ' + status.textContent.trim()
            )).observe(status, {attributes: true, childList: true, subtree: true, characterData: true});
        }""")
        trio.from_thread.run(restart)
        page.wait_for_selector(ONLINE)
        send(page, "after the restart")
        page.wait_for_selector('.msg.assistant[data-status="done"] >> nth=1')
        return {
            "replies": page.locator(".msg.assistant .text").all_text_contents(),
            "states": page.evaluate("window.seenStates"),
        }

    try:
        facts = await in_browser(sign_in_url(servers[0].url, "alice", token), steps)
    finally:
        for server in servers:
            if server.process.poll() is None:
                server.kill()
    assert "You said: before the restart" in facts["replies"][0]
    assert "You said: after the restart" in facts["replies"][1]
    assert any(state.startswith("reconnecting: Reconnecting in") for state in facts["states"]), facts["states"]


async def test_sign_in_dialog_and_bad_token(tmp_path: Path) -> None:
    async with open_atlas(tmp_path, users={"alice": None}) as server:

        def steps(page: Any) -> dict[str, Any]:
            page.wait_for_selector("#settings[open]")  # no token yet: the dialog asks for one
            page.fill("#token-field", "not-a-valid-token")
            page.click("#save-settings")
            page.wait_for_selector("#settings-error:not([hidden])")
            error = page.text_content("#settings-error")
            page.fill("#token-field", server.tokens["alice"])
            page.click("#save-settings")  # no user id: learned from /api/me
            page.wait_for_selector(ONLINE)
            return {"error": error, "who": page.text_content("#who")}

        facts = await in_browser(server.url + "/", steps)
        assert "not accepted" in facts["error"]
        assert facts["who"] == "Signed in as alice"


# A reply in Markdown, streamed in pieces that cut through a fence, a bold span and a link, with
# hostile bits a model could be made to write.
MARKDOWN_REPLY = [
    "Here is **a plan** with `inline code`:\n\n- first *step*\n- second ste",
    "p\n\n1. one\n2. two\n\n```python\nprint(\"<script>window.pwned = 3</script>\")\n",
    "if a < b and c > d:\n    pass\n```\n\nSee [the docs](https://example.com/docs?a=1&b=2) or ",
    "[click me](javascript:window.pwned=4) or [this](JaVaScRiPt:window.pwned=5) or <javascript:x>.\n\n",
    '<img src=x onerror="window.pwned = 6"> and <a href="javascript:window.pwned=7">raw</a> **bo',
    "ld** end",
]


async def test_markdown_reply_renders_as_elements_and_runs_nothing(tmp_path: Path) -> None:
    async with open_fake_provider() as provider, open_atlas(
        tmp_path, users={"alice": None}, provider_url=provider.url
    ) as server:
        gate = trio.Event()
        provider.behaviour = Reply(deltas=MARKDOWN_REPLY, gate=gate, hold_after=2)
        async with httpx.AsyncClient() as client:
            page = await client.get(server.url + "/")
        policy = page.headers["content-security-policy"]
        assert "default-src 'self'" in policy and "unsafe-inline" not in policy

        def reply_facts(page: Any) -> dict[str, Any]:
            return page.evaluate("""() => {
                const text = [...document.querySelectorAll('.msg.assistant .text')].pop();
                const all = (selector) => [...text.querySelectorAll(selector)];
                return {
                    code: all('pre > code').map((node) => [node.className, node.textContent]),
                    items: all('li').map((node) => node.textContent),
                    strong: all('strong').map((node) => node.textContent),
                    em: all('em').map((node) => node.textContent),
                    inline: all(':not(pre) > code').map((node) => node.textContent),
                    links: all('a').map((node) => [node.textContent, node.getAttribute('href'),
                                                   node.target, node.rel]),
                    elements: [...new Set(all('*').map((node) => node.tagName.toLowerCase()))].sort(),
                    text: text.textContent,
                    pwned: window.pwned === undefined ? null : window.pwned,
                };
            }""")

        def steps(page: Any) -> dict[str, Any]:
            page.wait_for_selector(ONLINE)
            send(page, "write some markdown")
            # Mid-stream, inside an unclosed fence: already a list and a code block, not raw text.
            page.wait_for_selector('.msg.assistant[data-status="streaming"] pre > code')
            facts = {"streaming": reply_facts(page)}
            trio.from_thread.run_sync(gate.set)
            page.wait_for_selector('.msg.assistant[data-status="done"]')
            facts["done"] = reply_facts(page)
            page.reload()
            page.wait_for_selector(ONLINE)
            facts["reloaded"] = reply_facts(page)
            return facts

        facts = await in_browser(sign_in_url(server.url, "alice", server.tokens["alice"]), steps)

    streaming = facts["streaming"]
    assert streaming["items"][:2] == ["first step", "second step"]
    assert streaming["code"] == [["language-python", 'print("<script>window.pwned = 3</script>")\n']]
    done = facts["done"]
    assert done == facts["reloaded"]
    assert done["pwned"] is None
    assert done["code"] == [["language-python",
                             'print("<script>window.pwned = 3</script>")\nif a < b and c > d:\n    pass']]
    assert done["items"] == ["first step", "second step", "one", "two"]
    assert done["strong"] == ["a plan", "bold"] and done["em"] == ["step"]
    assert done["inline"] == ["inline code"]
    # The one safe link is a link, opening elsewhere without a handle on this page.
    assert done["links"] == [["the docs", "https://example.com/docs?a=1&b=2", "_blank", "noopener noreferrer"]]
    # Everything else is text, exactly as the model wrote it.
    for shown in ["[click me](javascript:window.pwned=4)", "[this](JaVaScRiPt:window.pwned=5)",
                  "<javascript:x>", '<img src=x onerror="window.pwned = 6">',
                  '<a href="javascript:window.pwned=7">raw</a>']:
        assert shown in done["text"]
    assert set(done["elements"]) <= {"p", "strong", "em", "code", "pre", "ul", "ol", "li", "a", "br"}


# What the renderer builds for each input, as HTML (the test serialises the DOM it built).
RENDERED = [
    ("# Title #\n\nline 1\nline 2", "<h1>Title</h1><p>line 1<br>line 2</p>"),
    ("~~~\n<b>x</b>\n~~~", "<pre><code>&lt;b&gt;x&lt;/b&gt;</code></pre>"),
    ("```js\nstill streaming", '<pre><code class="language-js">still streaming</code></pre>'),
    ("``` x\" onload=\"y\n1\n```", "<pre><code>1</code></pre>"),
    ("- a\n- b\n  - c\n- d", "<ul><li>a</li><li>b<ul><li>c</li></ul></li><li>d</li></ul>"),
    ("3. x\n4. y", '<ol start="3"><li>x</li><li>y</li></ol>'),
    ("1. a\n\n2. b", "<ol><li><p>a</p></li><li><p>b</p></li></ol>"),
    ("Steps:\n1. one\n   ```sh\n   ls\n   ```\n2. two",
     '<p>Steps:</p><ol><li>one<pre><code class="language-sh">ls</code></pre></li><li>two</li></ol>'),
    ("> quoted\n> more\n\n---", "<blockquote><p>quoted<br>more</p></blockquote><hr>"),
    ("| a | b |\n|:--|--:|\n| 1 | **2** |",
     '<div class="table"><table><thead><tr><th style="text-align: left;">a</th>'
     '<th style="text-align: right;">b</th></tr></thead><tbody><tr><td style="text-align: left;">1</td>'
     '<td style="text-align: right;"><strong>2</strong></td></tr></tbody></table></div>'),
    ("***both*** a*b*c __init__ snake_case_name 2 * 3 * 4 ~~gone~~ ~5",
     "<p><strong><em>both</em></strong> a<em>b</em>c <strong>init</strong> snake_case_name 2 * 3 * 4 "
     "<del>gone</del> ~5</p>"),
    ("unclosed **bold and `code", "<p>unclosed **bold and `code</p>"),
    ("`` a ` b `` \\*not em\\*", "<p><code>a ` b</code> *not em*</p>"),
    ("<https://a.example/x> https://b.example/y). <me@a.example>",
     '<p><a href="https://a.example/x" target="_blank" rel="noopener noreferrer">https://a.example/x</a> '
     '<a href="https://b.example/y" target="_blank" rel="noopener noreferrer">https://b.example/y</a>). '
     '<a href="mailto:me@a.example" target="_blank" rel="noopener noreferrer">me@a.example</a></p>'),
    ("[a](java\tscript:x) [b](data:text/html,x) [c](//evil.example) [d](/relative) [e](vbscript:x)",
     "<p>[a](java\tscript:x) [b](data:text/html,x) [c](//evil.example) [d](/relative) [e](vbscript:x)</p>"),
    ("[**x**](https://a.example/p_(q)) [y](<https://a.example/s t> \"title\")",
     '<p><a href="https://a.example/p_(q)" target="_blank" rel="noopener noreferrer"><strong>x</strong></a> '
     '<a href="https://a.example/s%20t" target="_blank" rel="noopener noreferrer">y</a></p>'),
    ("<script>alert(1)</script>\n<img src=x onerror=alert(1)>",
     "<p>&lt;script&gt;alert(1)&lt;/script&gt;<br>&lt;img src=x onerror=alert(1)&gt;</p>"),
]


async def test_markdown_renderer_builds_only_safe_elements(tmp_path: Path) -> None:
    async with open_atlas(tmp_path, users={"alice": None}) as server:

        def steps(page: Any) -> dict[str, Any]:
            render = "(text) => { const node = document.createElement('div'); " \
                     "AtlasMarkdown.renderInto(node, text); return node.innerHTML; }"
            built = [page.evaluate(render, text) for text, _ in RENDERED]
            # Hostile shapes stay linear: each would take many seconds if the parser backtracked.
            timing = page.evaluate("""() => ['*', '_', '[', '`a', '**a', '[a](', '> ', '- ', '# ', '<a@b.c']
                .map((piece) => {
                    const text = piece.repeat(Math.ceil(60000 / piece.length));
                    const start = performance.now();
                    AtlasMarkdown.render(text);
                    return [piece, performance.now() - start];
                })""")
            return {"built": built, "timing": timing}

        facts = await in_browser(server.url + "/", steps)
    for (text, expected), built in zip(RENDERED, facts["built"], strict=True):
        assert built == expected, text
    slow = [(piece, ms) for piece, ms in facts["timing"] if ms > 1500]
    assert not slow, slow
