"""The README's picture of the chat page: the demo model served on this machine, two questions asked in
headless Chromium (Debian's `chromium`; CJK text needs a font such as Debian's fonts-noto-cjk).

    .venv/bin/python tools/screenshot_chat.py results/chat.png
"""

import sys
import tempfile

from playwright.sync_api import sync_playwright

from tinyllm_vllm.chat_ui import launch
from tinyllm_vllm.model.sources import ensure_model
from tinyllm_vllm.runtime.server import VLLMServer
from tinyllm_vllm.settings import Settings

FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def main(png: str) -> None:
    settings = Settings.from_env(home=tempfile.mkdtemp(), kv_cache_gb=0.5, max_model_len=512)
    model, _ = ensure_model("demo", settings.home)
    with VLLMServer(model, settings=settings, echo=None) as server:
        ui = launch(server.openai_client(), server.served_model_name)
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=FLAGS)
                page = browser.new_page(viewport={"width": 1000, "height": 900})
                page.goto(ui.url)
                for turn, question in enumerate(["请介绍一下北京", "世界上最大的动物是什么？"], 1):
                    box = page.locator('textarea[data-testid="textbox"]').first
                    box.fill(question)
                    box.press("Enter")
                    page.locator('[data-testid="bot"]').nth(turn - 1).wait_for()
                    page.wait_for_timeout(2000)
                page.screenshot(path=png)
                browser.close()
        finally:
            ui.close()


if __name__ == "__main__":
    main(sys.argv[1])
