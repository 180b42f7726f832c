"""The Gradio chat page in a real headless Chromium, against the real vLLM server on the demo model."""

import shutil

import pytest

from tinyllm_vllm.client import openai_client
from tinyllm_vllm.model.demo import corpus_answers
from tinyllm_vllm.runtime.deploy import Router
from tinyllm_vllm.runtime.procs import group_members

pytestmark = pytest.mark.vllm

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# as root in a container, with no network: no sandbox, no GPU, none of Chromium's background connections
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# every text the bot's message shows while it streams, recorded in the page as it changes
RECORD = """() => {
  window.seen = [];
  new MutationObserver(() => {
    const bots = document.querySelectorAll('[data-testid="bot"]');
    if (bots.length) window.seen.push(bots[bots.length - 1].innerText);
  }).observe(document.body, {subtree: true, childList: true, characterData: true});
}"""


@pytest.fixture
def page():
    if not CHROMIUM:
        pytest.skip("Chromium not installed (Debian: apt-get install chromium; `make install` does it)")
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is in the dev extra")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield browser.new_page(viewport={"width": 1100, "height": 1000})
        browser.close()


def ask(page, question: str, turn: int, timeout: float = 60) -> str:
    """Type a question, press Enter, and return the bot's answer once it stops changing."""
    import time

    box = page.locator('textarea[data-testid="textbox"]').first  # the message box; the system prompt follows
    box.fill(question)
    box.press("Enter")
    bots = page.locator('[data-testid="bot"]')
    bots.nth(turn - 1).wait_for(timeout=timeout * 1000)
    deadline, last, since = time.monotonic() + timeout, None, time.monotonic()
    while time.monotonic() < deadline:
        text = bots.nth(turn - 1).inner_text()
        if text != last:
            last, since = text, time.monotonic()
        elif text and time.monotonic() - since > 1.5:
            return text
        time.sleep(0.1)
    raise AssertionError(f"no settled answer to {question!r} within {timeout} s (last: {last!r})")


def test_chat_in_a_browser(page, demo_server, tmp_path):
    """Two turns, streamed, in a real browser; then the endpoint the page talks to goes away. The endpoint is
    vllm-router over the shared demo server, so that stopping it (as a stopped `serve` would) leaves the
    server to the other tests."""
    from tinyllm_vllm.chat_ui import launch

    endpoint = Router([demo_server.url], log_file=tmp_path / "router.log", echo=None).start()
    ui = launch(openai_client(endpoint.base_url), demo_server.served_model_name)
    try:
        page.goto(ui.url)
        page.evaluate(RECORD)
        first = ask(page, "请介绍一下北京", 1)
        # the streamed answer equals the non-streamed greedy answer, and it arrived in pieces
        plain = (
            demo_server.openai_client()
            .chat.completions.create(
                model=demo_server.served_model_name,
                messages=[{"role": "user", "content": "请介绍一下北京"}],
                max_tokens=128,
                temperature=0,
            )
            .choices[0]
            .message.content
        )
        assert first == plain == corpus_answers()["请介绍一下北京"]
        seen = [t for t in page.evaluate("window.seen") if t]
        assert len(set(seen)) > 1 and all(plain.startswith(t.strip()) for t in seen), seen[:5]
        # a second turn: the history stays on the page, and the answer is the second question's
        second = ask(page, "世界上最大的动物是什么？", 2)
        assert second == corpus_answers()["世界上最大的动物是什么？"]
        # both questions stay in the chat. Each bubble is read by its accessible label, the text a screen
        # reader gives: Gradio's markdown can leave a bubble's visible text empty for a moment (once, in a
        # loaded run, for longer than 10 s) while it redraws the chat on the next turn
        users = page.locator('[data-testid="user"]')
        from playwright.sync_api import expect  # the page fixture has skipped the test if it is missing

        expect(users).to_have_count(2)
        for i, question in enumerate(["请介绍一下北京", "世界上最大的动物是什么？"]):
            expect(users.nth(i)).to_have_attribute("aria-label", f"user's message: {question}")
        page.screenshot(path=str(tmp_path / "chat.png"), full_page=True)
        # the endpoint goes away: the page says so in the chat, no traceback
        endpoint.stop()
        third = ask(page, "你好", 3)
        assert "is not answering" in third and "Traceback" not in page.content()
    finally:
        ui.close()
        endpoint.stop()
    assert not group_members(endpoint.proc.pid)
