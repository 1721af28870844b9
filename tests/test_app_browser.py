"""The demo in a real browser: headless Chromium clicks an example and sees a generated image in the chat.

Chromium comes from the system (Debian package `chromium`, or the binary named by `$MMGEN_CHROMIUM`);
Playwright only drives it and downloads no browser. The screenshot goes to pytest's tmp dir, and also to `$MMGEN_SCREENSHOT` when that is set.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("MMGEN_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
if not CHROMIUM or not Path(CHROMIUM).is_file():
    pytest.skip("chromium is not installed (apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")

from mmgen.app.chat import GenerationSettings  # noqa: E402
from mmgen.app.example_prompts import EXAMPLES  # noqa: E402
from mmgen.app.testing import tiny_random_pipeline  # noqa: E402

from .conftest import running_demo  # noqa: E402

CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
FAST = GenerationSettings(max_new_tokens=24, num_inference_steps=4, max_images=2)


@pytest.fixture(scope="module")
def server_url():
    with running_demo(tiny_random_pipeline(), defaults=FAST) as demo:
        yield demo.local_url


@pytest.fixture(scope="module")
def page():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 900})
            yield context.new_page()
        finally:
            browser.close()


def test_clicking_the_story_example_streams_a_generated_image_into_the_chat(server_url, page, tmp_path):
    page.goto(server_url)
    story = next(e for e in EXAMPLES if e.task == "story")
    page.get_by_text(story.label).click()

    # The assistant's bubble of the chat: wait for an image in it that has actually loaded.
    image = page.locator("#mmgen-chat .bot img, #mmgen-chat [data-testid='bot'] img").first
    image.wait_for(state="visible", timeout=120_000)
    page.wait_for_function(
        "el => el.complete && el.naturalWidth > 0", arg=image.element_handle(), timeout=30_000
    )
    page.get_by_text("text tokens/s").wait_for(timeout=120_000)  # the answer has finished

    shot = tmp_path / "demo.png"
    page.screenshot(path=str(shot), full_page=True)
    if os.environ.get("MMGEN_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["MMGEN_SCREENSHOT"])

    assert image.evaluate("el => el.naturalWidth") > 0
    assert page.get_by_text(story.text[:40]).count() >= 1  # the user's turn is shown
    assert shot.stat().st_size > 0
