"""The web page in a real headless Chromium (Debian's /usr/bin/chromium, driven by Playwright) against
a real uvicorn server: upload by the file input and by drag-and-drop, result, heat map, bad file."""
import base64
import re
from pathlib import Path

import pytest
from conftest import EXAMPLES

from pneumoscope import INTENDED_USE
from pneumoscope.serve import create_app, serve_in_thread

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(),
                                reason="no /usr/bin/chromium (install it with scripts/install-browser.sh)")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")


@pytest.fixture(scope="module")
def browser_page(classifier):
    with serve_in_thread(create_app(classifier)) as url, sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.set_default_timeout(60_000)  # a busy 2-core machine (CI shares it)
        sync_api.expect.set_options(timeout=60_000)  # expect() has its own 5 s default
        page.script_errors, page.requested = [], []
        page.on("pageerror", lambda error: page.script_errors.append(error))
        page.on("request", lambda request: page.requested.append(request.url))
        page.goto(url)
        yield page, url, classifier
        browser.close()


def test_upload_shows_label_probabilities_and_heat_map(browser_page, tmp_path):
    page, url, classifier = browser_page
    expect = sync_api.expect
    expect(page.locator("#notice")).to_have_text(INTENDED_USE)
    example = EXAMPLES / "PNEUMONIA" / "person267_bacteria_1250.jpeg"
    page.set_input_files("#file", str(example))
    expect(page.locator("#result")).to_be_visible()
    expect(page.locator("#label")).to_have_text(classifier.predict(example).label)
    expect(page.locator("#probs .bar")).to_have_count(len(classifier.classes))
    expect(page.locator("#xray")).to_be_visible()
    assert page.eval_on_selector("#xray", "img => img.complete && img.naturalWidth") > 0
    cam = page.locator("#cam")
    expect(cam).to_have_attribute("src", re.compile(r"^data:image/png;base64,"))
    expect(cam).to_be_visible()
    page.wait_for_function("() => document.getElementById('cam').naturalWidth > 0")
    page.uncheck("#show-cam")
    expect(cam).to_be_hidden()
    page.check("#show-cam")
    expect(cam).to_be_visible()
    page.screenshot(path=tmp_path / "result.png", full_page=True)
    assert (tmp_path / "result.png").stat().st_size > 10_000
    assert not page.script_errors
    assert all(request.startswith(url) or request.startswith(("data:", "blob:")) for request in page.requested)


def test_drag_and_drop_then_bad_file_shows_error(browser_page):
    page, _, classifier = browser_page
    expect = sync_api.expect
    example = EXAMPLES / "NORMAL" / "IM-0203-0001.jpeg"
    drop = page.evaluate_handle("""([name, b64]) => {
        const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], name, {type: 'image/jpeg'}));
        return transfer; }""", [example.name, base64.b64encode(example.read_bytes()).decode()])
    page.dispatch_event("#drop", "drop", {"dataTransfer": drop})
    expect(page.locator("#label")).to_have_text(classifier.predict(example).label)
    expect(page.locator("#model")).to_contain_text(example.name)

    page.set_input_files("#file", files=[{"name": "notes.txt", "mimeType": "text/plain",
                                          "buffer": b"this is not an X-ray\n"}])
    expect(page.locator("#error")).to_be_visible()
    expect(page.locator("#error")).to_contain_text("notes.txt: not a recognised image format")
    expect(page.locator("#result")).to_be_hidden()
    assert not page.script_errors
