"""Helpers for the tests of the HTML pages: their markup apart from their scripts, the figures' JSON, a results
store to render, and the pages opened in headless Chromium through Playwright.

The browser is the system's Chromium (or one Playwright installed): ``INITSCOPE_CHROMIUM`` names one, else the
first of ``chromium``, ``chromium-browser``, ``google-chrome``, ``google-chrome-stable`` on the PATH, else
Playwright's own if ``playwright install chromium`` was run. Nothing is downloaded here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


# -- the page as text ---------------------------------------------------------------------------------------


def outside_scripts(page: str) -> str:
    """The page's markup without its script elements (plotly.js, the page's script, the figures' JSON)."""
    return re.sub(r"<script\b[^>]*>.*?</script>", "", page, flags=re.S)


def specs(page: str) -> list[dict]:
    """The interactive figures' Plotly specifications, in the page's order."""
    return [json.loads(m) for m in re.findall(r'<script type="application/json" id="[^"]*">(.*?)</script>', page,
                                              flags=re.S)]


def strings(value):
    """Every string inside a JSON value."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from strings(v)


# -- a results store with curves and probes -----------------------------------------------------------------


def sweep_report(tmp_path: Path, *, epochs: int = 4, title: str = "a sweep"):
    """``initscope report`` on a store of two finished runs (xavier, asv-backward) with ``epochs`` epochs of
    history, test metrics and a probe at initialization each: the sweep report page, with curves and the
    four probe figures (depth, boxes, two histograms)."""
    from probe_frames import make_frame

    from initscope.experiments.store import Store
    from initscope.experiments.tables.results import write_report

    db = tmp_path / "sweep.db"
    with Store(db) as s:
        for i, method in enumerate(("xavier", "asv-backward")):
            run_id = f"run-{method}"
            run_dir = tmp_path / "runs" / run_id
            run_dir.mkdir(parents=True)
            make_frame(methods=(method,)).drop(columns=["method"]).assign(step=0).to_parquet(run_dir / "probe.parquet")
            s.claim(run_id, {"data": "digits", "model": "plain34", "method": method, "optimizer": "adam", "lr": 1e-3,
                             "seed": 0, "epochs": epochs, "width": 8, "probe_every": 10})
            s.set_run_dir(run_id, run_dir)
            history = [{"epoch": e, "train_loss": 2.0 / e, "train_accuracy": 0.3 + 0.1 * e + 0.05 * i,
                        "val_loss": 2.2 / e, "val_accuracy": 0.25 + 0.1 * e + 0.05 * i, "lr": 1e-3, "seconds": 1.0}
                       for e in range(1, epochs + 1)]
            s.finish(SimpleNamespace(run_id=run_id, status="finished", history=history, best_epoch=epochs,
                                     test={"accuracy": 0.6 + 0.1 * i, "precision": 0.6, "recall": 0.55, "f1": 0.57,
                                           "loss": 1.2}, diverged_epoch=None, error=None, checkpoint=None))
    return write_report(db, tmp_path / "report", title=title)


# -- the browser ---------------------------------------------------------------------------------------------


def chromium_path() -> str | None:
    """A Chromium to drive: ``INITSCOPE_CHROMIUM``, else one on the PATH (None: Playwright's own, if any)."""
    named = os.environ.get("INITSCOPE_CHROMIUM")
    if named:
        return named
    return next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)


@dataclass
class Opened:
    """One page opened in the browser, with what it logged and asked for since it started loading."""

    page: object  # playwright.sync_api.Page
    errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)


