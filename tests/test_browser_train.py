"""The Train tab in headless Debian Chromium (Playwright): start a short DMD2 job on the tiny teacher from
the page, watch the progress bar move and the first sample grid appear, then try the latest checkpoint
in the playground while the job trains. A screenshot is kept in test-artifacts/."""
from __future__ import annotations

import time

import pytest

from tests.serving import free_port
from tests.test_browser import ARTIFACTS, CHROMIUM, FLAGS
from ui import build_demo, launch_kwargs, queue
from ui.services import Services

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium is not installed (make test installs it as root)")


@pytest.fixture
def train_page(tiny_sd, tiny_student, tmp_path, monkeypatch):
    from playwright.sync_api import sync_playwright

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    services = Services(outputs=tmp_path / "outputs", default_model=str(tiny_student),
                        extra_models=[str(tiny_student)], runs=tmp_path / "runs")
    demo = build_demo(services)
    port = free_port()
    queue(demo).launch(**launch_kwargs(services, port=port), prevent_thread_lock=True, quiet=True)
    ARTIFACTS.mkdir(exist_ok=True)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
            page = browser.new_page(viewport={"width": 1280, "height": 1400})
            page.goto(f"http://127.0.0.1:{port}/", wait_until="domcontentloaded", timeout=120_000)
            page.get_by_role("tab", name="Train").click()
            page.locator("#train-start").wait_for(timeout=120_000)
            yield page, services
            browser.close()
    finally:
        jobs = services.job_manager()
        for job in jobs.list():  # never leave a training process behind
            if job.status in ("running", "queued"):
                jobs.cancel(job.id)
                jobs.wait(job.id, timeout=60)
        jobs.close()
        demo.close()


def _step(page) -> int:
    value = page.locator("#train-progress-bar").get_attribute("data-step", timeout=30_000)
    return int(value or 0)


def test_start_a_job_see_progress_and_a_sample(train_page, tiny_sd):
    from playwright.sync_api import expect

    page, services = train_page
    base = page.locator("#train-base input")
    base.fill(str(tiny_sd))
    base.press("Enter")
    page.locator("#train-steps input").fill("400")
    page.locator("#train-batch input").fill("1")
    page.locator("#train-settings textarea").fill(
        "height=64\nwidth=64\nsave_every=10\nlog_every=1\neval_images=2\nwarmup=1")
    page.locator("#train-name textarea").fill("from-the-page")
    page.locator("#train-start").click()
    expect(page.locator("#train-message")).to_contain_text("started", timeout=60_000)

    # the bar moves: its step goes up between two timer ticks
    deadline = time.time() + 120
    while _step(page) < 2:
        assert time.time() < deadline, "the progress bar never moved"
        page.wait_for_timeout(500)
    first = _step(page)
    expect(page.locator("#train-progress")).to_contain_text("ETA", timeout=30_000)
    while _step(page) <= first:
        assert time.time() < deadline, "the progress bar stopped"
        page.wait_for_timeout(500)
    # the first checkpoint (step 10) comes with a sample grid
    expect(page.locator("#train-sample img")).to_be_visible(timeout=120_000)
    job = services.job_manager().get("from-the-page")
    assert job.status == "running" and job.method == "dmd2"
    expect(page.locator("#train-history")).to_contain_text("from-the-page")

    # try the latest checkpoint while the job keeps training
    page.locator("#train-try").click()
    expect(page.locator("#train-play-image img")).to_be_visible(timeout=120_000)
    expect(page.locator("#train-play-note")).to_contain_text("the job keeps training")
    assert any("from-the-page/export/step-" in m for m in services.extra_models)
    page.screenshot(path=str(ARTIFACTS / "browser-train.png"), full_page=True)

    page.locator("#train-cancel").click()
    expect(page.locator("#train-progress-bar")).to_have_attribute("data-status", "cancelled", timeout=120_000)
