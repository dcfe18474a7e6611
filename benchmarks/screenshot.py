"""Regenerates docs/web-screenshot.png: the web page with a real result, in headless Chromium.

    .venv/bin/python benchmarks/screenshot.py                       # the shipped three-class model
    .venv/bin/python benchmarks/screenshot.py --model runs/x/model --out /tmp/page.png

Needs /usr/bin/chromium (scripts/install-browser.sh) and the playwright package; starts the server
on a free loopback port in this process, uploads one example X-ray and saves the page.
"""
from __future__ import annotations

from playwright.sync_api import expect, sync_playwright

import pneumoscope
from common import ROOT, add_model, parser
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def main() -> None:
    options = parser(__doc__)
    add_model(options, default="the shipped model for --task")
    options.add_argument("--task", choices=("three", "binary"), default="three")
    options.add_argument("--image", default=str(ROOT / "examples" / "PNEUMONIA" / "person267_bacteria_1250.jpeg"))
    options.add_argument("--out", default=str(ROOT / "docs" / "web-screenshot.png"))
    options.add_argument("--chromium", default="/usr/bin/chromium")
    args = options.parse_args()

    app = pneumoscope.create_app(pneumoscope.Classifier.load(args.model, task=args.task))
    with pneumoscope.serve_in_thread(app) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1100, "height": 860})
        page.goto(url)
        page.set_input_files("#file", args.image)
        expect(page.locator("#result")).to_be_visible(timeout=120_000)
        page.wait_for_function("() => document.getElementById('cam').naturalWidth > 0")
        page.screenshot(path=args.out, full_page=True)
        browser.close()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
