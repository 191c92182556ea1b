"""Every figure read back against the table it was drawn from: the drawn numbers are the data."""

import json
import math

import numpy as np
import pandas as pd
import pytest
from probe_frames import layer_names, make_frame

from initscope.plotting import (
    plot_boxes,
    plot_depth,
    plot_histograms,
    plot_training_curves,
    plot_variance_vs_depth,
    save_figure,
)

METHODS = ("xavier", "kaiming-forward", "asv-backward")


@pytest.fixture(scope="module")
def frame():
    return make_frame(methods=METHODS, n_layers=6, bins=16)


def by_gid(fig, prefix):
    """Artists of ``fig`` whose gid starts with ``prefix``, keyed by the rest of the gid."""
    out = {}
    for ax in fig.axes:
        for artist in ax.get_children():
            gid = artist.get_gid()
            if gid and gid.startswith(prefix + "|"):
                out.setdefault(gid[len(prefix) + 1:], []).append((ax, artist))
    return out


def row(frame, method, layer, quantity):
    sel = frame[(frame["method"] == method) & (frame["layer"] == layer) & (frame["quantity"] == quantity)]
    assert len(sel) == 1
    return sel.iloc[0]


# -- box plots (Fig. 3) ------------------------------------------------------------------------------

def drawn_boxes(ax, layers):
    """{(method, layer): (q25, q50, q75, low whisker, high whisker)} as drawn on ``ax``.

    Each box is matched to its layer by position: a box sits within half a unit of its layer's index.
    """
    out = {}
    parts = {}
    for c in ax.collections:
        kind, _, method = (c.get_gid() or "").partition("|")
        parts.setdefault(method, {})[kind] = c
    for method, p in parts.items():
        boxes = [path.vertices for path in p["boxes"].get_paths()]
        medians = p["medians"].get_segments()
        whiskers = p["whiskers"].get_segments()
        assert len(boxes) == len(medians) == len(whiskers) / 4
        for k, (box, med) in enumerate(zip(boxes, medians)):
            x = box[:, 0].mean()
            layer = layers[int(round(x))]
            assert abs(x - round(x)) < 0.5 and med[0][1] == med[1][1]
            lo, hi = whiskers[4 * k], whiskers[4 * k + 1]
            assert lo[0][1] == box[:, 1].min() and hi[0][1] == box[:, 1].max()  # whiskers start at the box
            out[(method, layer)] = (box[:, 1].min(), med[0][1], box[:, 1].max(), lo[1][1], hi[1][1], x)
    return out


@pytest.mark.parametrize("whiskers,lo,hi", [("1-99", "q01", "q99"), ("5-95", "q05", "q95")])
def test_boxes_draw_the_quantiles(frame, whiskers, lo, hi):
    quantities = ("weight", "activation", "weight_grad")
    fig = plot_boxes(frame, quantities=quantities, whiskers=whiskers)
    assert len(fig.axes) == 3
    layers = layer_names(6)
    for ax, quantity in zip(fig.axes, quantities):
        drawn = drawn_boxes(ax, layers)
        # the linear head has no activation after it: one box fewer per method in that panel
        assert len(drawn) == len(METHODS) * (len(layers) - (quantity == "activation"))
        for (method, layer), (q25, q50, q75, low, high, _x) in drawn.items():
            r = row(frame, method, layer, quantity)
            assert (q25, q50, q75, low, high) == pytest.approx((r["q25"], r["q50"], r["q75"], r[lo], r[hi]))
    assert f"{lo[1:].lstrip('0')}–{hi[1:]} %" in fig._suptitle.get_text()


def test_boxes_methods_side_by_side_in_order(frame):
    fig = plot_boxes(frame, quantities=("weight",))
    drawn = drawn_boxes(fig.axes[0], layer_names(6))
    for layer in layer_names(6):
        xs = [drawn[(m, layer)][-1] for m in METHODS]
        assert xs == sorted(xs) and xs[-1] - xs[0] < 1.0  # within the layer's slot, in method order


