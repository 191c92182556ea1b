"""Compare initializations on one model: probe a fresh copy per method and write the report.

Every method gets its own freshly built model, the same seed for its weights and the same input
batch; each copy is probed once (one forward and one backward pass, loss = Σ output · ξ with fixed
i.i.d. N(0, 1) noise ξ, so the gradient at the output is what the plan's predictions assume). The
tables are concatenated with a ``method`` column, saved, drawn and put on one HTML page.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import pandas as pd
import torch
from torch import nn

from initscope.errors import OutputError
from initscope.fileio import FolderLock, disk_error, fsync_dir
from initscope.methods import METHODS
from initscope.plan import InitPlan

FIGURES = ("boxes", "histograms_activation", "histograms_output_grad", "depth")


@dataclass
class CompareResult:
    """What :func:`compare` wrote, and the numbers behind it.

    Attributes:
        out_dir: the folder.
        index: the HTML page.
        stats: the table (``stats.parquet``, or ``stats.csv`` where Parquet cannot be written).
        figures: figure name -> (PNG, SVG).
        frame: the concatenated probe table, ``method`` first.
        plans: method -> the plan drawn.
        meta: the "what was run" header.
    """

    out_dir: Path
    index: Path
    stats: Path
    figures: dict[str, tuple[Path, Path]]
    frame: pd.DataFrame
    plans: dict[str, InitPlan]
    meta: dict[str, str] = field(default_factory=dict)

    def flagged(self) -> pd.DataFrame:
        """One row per (method, weight layer) whose measurement lies outside the plan's predicted spread."""
        f = self.frame
        return f[f["flagged"].astype(bool)].drop_duplicates(["method", "layer"])[
            ["method", "layer", "kind", "out_ratio", "in_grad_ratio"]]


def parse_methods(methods: str | Sequence[str]) -> list[str]:
    """``"a,b"`` or ``["a", "b"]`` -> checked list; unknown or repeated names raise, listing the valid ones."""
    names = [m.strip() for m in methods.split(",")] if isinstance(methods, str) else [str(m).strip() for m in methods]
    names = [m for m in names if m]
    if not names:
        raise ValueError(f"no method given: use some of {tuple(METHODS)}")
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}: the valid ones are {tuple(METHODS)}")
    repeated = sorted({m for m in names if names.count(m) > 1})
    if repeated:
        raise ValueError(f"method(s) {repeated} listed more than once")
    return names


def _factory(model: str | Callable[[], nn.Module]) -> tuple[Callable[[], nn.Module], str]:
    if isinstance(model, str):
        from initscope.models import create_model

        return (lambda: create_model(model)), model
    if isinstance(model, nn.Module):
        raise TypeError("pass a model name or a function that builds the model, not a built model: "
                        "every method needs a fresh copy")
    if not callable(model):
        raise TypeError(f"model={model!r} is neither a name nor a callable")
    return model, getattr(model, "__qualname__", getattr(model, "__name__", repr(model)))


def _save_table(frame: pd.DataFrame, out_dir: Path) -> Path:
    path = out_dir / "stats.parquet"
    try:
        frame.to_parquet(path, index=False)
        return path
    except (ImportError, ValueError, TypeError, OSError) as exc:  # no pyarrow, or a column it cannot store
        path.unlink(missing_ok=True)
        csv = out_dir / "stats.csv"
        frame.assign(hist_counts=frame["hist_counts"].map(lambda c: json.dumps([int(v) for v in c]))).to_csv(
            csv, index=False)
        (out_dir / "stats.parquet-failed.txt").write_text(f"Parquet could not be written ({exc}); wrote {csv.name}\n")
        return csv


def compare_steps(methods: int, draws: int = 1) -> int:
    """How many times :func:`compare` calls ``progress``: a plan and ``draws`` probes per method, and the
    report (a progress bar's total)."""
    return methods * (1 + draws) + 1


