"""The report opened in a real browser (headless Chromium): every figure loads, with a non-zero size,
and nothing but the page itself is fetched.

The check runs on a copy of index.html with one inline script appended: after the window's load
event it writes, for each <img>, ``complete``, ``naturalWidth/Height`` and the laid-out size into
a <pre>, together with every resource the page requested; ``--dump-dom`` prints the DOM after load.
The report itself carries no script.
"""

import json
import os
import re
import shutil
import subprocess

import pytest
from probe_frames import shared_report

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
BROWSER = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
pytestmark = pytest.mark.skipif(
    BROWSER is None,
    reason="no Chromium binary on PATH (looked for chromium, chromium-browser, google-chrome); "
           "`apt-get install -y chromium` installs it",
)

CHECK = """<script>
window.addEventListener("load", function () {
  var images = Array.from(document.images).map(function (im) {
    var box = im.getBoundingClientRect();
    return {alt: im.alt, complete: im.complete, naturalWidth: im.naturalWidth, naturalHeight: im.naturalHeight,
            width: box.width, height: box.height};
  });
  var fetched = performance.getEntriesByType("resource").map(function (r) { return r.name; });
  var pre = document.createElement("pre");
  pre.id = "initscope-check";
  pre.textContent = JSON.stringify({images: images, fetched: fetched, title: document.title});
  document.body.appendChild(pre);
});
</script>"""


def open_in_browser(page_path, tmp_path):
    """Load ``page_path`` (a file:// URL) in headless Chromium; return what the check script saw."""
    env = dict(os.environ, HOME=str(tmp_path))  # a throwaway profile, nothing written to the real home
    cmd = [BROWSER, "--headless=new", "--disable-gpu", "--no-sandbox", "--no-first-run",
           f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000",
           "--window-size=1400,1000", "--dump-dom", page_path.as_uri()]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    found = re.search(r'<pre id="initscope-check">(.*?)</pre>', done.stdout, re.S)
    assert found, f"the check script left no result (exit {done.returncode}); stderr tail:\n{done.stderr[-2000:]}"
    text = found.group(1).replace("&quot;", '"').replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")
    return json.loads(text)


@pytest.fixture(scope="module")
def report():
    return shared_report()  # made by initscope.compare.compare on a small CNN, shared with test_report


def test_every_figure_loads_in_chromium(report, tmp_path):
    page = report.index.read_text(encoding="utf-8")
    assert "<script" not in page
    checked = tmp_path / "index-check.html"
    checked.write_text(page.replace("</body>", CHECK + "</body>"), encoding="utf-8")
    seen = open_in_browser(checked, tmp_path)
    assert seen["title"].startswith("initscope")
    assert len(seen["images"]) == len(report.figures) > 0
    for im in seen["images"]:
        assert im["complete"], im["alt"]
        assert im["naturalWidth"] > 0 and im["naturalHeight"] > 0, im
        assert im["width"] > 0 and im["height"] > 0, im
    # the PNGs as written: their pixel sizes are what the browser decoded
    from initscope.compare.html import png_size

    sizes = [png_size(png.read_bytes()) for png, _ in report.figures.values()]
    assert [(im["naturalWidth"], im["naturalHeight"]) for im in seen["images"]] == sizes
    assert [u for u in seen["fetched"] if not u.startswith("data:")] == []


def test_a_broken_image_is_caught(report, tmp_path):
    # The check must be able to fail: a page whose figure is not a decodable PNG.
    page = report.index.read_text(encoding="utf-8")
    broken = re.sub(r'src="data:image/png;base64,[^"]{40}', 'src="data:image/png;base64,AAAA', page, count=1)
    checked = tmp_path / "broken.html"
    checked.write_text(broken.replace("</body>", CHECK + "</body>"), encoding="utf-8")
    seen = open_in_browser(checked, tmp_path)
    assert seen["images"][0]["naturalWidth"] == 0
    assert all(im["naturalWidth"] > 0 for im in seen["images"][1:])
