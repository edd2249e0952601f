"""A person's path through the page in headless Debian Chromium (Playwright): type, generate, see an
image. The screenshot is kept in test-artifacts/ ."""
import shutil
from pathlib import Path

import pytest

from tests.test_ui import free_port
from ui import build_demo, launch_kwargs, queue
from ui.services import Services

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium is not installed (make test installs it as root)")


def test_type_prompt_generate_and_see_image(tiny_sd, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    services = Services(outputs=tmp_path / "outputs", default_model=str(tiny_sd), extra_models=[str(tiny_sd)],
                        notice="test notice")
    demo = build_demo(services)
    port = free_port()
    queue(demo).launch(**launch_kwargs(services, port=port), prevent_thread_lock=True, quiet=True)
    ARTIFACTS.mkdir(exist_ok=True)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(f"http://127.0.0.1:{port}/", wait_until="networkidle")
            expect(page.locator("#notice")).to_contain_text("test notice")
            prompt = page.locator("#prompt textarea")
            prompt.fill("a blue square above a red circle")
            page.locator("#generate-btn").click()
            image = page.locator("#gallery img").first
            expect(image).to_be_visible(timeout=60_000)
            expect(page.locator("#timing")).to_contain_text("images/s", timeout=30_000)
            page.screenshot(path=str(ARTIFACTS / "browser-generate.png"), full_page=True)
            assert list(services.outputs.glob("*.png")), "the image was not written to outputs/"
            browser.close()
    finally:
        demo.close()