def open_page(browser, path: Path, *, width: int = 1400, height: int = 1000) -> Opened:
    """Load ``path`` in a fresh tab and wait until its figures are drawn (or failed to draw). Console errors
    and warnings, uncaught exceptions and failed loads go to ``errors``; every URL asked for to ``requests``."""
    context = browser.new_context(viewport={"width": width, "height": height})
    page = context.new_page()
    opened = Opened(page)
    page.on("console", lambda m: opened.errors.append(f"console.{m.type}: {m.text}")
            if m.type in ("error", "warning", "assert") else None)
    page.on("pageerror", lambda e: opened.errors.append(f"uncaught: {e}"))
    page.on("requestfailed", lambda r: opened.errors.append(f"failed to load {r.url}: {r.failure}"))
    page.on("request", lambda r: opened.requests.append(r.url))
    page.goto(Path(path).resolve().as_uri(), wait_until="load")
    page.wait_for_function("!document.querySelector('div.plot') || "
                           "['drawn', 'failed'].includes(document.documentElement.getAttribute('data-figures'))",
                           timeout=60_000)
    return opened


# Per figure (its element's id): per subplot of the figure, how many marks (paths with a non-zero size) it holds.
PANEL_MARKS = """() => Object.fromEntries(Array.from(document.querySelectorAll("figure.interactive")).map(fig => {
  const div = fig.querySelector("div.plot");
  const ids = (div._fullLayout && div._fullLayout._subplots.cartesian) || [];
  const marks = Object.fromEntries(ids.map(id => {
    // a subplot's traces: under its own "plot" group, or (axes that overlay or match others) its "overplot"
    const plot = div.querySelector(".cartesianlayer .overplot > g." + id + ", .cartesianlayer .subplot." + id +
                                   " > g.plot");
    const paths = plot ? Array.from(plot.querySelectorAll("path")).filter(p => {
      const b = p.getBBox(); return b.width > 0 || b.height > 0; }) : [];
    return [id, paths.length];
  }));
  return [fig.id, marks];
}))"""

# The centre, in the viewport's pixels, of the visible part of a drawn mark (a bar or a marker; the first from
# ``index`` on that shows) of the trace whose ``meta`` is given, in the figure with the given id. Visible: within
# the trace's plot area (a bar on a log axis starts far below it, clipped).
MARK_CENTRE = """([figId, meta, index]) => {
  const div = document.querySelector("#" + figId + " div.plot");
  const trace = Array.from(div.querySelectorAll("g.trace")).find(
    g => g.__data__ && g.__data__[0] && g.__data__[0].trace && g.__data__[0].trace.meta === meta);
  if (!trace) { return null; }
  const t = trace.__data__[0].trace;
  const area = div.querySelector(".draglayer ." + (t.xaxis || "x") + (t.yaxis || "y") + " .nsewdrag")
    .getBoundingClientRect();
  for (const mark of Array.from(trace.querySelectorAll("path.point, g.point > path")).slice(index)) {
    const b = mark.getBoundingClientRect();
    const x0 = Math.max(b.left, area.left), x1 = Math.min(b.right, area.right);
    const y0 = Math.max(b.top, area.top), y1 = Math.min(b.bottom, area.bottom);
    if (x1 > x0 && y1 > y0) { return [(x0 + x1) / 2, (y0 + y1) / 2]; }
  }
  return null;
}"""

HOVER_TEXT = """(figId) => Array.from(document.querySelectorAll("#" + figId + " .hoverlayer .hovertext"))
  .map(g => g.textContent).join(" | ")"""


def hover(opened: Opened, fig_id: str, meta: str, index: int = 0) -> str:
    """Move the mouse onto a mark of a trace (by its ``meta``) as a user would, and return the hover box's text."""
    page = opened.page
    page.evaluate("(id) => document.querySelector('#' + id + ' div.plot').scrollIntoView({block: 'center'})", fig_id)
    where = page.evaluate(MARK_CENTRE, [fig_id, meta, index])
    assert where is not None, f"no drawn mark of {meta!r} in #{fig_id}"
    page.mouse.move(where[0] - 4, where[1])
    page.mouse.move(where[0], where[1])
    page.wait_for_function(f"({HOVER_TEXT})({json.dumps(fig_id)}).length > 0", timeout=5_000)
    return page.evaluate(HOVER_TEXT, fig_id)