def test_boxes_scale_per_panel():
    frame = make_frame(n_layers=4)
    fig = plot_boxes(frame, quantities=("weight", "weight_grad"), yscale={"weight_grad": "symlog"})
    assert [ax.get_yscale() for ax in fig.axes[:2]] == ["linear", "symlog"]
    with pytest.raises(ValueError, match="'log'"):
        plot_boxes(frame, quantities=("weight",), yscale={"weight": "log"})


def test_boxes_single_probe_and_missing_quantiles():
    single = make_frame(methods=("x",), n_layers=4).drop(columns="method")
    fig = plot_boxes(single, quantities=("output",), yscale="symlog")
    drawn = drawn_boxes(fig.axes[0], layer_names(4))
    assert sorted(drawn) == sorted(("", n) for n in layer_names(4))
    assert fig.axes[0].get_yscale() == "symlog"
    no_q = single.copy()
    no_q.loc[no_q["layer"] == "fc", ["q01", "q05", "q25", "q50", "q75", "q95", "q99"]] = math.nan
    fig = plot_boxes(no_q, quantities=("output",))
    assert sorted(layer for _, layer in drawn_boxes(fig.axes[0], layer_names(4))) == sorted(layer_names(4)[:-1])


def test_boxes_bad_arguments(frame):
    with pytest.raises(ValueError, match="whiskers='2-98'.*'1-99'"):
        plot_boxes(frame, whiskers="2-98")
    with pytest.raises(ValueError, match="quantity='grads'.*output_grad"):
        plot_boxes(frame, quantities=("grads",))
    with pytest.raises(ValueError, match=r"\['q01'"):
        plot_boxes(frame.drop(columns="q01"))


# -- histograms (Figs. 6, 7) -----------------------------------------------------------------------

def test_histograms_bars_are_the_counts(frame):
    fig = plot_histograms(frame, "output_grad")
    hists = by_gid(fig, "hist")
    assert len(hists) == len(METHODS) * 6
    assert len(fig.axes) == len(METHODS) * 6
    for key, [(ax, patch)] in hists.items():
        method, layer = key.split("|")
        r = row(frame, method, layer, "output_grad")
        values, edges, _ = patch.get_data()
        assert list(values) == list(r["hist_counts"])
        assert np.allclose(edges, np.linspace(r["hist_lo"], r["hist_hi"], len(r["hist_counts"]) + 1))
        assert ax.get_yscale() == "log"
    # methods in rows, layers in columns
    grid = fig.axes[0].get_gridspec()
    assert (grid.nrows, grid.ncols) == (len(METHODS), 6)


def test_histograms_subsample_layers_and_say_so():
    deep = make_frame(methods=("a", "b"), n_layers=12, bins=8)
    fig = plot_histograms(deep, "weight", max_layers=4, log=False)
    shown = sorted({k.split("|")[1] for k in by_gid(fig, "hist")}, key=layer_names(12).index)
    assert len(shown) == 4 and shown[0] == "features.0" and shown[-1] == "fc"
    assert "4 of 12 layers, evenly spaced" in fig._suptitle.get_text()
    fig = plot_histograms(deep, "weight", max_layers=20)
    assert len(by_gid(fig, "hist")) == 24 and "of 12" not in fig._suptitle.get_text()


def test_histograms_from_csv_counts_and_errors(frame):
    as_csv = frame.assign(hist_counts=frame["hist_counts"].map(json.dumps))
    fig = plot_histograms(as_csv, "activation")
    [(_, patch)] = by_gid(fig, "hist")[f"xavier|{layer_names(6)[2]}"]
    assert list(patch.get_data()[0]) == list(row(frame, "xavier", layer_names(6)[2], "activation")["hist_counts"])
    with pytest.raises(ValueError, match="no layer has a histogram"):
        plot_histograms(frame.assign(hist_counts=[[] for _ in range(len(frame))]), "activation")
    with pytest.raises(ValueError, match="max_layers=0"):
        plot_histograms(frame, "activation", max_layers=0)


