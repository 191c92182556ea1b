"""Regenerate the screenshots of docs/report.md: each page initscope writes, made by the commands the docs give
and photographed in headless Chromium (Playwright driving the system's chromium; nothing is downloaded).

    .venv/bin/python docs/pages/screenshots.py [--work /tmp/initscope-pages] [--chromium /usr/bin/chromium]

Writes docs/pages/compare.png, sweep-report.png and glorot-he-report.png (1-2 minutes on 2 cores); the
pages themselves stay under --work.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
INITSCOPE = [sys.executable, "-m", "initscope"]

# (name, the commands that make the page, the page, what to photograph: the heading to start at (a CSS selector
# and the start of its text) and the height in pixels, and the figure and trace whose mark to hover so that the
# picture shows a hover box)
PAGES = [
    ("compare",
     [["compare", "--model", "plain34", "--methods", "xavier,kaiming-forward,asv-backward",
       "--input-shape", "3,64,64", "--out", "{work}/compare"]],
     "{work}/compare/index.html", (("h2", "Summary"), 1500), ("fig-depth", "measured-forward", 20)),
    ("sweep-report",
     [["sweep", "--data", "digits", "--model", "plain34", "--methods", "kaiming-forward,asv-backward", "--width", "8",
       "--epochs", "2", "--probe-every", "10", "--db", "{work}/sweep.db", "--out", "{work}/sweep",
       "--report", "{work}/sweep-report", "--threads", "1"]],
     "{work}/sweep-report/report.html", (("h2", "Figures"), 1450), ("fig-1", "measured-backward", 12)),
    ("glorot-he-report",
     [["sweep", "--data", "digits", "--model", "mobilenet_v2,resnet18", "--methods", "xavier,kaiming-forward",
       "--width", "8", "--head", "paper", "--epochs", "1", "--db", "{work}/glorot_he.db", "--out", "{work}/glorot_he",
       "--threads", "1"],
      ["report", "{work}/glorot_he.db", "--out", "{work}/glorot-he-report",
       "--title", "Glorot/He Table 1 at toy scale: digits, 1 epoch"]],
     "{work}/glorot-he-report/report.html", (("h2", "Table 1"), 1250),
     ("fig-1", "accuracy|val|kaiming-forward", 0)),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/initscope-pages"))
    parser.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("google-chrome"))
    parser.add_argument("--only", nargs="*", help="names of the pages to redo (default: all)")
    parser.add_argument("--keep", action="store_true", help="photograph the pages already under --work")
    args = parser.parse_args()
    sys.path.insert(0, str(HERE.parents[1] / "tests"))
    from pages import MARK_CENTRE, open_page  # the browser tests' helpers
    from playwright.sync_api import sync_playwright

    args.work.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.chromium)
        for name, commands, page_path, (start, height), (fig, meta, index) in PAGES:
            if args.only and name not in args.only:
                continue
            for command in commands if not args.keep else ():
                command = [c.format(work=args.work) for c in command]
                print("$ initscope", " ".join(command), flush=True)
                subprocess.run(INITSCOPE + command, check=True, stdout=subprocess.DEVNULL)
            opened = open_page(browser, Path(page_path.format(work=args.work)), width=1200, height=height)
            page = opened.page
            assert not opened.errors, opened.errors
            top = page.evaluate("([tag, text]) => Array.from(document.querySelectorAll(tag)).find(h => "
                                "h.textContent.startsWith(text)).getBoundingClientRect().top + window.scrollY",
                                list(start))
            page.evaluate(f"window.scrollTo(0, {top} - 10)")
            where = page.evaluate(MARK_CENTRE, [fig, meta, index])
            if where is not None and 0 < where[1] < height:
                page.mouse.move(where[0] - 4, where[1])
                page.mouse.move(where[0], where[1])
                page.wait_for_timeout(400)
            out = HERE / f"{name}.png"
            page.screenshot(path=out)
            _shrink(out)
            print(f"wrote {out.relative_to(HERE.parents[1])}")
        browser.close()


def _shrink(path: Path) -> None:
    """256 colours: a page is flat colours and text, and the repository keeps the PNGs."""
    from PIL import Image

    Image.open(path).convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


if __name__ == "__main__":
    main()