def compare(
    model_name_or_factory: str | Callable[[], nn.Module],
    methods: str | Sequence[str],
    *,
    input_shape: Sequence[int],
    batch: int = 16,
    seed: int = 0,
    data: str | None = None,
    data_root: str | Path | None = None,
    out_dir: str | Path,
    max_hist_layers: int = 8,
    draws: int = 1,
    progress: Callable[[str], None] | None = None,
) -> CompareResult:
    """Probe one freshly initialized copy of the model per method and write ``out_dir/index.html``.

    Args:
        model_name_or_factory: a name for :func:`initscope.models.create_model` (``plain34``,
            ``resnet18-nobn``, a torchvision name, ``module:callable``) or a function building the model.
        methods: names from :data:`initscope.METHODS`, as a list or comma-separated.
        input_shape: one sample's shape, e.g. ``(3, 224, 224)``.
        batch: inputs probed (the same batch for every method).
        seed: seeds the weights of every copy (the same for every method) and the Gaussian batch.
        data: None for i.i.d. N(0, 1) inputs, or a data source of :func:`initscope.experiments.data.load_data`
            (``digits``, ``synthetic``, ``mnist``, ``fashion-mnist``, ``cifar10``, ``cifar100``,
            ``folder:PATH``, or one registered): the first ``batch`` images of its seeded train split, resized to the input
            shape, in [-1, 1]. With real data each plan is made from the batch itself
            (``example_input``), so its predictions are for those inputs.
        data_root: where the torchvision sets lie (``load_data``'s ``root``).
        out_dir: written: ``index.html``, ``stats.parquet`` (or ``.csv``), one PNG and SVG per figure.
        max_hist_layers: histogram grids show at most this many layers, evenly spaced.
        draws: weight draws per method (seeds ``seed``, ``seed + 1``, ...). The measured second moments
            of outputs and input gradients are their geometric means (what a prediction for a typical draw
            is held to), so the plan's draw-to-draw spread, and the band a measurement may stay in
            before it is flagged, shrink by ``sqrt(draws)``; quantiles and histograms are the first draw's.
        progress: called with a description before each step: each method's planning, each of its draws'
            probes, and drawing the report (:func:`compare_steps` of them in all).

    Everything is checked (methods, shape, data source, that the model builds) before anything is written.
    The files are written into a hidden folder inside ``out_dir`` and moved into place together, one
    ``compare`` at a time (a lock on ``out_dir``): two runs into one folder leave the complete output of
    one of them, never a page of one and figures of the other.

    Examples:
        >>> r = compare("plain34", "xavier,kaiming-forward", input_shape=(3, 32, 32), out_dir="report")
        >>> print(r.index)
    """
    import initscope
    from initscope.api import plan as make_plan
    from initscope.probe import probe
    from initscope.compare.inputs import check_source, load_batch

    names = parse_methods(methods)
    shape = tuple(int(s) for s in input_shape)
    if not shape or any(s <= 0 for s in shape):
        raise ValueError(f"input_shape={tuple(input_shape)} must be positive sizes, e.g. (3, 224, 224)")
    if batch < 1:
        raise ValueError(f"batch={batch} must be at least 1")
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise ValueError(f"draws={draws!r} must be a positive integer")
    check_source(data)
    build, model_name = _factory(model_name_or_factory)
    inputs = load_batch(data, shape, batch, seed, root=data_root)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"--out {out_dir} is a file; the report is a folder (index.html, stats.parquet, figures)")

    frames, plans = [], {}
    for method in names:
        if progress:
            progress(f"{method}: planning")
        torch.manual_seed(seed)  # the same construction-time draws for every copy
        model = build()
        # Gaussian inputs are exactly what input_shape stands for; real data is planned from itself, and so
        # is the batch for a method that sets its scale on data (needs_data).
        if inputs.gaussian and not getattr(METHODS[method], "needs_data", False):
            p = make_plan(model, method, input_shape=shape)
        else:
            p = make_plan(model, method, example_input=inputs.inputs)
        p.apply(model, generator=torch.Generator().manual_seed(seed))
        if progress:
            progress(f"{method}: probing" + (f" draw 1/{draws}" if draws > 1 else ""))
        result = probe(model, inputs.inputs, plan=p)
        if draws > 1:
            result = _average_draws(result, model, p, inputs.inputs, seed, draws,
                                    (lambda d, m=method: progress(f"{m}: probing draw {d}/{draws}")) if progress else None)
        frame = result.to_frame()
        frame.insert(0, "method", method)
        # the weight layers are the plan's (the rule registry's definition), whatever their class is called
        frame["weight_layer"] = frame["layer"].isin({layer.name for layer in p.layers})
        frames.append(frame)
        plans[method] = p
        del model, result
    frame = pd.concat(frames, ignore_index=True)

    if progress:
        progress("drawing the report")
    meta = {
        "model": model_name,
        "methods": ", ".join(names),
        "input shape": " × ".join(map(str, shape)),
        "batch": str(len(inputs.inputs)),
        "seed": str(seed),
        "data": inputs.description,
        "loss": "Σ output · ξ, ξ fixed i.i.d. N(0, 1): unit gradient at the output, as the predictions assume",
        "initscope": initscope.__version__,
        "torch": torch.__version__,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".compare-", dir=out_dir))
    except OSError as exc:
        raise disk_error(exc, out_dir, "creating") from None
    try:
        # everything is made in the staging folder first: the page reads the PNGs back, and another
        # compare into the same folder must not be able to rewrite them under it ("not a PNG file")
        stats = _save_table(frame, staging)
        figures = _draw(frame, staging, model_name, shape, max_hist_layers)
        index = _write_page(meta, frame, plans, figures, staging)
        with FolderLock(out_dir, "initscope compare", wait=True):  # moving in takes a moment: wait for it
            moved = _move_in(staging, out_dir, last=index.name)
    except OSError as exc:
        raise disk_error(exc, getattr(exc, "filename", None) or out_dir) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    figures = {name: (moved[png.name], moved[svg.name]) for name, (png, svg) in figures.items()}
    return CompareResult(out_dir, moved[index.name], moved[stats.name], figures, frame, plans, meta)