# -- variance against depth ------------------------------------------------------------------------

def test_depth_lines_are_the_table(frame):
    fig = plot_depth(frame)
    fwd, bwd = fig.axes[:2]
    assert fwd.get_yscale() == "log" and bwd.get_yscale() == "log"
    layers = layer_names(6)
    for method in METHODS:
        out = [row(frame, method, n, "output") for n in layers]
        grad = [row(frame, method, n, "input_grad") for n in layers]
        expect = {
            "measured-forward": [r["second_moment"] for r in out],
            "predicted-forward": [r["pred_out_var"] for r in out],
            "measured-backward": [r["second_moment"] for r in grad],
            "predicted-backward": [r["pred_in_grad_var"] for r in grad],
        }
        for name, values in expect.items():
            [(ax, line)] = by_gid(fig, name)[method]
            assert ax is (fwd if name.endswith("forward") else bwd)
            assert np.allclose(line.get_ydata(), values)
            assert list(line.get_xdata()) == list(range(len(layers)))
            assert line.get_linestyle() == ("-" if name.startswith("measured") else "--")
        colors = {by_gid(fig, name)[method][0][1].get_color() for name in expect}
        assert len(colors) == 1  # one colour per method
    # the measured column equals the meas_out_var the probe repeats on every row
    r = row(frame, METHODS[0], layers[0], "weight")
    assert by_gid(fig, "measured-forward")[METHODS[0]][0][1].get_ydata()[0] == pytest.approx(r["meas_out_var"])


def test_depth_without_plan_and_nonpositive():
    f = make_frame(methods=("a",), n_layers=4, predictions=False)
    f.loc[(f["layer"] == "features.2") & (f["quantity"] == "output"), "second_moment"] = 0.0
    fig = plot_depth(f)
    assert not by_gid(fig, "predicted-forward") and not by_gid(fig, "predicted-backward")
    y = by_gid(fig, "measured-forward")["a"][0][1].get_ydata()
    assert math.isnan(y[1]) and all(v > 0 for i, v in enumerate(y) if i != 1)


def test_old_depth_figure_still_works(tmp_path):
    table = {"m": {"pred_out": [1.0, 2.0], "meas_out": [1.0, 1.5], "pred_grad": [1.0, 1.0], "meas_grad": [0.9, 1.1]}}
    path = plot_variance_vs_depth(table, tmp_path / "v.png", title="t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- training curves (Figs. 4, 5) ------------------------------------------------------------------

def history():
    rows = []
    for label, k in (("xavier", 1.0), ("kaiming-forward", 2.0)):
        for e in range(1, 6):
            rows.append({"epoch": e, "train_loss": k / e, "val_loss": k / e + 0.1,
                         "train_accuracy": 1 - 0.5 / e, "val_accuracy": 1 - 0.6 / e, "label": label})
    return pd.DataFrame(rows)


def test_curves_are_the_history(tmp_path):
    h = history()
    fig = plot_training_curves(h, path=tmp_path / "curves", title="runs")
    acc, loss = fig.axes[:2]
    for label in ("xavier", "kaiming-forward"):
        run = h[h["label"] == label]
        for metric, ax in (("accuracy", acc), ("loss", loss)):
            for split, style in (("train", "--"), ("val", "-")):
                [(on, line)] = by_gid(fig, metric)[f"{split}|{label}"]
                assert on is ax and line.get_linestyle() == style
                assert list(line.get_xdata()) == list(run["epoch"])
                # accuracy in %, as the report's tables give it
                assert np.allclose(line.get_ydata(), run[f"{split}_{metric}"] * (100 if metric == "accuracy" else 1))
    assert (tmp_path / "curves.png").exists() and (tmp_path / "curves.svg").exists()


def test_curves_from_run_history_list_and_divergence():
    rows = history().drop(columns="label").iloc[:5].to_dict("records")
    rows[3]["train_loss"] = math.inf
    fig = plot_training_curves(rows)
    [(_, line)] = by_gid(fig, "loss")["train|"]
    y = line.get_ydata()
    assert math.isnan(y[3]) and y[0] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="val_accuracy"):
        plot_training_curves([{"epoch": 1, "train_loss": 1.0, "train_accuracy": 0.1, "val_loss": 1.0}])


