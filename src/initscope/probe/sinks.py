"""Where the probe's records go during training: TensorBoard, Weights & Biases, or your own ``Sink``.

Both built-in sinks arrange the charts by quantity, layers together, and log what only initscope has:
each layer's predicted second moment beside the measured one, and their ratio.

TensorBoard (:class:`TensorBoardSink`):

* scalars ``{tag}/{quantity}/{layer}`` (the second moment) and ``{tag}/log2_ratio_{output|input_grad}/{layer}``
  (measured over predicted), gathered by a custom-scalars layout into one chart per quantity with a line
  per layer (the *Custom Scalars* tab: 8 charts for any depth, where one chart per tag made 406 for a
  width-16 plain34);
* histograms ``{tag}_histogram/{quantity}/{layer}`` (the probe's own bins);
* the depth figure ``{tag}/depth`` at every recorded step: measured and predicted second moments
  against depth, the band the plan allows shaded.

Weights & Biases (:class:`WandbSink`): per recorded step, one line chart per quantity across depth
(measured, and predicted where there is a prediction), one of the log2 ratios, and a histogram per
layer and quantity, all under ``{prefix}/``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, TYPE_CHECKING

import numpy as np

from initscope.probe.probe import Probe

if TYPE_CHECKING:  # pandas costs 0.8 s to import; only the functions that build frames need it
    import pandas as pd

RATIOS = (("output", "out_ratio"), ("input_grad", "in_grad_ratio"))


class Sink:
    """Receives each recorded probe; subclass it to log elsewhere."""

    def write(self, step: int, result: Probe, frame: pd.DataFrame) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Flush and let go of what the sink opened."""


def _depth_frame(frame: pd.DataFrame) -> pd.DataFrame:
    return frame if "method" in frame else frame.assign(method="")


class TensorBoardSink(Sink):
    """Writes to a ``torch.utils.tensorboard.SummaryWriter`` (or opens one on a log directory)."""

    def __init__(self, writer: Any, tag: str = "probe", depth_figure: bool = True) -> None:
        self._owns = isinstance(writer, (str, Path))
        if self._owns:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(log_dir=str(writer))
        self.writer, self.tag, self.depth_figure = writer, tag, depth_figure
        self._layout_written = False

    def _layout(self, quantities: list[str]) -> None:
        """One multiline chart per quantity, and one per ratio (TensorBoard's custom scalars)."""
        charts = {q: ["Multiline", [rf"{self.tag}/{q}/.*"]] for q in quantities}
        for q, _ in RATIOS:
            charts[f"log2 measured / predicted, {q}"] = ["Multiline", [rf"{self.tag}/log2_ratio_{q}/.*"]]
        self.writer.add_custom_scalars({f"{self.tag}: second moments across layers": charts})
        self._layout_written = True

    def write(self, step: int, result: Probe, frame: pd.DataFrame) -> None:
        w = self.writer
        quantities = list(dict.fromkeys(frame["quantity"]))
        if not self._layout_written:
            self._layout(quantities)
        for layer in result.layers:
            name = layer.name or "model"
            for quantity, s in layer.stats.items():
                if quantity not in quantities or s.count == 0:
                    continue
                w.add_scalar(f"{self.tag}/{quantity}/{name}", s.second_moment, step)
                num = sum(s.hist_counts)
                if num:
                    edges = np.linspace(s.hist_lo, s.hist_hi, len(s.hist_counts) + 1)
                    # The bins' own counts, so TensorBoard shows exactly the histogram in the table.
                    w.add_histogram_raw(f"{self.tag}_histogram/{quantity}/{name}", min=s.min, max=s.max, num=num,
                                        sum=s.mean * num, sum_squares=s.second_moment * num,
                                        bucket_limits=edges[1:].tolist(), bucket_counts=list(s.hist_counts),
                                        global_step=step)
            for quantity, attr in RATIOS:
                ratio = getattr(layer, attr)
                if ratio == ratio and ratio > 0:
                    w.add_scalar(f"{self.tag}/log2_ratio_{quantity}/{name}", math.log2(ratio), step)
        if self.depth_figure and "output" in quantities:
            import matplotlib.pyplot as plt

            from initscope.plotting import plot_depth

            fig = plot_depth(_depth_frame(frame), title=f"step {step}: measured (solid) and predicted (dashed)")
            w.add_figure(f"{self.tag}/depth", fig, step)
            plt.close(fig)
        w.flush()

    def close(self) -> None:
        if self._owns:
            self.writer.close()


class WandbSink(Sink):
    """Logs to a Weights & Biases run (``wandb.run`` by default; ``pip install 'initscope[wandb]'``)."""

    def __init__(self, run: Any = None, prefix: str = "probe") -> None:
        try:
            import wandb
        except ImportError:
            raise ImportError("the W&B sink needs wandb: pip install 'initscope[wandb]' (or pip install wandb)") from None
        self.wandb = wandb
        self.run = run if run is not None else wandb.run
        if self.run is None:
            raise ValueError("no W&B run: call wandb.init(...) first, or pass run=")
        self.prefix = prefix

    def write(self, step: int, result: Probe, frame: pd.DataFrame) -> None:
        wb, logs = self.wandb, {}
        layers = [layer for layer in result.layers]
        xs = list(range(len(layers)))
        quantities = list(dict.fromkeys(frame["quantity"]))
        for quantity in quantities:
            measured = [l.stats[quantity].second_moment if quantity in l.stats else float("nan") for l in layers]
            ys, keys = [measured], ["measured"]
            predicted = {"output": [l.pred_out_var for l in layers],
                         "input_grad": [l.pred_in_grad_var for l in layers]}.get(quantity)
            if predicted is not None and any(p == p for p in predicted):
                ys.append(predicted)
                keys.append("predicted")
            logs[f"{self.prefix}/{quantity}"] = wb.plot.line_series(
                xs=xs, ys=ys, keys=keys, title=f"{quantity}: second moment across layers (step {step})",
                xname="layer (forward order)")
            for l in layers:
                s = l.stats.get(quantity)
                if s is not None and sum(s.hist_counts):
                    edges = np.linspace(s.hist_lo, s.hist_hi, len(s.hist_counts) + 1)
                    logs[f"{self.prefix}_histogram/{quantity}/{l.name or 'model'}"] = wb.Histogram(
                        np_histogram=(np.asarray(s.hist_counts), edges))
        ratios = [[math.log2(getattr(l, attr)) if getattr(l, attr) > 0 else float("nan") for l in layers]
                  for _, attr in RATIOS]
        logs[f"{self.prefix}/log2_ratio"] = wb.plot.line_series(
            xs=xs, ys=ratios, keys=[q for q, _ in RATIOS], title=f"log2 measured / predicted (step {step})",
            xname="layer (forward order)")
        self.run.log(logs, step=step)


def as_sinks(writer: Any, tag: str) -> list[Sink]:
    """``ProbeCallback``'s ``writer``: None, a log directory, a ``SummaryWriter``, a :class:`Sink`, or a list."""
    if writer is None:
        return []
    if isinstance(writer, (list, tuple)):
        return [s for w in writer for s in as_sinks(w, tag)]
    if isinstance(writer, Sink):
        return [writer]
    if isinstance(writer, (str, Path)) or hasattr(writer, "add_scalar"):
        return [TensorBoardSink(writer, tag=tag)]
    raise TypeError(f"writer must be None, a TensorBoard log directory or SummaryWriter, a Sink, or a list of them; "
                    f"got {type(writer).__name__}")
