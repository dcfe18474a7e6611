"""Regenerates docs/web-screenshot.png: the web page with a real result, in headless Chromium.

    .venv/bin/python benchmarks/screenshot.py                       # the shipped three-class model
    .venv/bin/python benchmarks/screenshot.py --checkpoint runs/x/model --out /tmp/page.png

Needs /usr/bin/chromium (scripts/install-browser.sh) and the playwright package; starts the server
on a free loopback port in this process, uploads one example X-ray and saves the page.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from playwright.sync_api import expect, sync_playwright

from pneumoscope.runtime.classifier import Classifier
from pneumoscope.serve import create_app, serve_in_thread

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="default: the shipped model for --task")
    parser.add_argument("--task", choices=("three", "binary"), default="three")
    parser.add_argument("--image", default=str(ROOT / "examples" / "PNEUMONIA" / "person267_bacteria_1250.jpeg"))
    parser.add_argument("--out", default=str(ROOT / "docs" / "web-screenshot.png"))
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args()

    app = create_app(Classifier.load(args.checkpoint, task=args.task))
    with serve_in_thread(app) as url, sync_playwright() as playwright:
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