# -- saving ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["boxes", "boxes.png", "boxes.svg"])
def test_save_figure_writes_png_and_svg(tmp_path, frame, name):
    fig = plot_boxes(frame, quantities=("weight",))
    png, svg = save_figure(fig, tmp_path / "sub" / name)
    assert png == tmp_path / "sub" / "boxes.png" and svg == tmp_path / "sub" / "boxes.svg"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = svg.read_text()
    assert text.lstrip().startswith("<?xml") and 'id="medians|xavier"' in text


def test_save_figure_bad_suffix(tmp_path, frame):
    fig = plot_depth(frame)
    with pytest.raises(ValueError, match="'.pdf'|\\.pdf"):
        save_figure(fig, tmp_path / "x.pdf")
    assert not list(tmp_path.iterdir())


def test_depth_plot_draws_the_band_a_measurement_may_stay_in():
    import torch

    import initscope
    from initscope.models import create_model
    from initscope.plotting import plot_depth

    model = create_model("plain34", width=8)
    initscope.init_(model, "kaiming-forward", input_shape=(3, 32, 32), generator=torch.Generator().manual_seed(0))
    frame = initscope.probe(model, torch.randn(8, 3, 32, 32)).to_frame()
    frame["method"] = "kaiming-forward"
    fig = plot_depth(frame)
    bands = [c for ax in fig.axes for c in ax.collections if (c.get_gid() or "").startswith("band-")]
    assert {c.get_gid() for c in bands} == {"band-forward|kaiming-forward", "band-backward|kaiming-forward"}
    # Deep in the net the band is wider than the fixed factor of 2 the flags used to have.
    assert frame.loc[frame["quantity"] == "output", "flag_out_bits"].max() > 1.0


# -- readable figures (issue 16, item 5) ---------------------------------------------------------------------

QUANTILES = ["q01", "q05", "q25", "q50", "q75", "q95", "q99"]


def vanishing_frame(n_layers=8):
    """Two methods on one net: Kaiming's activations stay near 1, Xavier's halve per layer from 1e-5 down to
    ~1e-7 (its weights are 1e-2 of Kaiming's): the vanishing signal of a deep plain net under Xavier."""
    frame = make_frame(methods=("xavier", "kaiming-forward"), n_layers=n_layers)
    for li in range(n_layers):
        rows = (frame["method"] == "xavier") & (frame["index"] == li)
        frame.loc[rows & (frame["quantity"] == "activation"), QUANTILES] *= 1e-5 * 0.5 ** li
        frame.loc[rows & (frame["quantity"] == "weight"), QUANTILES] *= 1e-2
    return frame


def pixel_heights(ax, drawn):
    """Each drawn box's height on screen, in pixels (the figure's dpi)."""
    to_px = ax.transData.transform
    return {key: abs(to_px((0, q75))[1] - to_px((0, q25))[1]) for key, (q25, _m, q75, *_rest) in drawn.items()}