def _average_draws(first, model: nn.Module, p, inputs: torch.Tensor, seed: int, draws: int,
                   announce: Callable[[int], None] | None = None):
    """``first`` with its outputs' and input gradients' second moments the geometric means over ``draws``
    weight draws (the first is ``first`` itself), and each layer's ``draws`` set; ``announce(d)`` is
    called before draw d (2..draws)."""
    import dataclasses

    from initscope.probe import probe

    logs: dict[tuple[str, str], list[float]] = {}

    def keep(result) -> None:
        for layer in result.layers:
            for quantity in ("output", "input_grad"):
                st = layer.stats.get(quantity)
                if st is not None and st.second_moment > 0:
                    logs.setdefault((layer.name, quantity), []).append(math.log(st.second_moment))

    keep(first)
    for d in range(1, draws):
        if announce:
            announce(d + 1)
        p.apply(model, generator=torch.Generator().manual_seed(seed + d))
        keep(probe(model, inputs, plan=p, quantiles=False, histograms=False, quantities=("output", "input_grad")))
    for layer in first.layers:
        layer.draws = draws
        for quantity in ("output", "input_grad"):
            values = logs.get((layer.name, quantity), [])
            if len(values) == draws:
                layer.stats[quantity] = dataclasses.replace(layer.stats[quantity],
                                                            second_moment=math.exp(sum(values) / draws))
    return first


# The stats table is Parquet, or CSV with a note where Parquet cannot be written: the one not written this
# time is removed, so that the folder never holds one compare's page beside another's table.
_STATS_FILES = ("stats.parquet", "stats.csv", "stats.parquet-failed.txt")


def _move_in(staging: Path, out_dir: Path, *, last: str) -> dict[str, Path]:
    """Move every file of ``staging`` into ``out_dir`` (``os.replace``: each one whole), ``last`` last, so
    the page appears when what it describes is there; returns name -> final path."""
    names = sorted(p.name for p in staging.iterdir() if p.is_file())
    for stale in set(_STATS_FILES) - set(names):
        (out_dir / stale).unlink(missing_ok=True)
    moved = {}
    for name in [n for n in names if n != last] + [last]:
        os.replace(staging / name, out_dir / name)
        moved[name] = out_dir / name
    fsync_dir(out_dir)
    return moved


_CAPTIONS = {
    "boxes": ("Box plots across layers (Fig. 3 of the Glorot/He paper)",
              "Per layer, from the probe's quantiles: box 25–75 %, black line the median, whiskers 1–99 %; "
              "methods side by side at each layer, in the order given. A panel whose narrowest box would be under "
              "2 % of its height on a linear axis is on a symmetric log scale (linear within the ± threshold its "
              "title gives, a power of ten under every box, logarithmic beyond), so a vanishing layer's tiny values "
              "stay boxes."),
    "histograms_activation": ("Histograms of activation outputs (Fig. 6)",
                              "Methods in rows, layers in columns (evenly spaced when the net is deep); counts on a log "
                              "scale; each panel has its own range."),
    "histograms_output_grad": ("Histograms of the gradient at each layer's output (Fig. 7)",
                               "Methods in rows, layers in columns; dL/d(output) with the loss Σ output · ξ."),
    "depth": ("Second moments against depth, measured and predicted",
              "Left: E[u²] at each weight layer's output; right: E[(∂L/∂x)²] at its input. Measured solid, "
              "the plan's prediction dashed, log scale; a gap between a method's two lines is the theory's error."),
}
# The interactive figures, in the page's order (the one that answers "does the plan hold?" first), with what
# differs from the static copy's caption.
_INTERACTIVE = {
    "depth": "Left: E[u²] at each weight layer's output; right: E[(∂L/∂x)²] at its input (the loss Σ output · ξ "
             "sends a unit gradient back, as the predictions assume). Measured solid with a point per weight layer, "
             "predicted dashed, shaded: the band within which a layer is not flagged. Hover a point for the layer, "
             "both values and their log2 ratio.",
    "boxes": _CAPTIONS["boxes"][1] + " Hover a box for the layer and its quantiles in the data's units.",
    "histograms_activation": "One layer at a time (choose it, or step with ◀ ▶; the last layer first), one panel per "
                             "method, each on its own range; counts on a log scale. Hover a bar for its bin and count.",
    "histograms_output_grad": "dL/d(output) with the loss Σ output · ξ, one layer at a time (the first layer first: "
                              "where the backward pass ends), one panel per method; counts on a log scale.",
}


