"""The playground page in a real headless browser (Debian's chromium driven by Playwright).

Load the page, move a slider, send a question, see the answer stream in; then the side-by-side mode
with two steering settings. Set-up: scripts/install_browser.sh; the test skips, saying why, where
chromium or playwright are missing.
"""

from __future__ import annotations

import json
import shutil

import pytest
from serve_support import LONG_ANSWER, QUESTION, SHORT_ANSWER, start_server, steerable_model_dir

pytestmark = [pytest.mark.browser, pytest.mark.ray]
TOKEN = "browser-test-token"
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-dev-shm-usage"]


def chromium_path() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("chromium is not installed (run scripts/install_browser.sh)")
    return path


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed "
                                                                 "(run scripts/install_browser.sh)")
    executable = chromium_path()
    with sync_api.sync_playwright() as playwright:
        try:
            browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, headless=True)
        except Exception as err:  # noqa: BLE001 - a browser that cannot start is an environment problem
            pytest.skip(f"chromium at {executable} did not start under Playwright: {err}")
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def url(ray_session, browser):
    from ray import serve

    yield start_server(steerable_model_dir(), token=TOKEN, app_name="test-playground")
    serve.shutdown()


def test_playground_streams_steered_answers_single_and_side_by_side(browser, url):
    page = browser.new_page()
    sent: list[dict] = []
    page.on("request", lambda r: sent.append(json.loads(r.post_data)) if r.url.endswith("/v1/chat/completions") else None)
    page.goto(url + "/")
    page.wait_for_selector("body[data-ready=true]", timeout=30_000)
    assert page.locator("#steer-A input[type=range]").count() == 9
    page.fill("#token", TOKEN)

    # Move verbosity A from its default 4 to 0 with the keyboard, as a person would.
    slider = page.locator("#A-verbosity")
    assert slider.input_value() == "4"
    slider.focus()
    page.keyboard.press("Home")
    assert slider.input_value() == "0"
    assert "verbosity:0" in page.locator("#steer-A .label-line").inner_text()

    page.fill("#prompt", QUESTION)
    page.click("#send")
    answer_a = page.locator("#transcript-A .msg.assistant").last
    page.wait_for_function("el => el.dataset.finish === 'stop'", arg=answer_a.element_handle(), timeout=60_000)
    assert answer_a.inner_text() == SHORT_ANSWER
    assert sent[-1]["steering"]["verbosity"] == 0 and sent[-1]["stream"] is True

    # Side by side: A keeps verbosity 0, B stays at the defaults; both answers stream at once.
    page.check("#side-by-side")
    assert page.locator("#steer-B").is_visible() and page.locator("#transcript-B").is_visible()
    page.fill("#prompt", QUESTION)
    page.click("#send")
    answer_a = page.locator("#transcript-A .msg.assistant").last
    answer_b = page.locator("#transcript-B .msg.assistant").last
    for answer in (answer_a, answer_b):
        page.wait_for_function("el => el.dataset.finish === 'stop'", arg=answer.element_handle(), timeout=60_000)
    assert answer_a.inner_text() == SHORT_ANSWER
    assert answer_b.inner_text() == LONG_ANSWER
    assert int(answer_b.get_attribute("data-chunks")) >= 10  # arrived token by token
    assert sorted(body["steering"]["verbosity"] for body in sent[-2:]) == [0, 4]
    assert "error" not in page.locator("#status").inner_text()
    page.close()