def rendered(fig):
    """``fig`` drawn on an Agg canvas (figures are made without one); its renderer, for text extents."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return canvas.get_renderer()


def text_boxes(fig, texts):
    renderer = fig.canvas.get_renderer()
    return [t.get_window_extent(renderer) for t in texts if t.get_visible() and t.get_text()]


def overlapping(boxes):
    return [(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:] if a.overlaps(b)]


def test_boxes_of_a_vanishing_signal_are_boxes_on_a_log_axis():
    # Xavier's 1e-7 activations beside Kaiming's ~1: on a linear axis they were flat lines at zero.
    frame = vanishing_frame()
    fig = plot_boxes(frame, quantities=("weight", "activation"))
    for ax in fig.axes[:2]:
        assert ax.get_yscale() == "symlog", ax.get_title()
        assert "symmetric log scale" in ax.get_title(loc="left")
        heights = pixel_heights(ax, drawn_boxes(ax, layer_names(8)))
        assert len(heights) >= 2 * 7
        assert min(heights.values()) >= 2.0, min(heights.items(), key=lambda kv: kv[1])
    # a panel whose boxes are of one size stays linear
    assert plot_boxes(make_frame(n_layers=4), quantities=("weight",)).axes[0].get_yscale() == "linear"


def test_symlog_tick_labels_do_not_crowd_near_zero():
    frame = vanishing_frame()
    fig = plot_boxes(frame, quantities=("activation", "weight"), yscale="symlog")
    rendered(fig)
    for ax in fig.axes[:2]:
        lo, hi = ax.get_ylim()
        labels = [t for t, v in zip(ax.get_yticklabels(), ax.get_yticks()) if lo <= v <= hi]
        assert not overlapping(text_boxes(fig, labels)), [t.get_text() for t in labels]
        assert "0" in [t.get_text() for t in labels] and len(labels) >= 3
        assert all(t.get_fontsize() >= 7 for t in labels)


@pytest.mark.parametrize("n_layers", [60, 150])
def test_box_layer_names_stay_readable_on_a_deep_net(n_layers):
    # Long names on a deep net: every named tick 8 pt, none on another, none cut by the figure's edge; past what
    # fits, one layer in k is named and the title says so
    from initscope.plotting.common import MIN_FONT

    frame = make_frame(methods=("xavier", "kaiming-forward", "asv-backward"), n_layers=n_layers, bins=4)
    long = {n: f"features.{i}.block.conv_pw.{n}" for i, n in enumerate(layer_names(n_layers))}
    frame["layer"] = frame["layer"].map(long)
    fig = plot_boxes(frame)
    rendered(fig)
    page = fig.bbox
    for ax in fig.axes[:3]:
        labels = [t for t in ax.get_xticklabels() if t.get_text()]
        assert len(labels) == n_layers if n_layers == 60 else 40 <= len(labels) < n_layers
        assert min(t.get_fontsize() for t in labels) >= MIN_FONT
        boxes = text_boxes(fig, labels)
        assert not overlapping(boxes)
        assert all(b.x0 >= page.x0 and b.x1 <= page.x1 and b.y0 >= page.y0 for b in boxes)
        assert all(len(t.get_text()) <= 24 for t in labels)
    assert ("one layer in" in fig._suptitle.get_text()) == (n_layers == 150)
    # the labels of one panel end above the next panel's title
    for upper, lower in zip(fig.axes[:2], fig.axes[1:3]):
        lowest = min(b.y0 for b in text_boxes(fig, upper.get_xticklabels()))
        assert lowest > lower._left_title.get_window_extent(fig.canvas.get_renderer()).y1


def test_curves_accuracy_is_in_percent():
    h = history()
    fig = plot_training_curves(h)
    assert "%" in fig.axes[0].get_title()
    [(_, line)] = by_gid(fig, "accuracy")["val|xavier"]
    assert np.allclose(line.get_ydata(), 100 * h[h["label"] == "xavier"]["val_accuracy"])


def test_a_loss_that_starts_thousands_of_times_higher_gets_a_log_axis():
    # The ASV poster's Table 3 under SGD: asv-backward's first training loss (mean of 3 seeds) is 43,000,
    # the others near 2; on a linear axis every other curve lay flat on zero.
    h = history()
    assert plot_training_curves(h).axes[1].get_yscale() == "linear"  # 0.2-2.1: a span of 10
    spiked = h.copy()
    spiked.loc[0, "train_loss"] = 43_000.0
    fig = plot_training_curves(spiked)
    assert fig.axes[1].get_yscale() == "log" and "log" in fig.axes[1].get_title()
    assert fig.axes[0].get_yscale() == "linear"
    assert plot_training_curves(spiked.assign(val_loss=-spiked["val_loss"])).axes[1].get_yscale() == "linear"


def test_curves_epochs_are_whole_numbers():
    fig = plot_training_curves(history())
    acc, loss = fig.axes[:2]
    rendered(fig)
    for ax in (acc, loss):
        lo, hi = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks


def test_a_one_epoch_run_is_points_the_legend_tells_apart():
    # One epoch: no line to see, so each split is a marker of its own shape, and the legend shows the markers
    one = history().groupby("label", sort=False).head(1)
    fig = plot_training_curves(one)
    markers = {}
    for key, [(_, line)] in by_gid(fig, "accuracy").items():
        split = key.split("|")[0]
        assert line.get_marker() not in (None, "None", "", " ")
        markers.setdefault(split, set()).add(line.get_marker())
    assert len(markers["val"]) == len(markers["train"]) == 1 and markers["val"] != markers["train"]
    legend = fig.legends[0]
    entries = dict(zip([t.get_text() for t in legend.get_texts()], legend.legend_handles))
    assert {entries["validation"].get_marker(), entries["training"].get_marker()} == markers["val"] | markers["train"]
    rendered(fig)
    acc = fig.axes[0]
    lo, hi = acc.get_xlim()
    assert lo < 1 - 0.4 and hi > 1 + 0.4  # the point away from the frame's edges
    assert [t for t in acc.get_xticks() if lo <= t <= hi] == [1]


def test_histogram_text_is_readable(frame):
    from matplotlib.text import Text

    from initscope.plotting.common import MIN_FONT

    for quantity in ("activation", "output_grad"):
        fig = plot_histograms(frame, quantity)
        rendered(fig)
        small = {t.get_text(): t.get_fontsize() for t in fig.findobj(Text)
                 if t.get_visible() and t.get_text() and t.get_fontsize() < MIN_FONT}
        assert not small


def test_depth_predictions_scaled_to_the_measured_output_gradient():
    # Issue 16, item 4: a training probe's loss (cross-entropy) sends back a gradient decades below the unit
    # gradient the plans predict for; output_grad="measured" multiplies the predictions by E[g²] at the output.
    frame = make_frame(methods=("xavier", "asv-backward"), n_layers=5)
    head = {"xavier": 3e-5, "asv-backward": 2e-4}
    for method, g2 in head.items():
        rows = (frame["method"] == method) & (frame["layer"] == "fc") & (frame["quantity"] == "output_grad")
        frame.loc[rows, "second_moment"] = g2
    unit = plot_depth(frame)
    scaled = plot_depth(frame, output_grad="measured")
    for method, g2 in head.items():
        pred = [row(frame, method, n, "output")["pred_in_grad_var"] for n in layer_names(5)]
        [(_, line)] = by_gid(unit, "predicted-backward")[method]
        assert np.allclose(line.get_ydata(), pred)
        [(_, line)] = by_gid(scaled, "predicted-backward")[method]
        assert np.allclose(line.get_ydata(), np.array(pred) * g2)
        # the forward panel is not touched
        [(_, fwd)] = by_gid(scaled, "predicted-forward")[method]
        assert np.allclose(fwd.get_ydata(), [row(frame, method, n, "output")["pred_out_var"] for n in layer_names(5)])
    title = scaled.axes[1].get_title()
    assert "× E[g²] measured at the output" in title and "measured at the output" not in unit.axes[1].get_title()
    with pytest.raises(ValueError, match="output_grad='cross-entropy'.*'measured'"):
        plot_depth(frame, output_grad="cross-entropy")