def _draw(frame: pd.DataFrame, out_dir: Path, model: str, shape: tuple[int, ...],
          max_hist_layers: int) -> dict[str, tuple[Path, Path]]:
    from initscope.plotting import plot_boxes, plot_depth, plot_histograms, save_figure

    where = f"{model}, input {'×'.join(map(str, shape))}"
    made = {}
    # "auto": a symmetric log axis wherever a panel spans orders of magnitude (weight gradients between
    # methods; a vanishing net's activations), linear elsewhere.
    fig = plot_boxes(frame, title=where, yscale="auto")
    made["boxes"] = save_figure(fig, out_dir / "boxes")
    for quantity in ("activation", "output_grad"):
        name = f"histograms_{quantity}"
        if _has_histograms(frame, quantity):
            fig = plot_histograms(frame, quantity, max_layers=max_hist_layers)
            made[name] = save_figure(fig, out_dir / name)
    made["depth"] = save_figure(plot_depth(frame, title=f"{where}: measured (solid), predicted (dashed)"),
                                out_dir / "depth")
    return made


def _has_histograms(frame: pd.DataFrame, quantity: str) -> bool:
    rows = frame["quantity"] == quantity
    return bool(rows.any() and frame.loc[rows, "hist_counts"].map(len).any())


def _interactive(frame: pd.DataFrame, figures: dict[str, tuple[Path, Path]], where: str) -> list:
    """The page's interactive figures (:mod:`initscope.plotting.web`), each linked to its PNG and SVG."""
    from initscope.compare.html import InteractiveFigure
    from initscope.plotting import web

    specs = {"depth": lambda: web.depth_figure(frame, title=f"{where}: measured (solid), predicted (dashed)"),
             "boxes": lambda: web.boxes_figure(frame, title=where),
             "histograms_activation": lambda: web.histogram_figure(frame, "activation"),
             "histograms_output_grad": lambda: web.histogram_figure(frame, "output_grad")}
    out = []
    for name, make in specs.items():
        if name not in figures:
            continue
        png, svg = figures[name]
        out.append(InteractiveFigure(name, _CAPTIONS[name][0], _INTERACTIVE[name], make(),
                                     (("PNG", png.name), ("SVG", svg.name))))
    return out


def _write_page(meta: dict, frame: pd.DataFrame, plans: dict[str, InitPlan],
                figures: dict[str, tuple[Path, Path]], out_dir: Path) -> Path:
    from initscope.compare.html import page_figure, render_page

    page_figs = [page_figure(*_CAPTIONS[name], png.read_bytes()) for name, (png, _svg) in figures.items()]
    plan_tables = {m: (p.columns(), p.rows(), list(p.notes)) for m, p in plans.items()}
    notes = [
        "Each method was drawn into a freshly built copy of the model with the same seed and probed with the "
        "same batch: one forward and one backward pass, statistics taken by hooks.",
        "A layer is flagged when its measured output or input-gradient second moment lies further from the "
        "plan's prediction than the plan's own draw-to-draw spread allows (3 of its standard deviations, divided "
        "by √draws, and never less than 1 bit: the band on the depth plot), or when any of its tensors holds "
        "non-finite values.",
    ]
    where = f"{meta.get('model', '')}, input {meta.get('input shape', '').replace(' ', '')}"
    interactive = _interactive(frame, figures, where)
    index = out_dir / "index.html"
    index.write_text(render_page(meta, frame, plan_tables, page_figs, notes, interactive=interactive),
                     encoding="utf-8")
    return index
