"""The pages opened in a real browser (headless Chromium, driven by Playwright): every figure is drawn with no
console error, every panel holds marks, hovering a mark names its layer (or run), tables sort, and the page asks
for nothing but itself. Screenshots of each page and figure go to the test's folder (``tmp_path``).

Skipped, saying why, where Playwright or a Chromium is missing (see :mod:`pages`); deselect with
``-m 'not browser'``.
"""

from __future__ import annotations

import pytest
from pages import PANEL_MARKS, chromium_path, hover, open_page, sweep_report
from probe_frames import shared_report

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (pip install playwright)")
    executable = chromium_path()
    with sync_api.sync_playwright() as p:
        if executable is None:
            try:
                executable = p.chromium.executable_path  # Playwright's own, if `playwright install` put one there
            except Exception:  # noqa: BLE001 - no browser of its own: skip below
                executable = None
            from pathlib import Path

            if not executable or not Path(executable).exists():
                pytest.skip("no Chromium found (looked at $INITSCOPE_CHROMIUM, chromium, chromium-browser, "
                            "google-chrome on the PATH, Playwright's own); `apt-get install -y chromium` installs one")
        b = p.chromium.launch(executable_path=executable)
        yield b
        b.close()


def screenshots(opened, folder, name):
    """The whole page, and each interactive figure on its own, as PNGs in ``folder``."""
    page = opened.page
    page.mouse.move(0, 0)  # no hover box in the pictures
    page.screenshot(path=folder / f"{name}.png", full_page=True)
    for fig_id in page.eval_on_selector_all("figure.interactive", "els => els.map(e => e.id)"):
        page.locator(f"#{fig_id}").screenshot(path=folder / f"{name}-{fig_id}.png")
    return sorted(p.name for p in folder.glob(f"{name}*.png"))


def assert_clean(opened, path):
    assert opened.errors == []
    assert opened.requests == [path.resolve().as_uri()]  # nothing fetched: not a script, a font, an image
    assert opened.page.evaluate("document.documentElement.dataset.figures") == "drawn"


def test_compare_page_in_chromium(browser, tmp_path):
    report = shared_report()  # tiny_cnn, xavier / kaiming-forward / asv-backward, shared with test_report
    opened = open_page(browser, report.index)
    page = opened.page
    assert_clean(opened, report.index)

    # every panel of every figure holds marks: the depth plot's two, the boxes' three, a histogram per method
    marks = page.evaluate(PANEL_MARKS)
    assert sorted(marks) == ["fig-boxes", "fig-depth", "fig-histograms_activation", "fig-histograms_output_grad"]
    assert [len(marks[f]) for f in ("fig-depth", "fig-boxes", "fig-histograms_activation")] == [2, 3, 3]
    assert all(n > 0 for per in marks.values() for n in per.values()), marks

    # hover: a layer's name and its numbers
    layers = [layer.name for layer in report.plans["xavier"].layers]
    text = hover(opened, "fig-depth", "measured-forward", 1)
    assert f"{layers[1]} · weight layer 1" in text and "measured" in text and "log2 ratio" in text
    text = hover(opened, "fig-boxes", "box")
    assert f"{layers[0]} · #" in text and "median" in text

    # the histograms: another layer chosen from the list redraws every method's panel for it
    fig = page.locator("#fig-histograms_activation")
    options = fig.locator("select option").all_text_contents()
    fig.locator("select").select_option(index=0)
    page.wait_for_function("document.querySelector('#fig-histograms_activation .gtitle').textContent.endsWith("
                           f"{options[0].split(': ', 1)[1]!r})")
    assert all(n > 0 for n in page.evaluate(PANEL_MARKS)["fig-histograms_activation"].values())
    first = options[0].split(": ", 1)[1]
    assert first in hover(opened, "fig-histograms_activation", "hist|kaiming-forward", 3)

    # a table sorts by a click on its head: the check table's forward ratio, ascending
    table = page.locator("#check details").first.locator("table")
    table.locator("th", has_text="ratio").first.click()
    ratios = [float(t) for t in table.locator("tbody tr td:nth-child(6)").all_text_contents()]
    assert ratios == sorted(ratios) and len(ratios) == len(layers)

    # the static figures (closed by default) decoded at the PNGs' own sizes
    from initscope.compare.html import png_size

    sizes = page.evaluate("Array.from(document.images).map(im => [im.complete, im.naturalWidth, im.naturalHeight])")
    assert sizes == [[True, *png_size(png.read_bytes())] for png, _svg in report.figures.values()]

    shots = screenshots(opened, tmp_path, "compare")
    assert "compare.png" in shots and len(shots) == 1 + len(marks)
    assert opened.errors == []


def test_sweep_report_page_in_chromium(browser, tmp_path):
    rep = sweep_report(tmp_path)
    index = rep.out_dir / "report.html"
    opened = open_page(browser, index)
    page = opened.page
    assert_clean(opened, index)

    marks = page.evaluate(PANEL_MARKS)
    assert len(marks) == 5  # the curves, the probe's depth plot, its box plots and its two histograms
    assert all(per and all(n > 0 for n in per.values()) for per in marks.values()), marks

    # the curves: a point names its run, split and epoch, the accuracy in %
    text = hover(opened, "fig-0", "accuracy|val|xavier", 1)
    assert "xavier" in text and "validation" in text and "epoch 2" in text and "%" in text
    # the probe's depth plot: a layer's name; its backward predictions scaled to the measured output gradient
    text = hover(opened, "fig-1", "measured-backward", 2)
    assert "features.4 · weight layer 2" in text
    assert "× E[g²] measured at the output" in page.locator("#fig-1").text_content()

    # the tables sort
    table = page.locator("table.sortable").nth(1)
    table.locator("thead th").nth(1).click()
    assert table.locator("thead th").nth(1).get_attribute("aria-sort") == "ascending"

    shots = screenshots(opened, tmp_path, "report")
    assert "report.png" in shots and len(shots) == 6
    assert opened.errors == []


def test_conv_bn_relu_page_has_its_activations(browser, tmp_path):
    # Issue 16, item 3: on a Conv -> BatchNorm -> ReLU network (most real CNNs, the second paper's Fig. 6) the
    # activation box plot and histograms were empty. Every panel must hold marks in the browser.
    from torch import nn

    from initscope.compare import compare

    def conv_bn_relu():
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                             nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))

    result = compare(conv_bn_relu, "kaiming-forward,asv-backward", input_shape=(3, 16, 16), batch=8,
                     out_dir=tmp_path / "bn")
    opened = open_page(browser, result.index)
    assert_clean(opened, result.index)
    marks = opened.page.evaluate(PANEL_MARKS)
    assert len(marks["fig-boxes"]) == 3 and all(n > 0 for n in marks["fig-boxes"].values()), marks
    assert len(marks["fig-histograms_activation"]) == 2
    assert all(n > 0 for n in marks["fig-histograms_activation"].values()), marks
    screenshots(opened, tmp_path, "conv-bn-relu")
