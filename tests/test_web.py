"""The interactive figures' specifications (initscope.plotting.web) read back against the probe's table, as the
PNG figures are in test_plotting; drawing them is test_browser's."""

import json
import math

import numpy as np
import pytest
from probe_frames import layer_names, make_frame
from test_plotting import history, vanishing_frame

from initscope.plotting import web
from initscope.plotting.common import symlog_threshold, symlog_transform


def traces(spec, meta):
    return [t for t in spec["data"] if t.get("meta") == meta]


def test_boxes_are_the_quantiles_on_the_png_figures_scale():
    frame = vanishing_frame()
    spec = web.boxes_figure(frame, quantities=("weight", "activation"), title="t")
    layout = spec["layout"]
    act = [t for t in traces(spec, "box") if t["yaxis"] == "y2"]
    assert [t["name"] for t in act] == ["xavier", "kaiming-forward"]
    rows = frame[frame["quantity"] == "activation"]
    spreads = (rows["q75"] - rows["q25"]).tolist()
    thresh = symlog_threshold(spreads, float(rows[["q01", "q99"]].abs().max().max()))
    for t in act:
        r = rows[rows["method"] == t["name"]].set_index("layer").loc[t["x"]]
        # drawn through matplotlib's symlog transform, from q25 to q75; hover in the data's units
        assert t["base"] == pytest.approx(list(symlog_transform(r["q25"], thresh)))
        top = np.array(t["base"]) + np.array(t["y"])
        assert top == pytest.approx(symlog_transform(r["q75"], thresh))
        assert all(f"<b>{name}</b> · #" in h and "median" in h for name, h in zip(t["x"], t["hovertext"]))
    # the y axis is labelled in the data's units at the transformed positions; 0 among them
    ticks = dict(zip(layout["yaxis2"]["ticktext"], layout["yaxis2"]["tickvals"]))
    assert ticks["0"] == 0 and "symmetric log scale" in layout["annotations"][1]["text"]
    assert layout["xaxis2"]["categoryarray"] == layer_names(8) and layout["xaxis2"]["matches"] == "x"


def test_depth_spec_scales_the_backward_predictions_when_asked():
    frame = make_frame(methods=("xavier",), n_layers=4)
    frame.loc[(frame["layer"] == "fc") & (frame["quantity"] == "output_grad"), "second_moment"] = 1e-4
    pred = frame.loc[frame["quantity"] == "output", "pred_in_grad_var"].to_numpy()
    unit, measured = web.depth_figure(frame), web.depth_figure(frame, output_grad="measured")
    assert traces(unit, "predicted-backward")[0]["y"] == pytest.approx(list(pred))
    assert traces(measured, "predicted-backward")[0]["y"] == pytest.approx(list(pred * 1e-4))
    hover = traces(measured, "measured-forward")[0]["hovertext"]
    assert [h.split("</b>")[0] for h in hover] == [f"<b>{n}" for n in layer_names(4)]
    backward = traces(measured, "measured-backward")[0]["hovertext"]
    assert all("plan × E[g²] at the output, 0.0001" in h for h in backward)
    assert not any("plan × E[g²]" in h for h in traces(unit, "measured-backward")[0]["hovertext"])
    with pytest.raises(ValueError, match="output_grad='ce'"):
        web.depth_figure(frame, output_grad="ce")


def test_histogram_spec_carries_every_layer_once():
    frame = make_frame(methods=("xavier", "kaiming-forward"), n_layers=5)
    spec = web.histogram_figure(frame, "activation")
    assert spec["layers"] == layer_names(5)[:-1] and spec["initial"] == layer_names(5)[-2]  # the last, forward
    assert web.histogram_figure(frame, "output_grad")["initial"] == layer_names(5)[0]  # the first, backward
    lo, hi, counts = spec["hist"]["xavier"]["features.2"]
    r = frame[(frame["method"] == "xavier") & (frame["layer"] == "features.2") & (frame["quantity"] == "activation")]
    assert (lo, hi, counts) == (r["hist_lo"].iloc[0], r["hist_hi"].iloc[0], list(r["hist_counts"].iloc[0]))
    with pytest.raises(ValueError, match="no layer has a histogram of 'activation'"):
        web.histogram_figure(frame.assign(hist_counts=[[] for _ in range(len(frame))]), "activation")


def test_curves_spec_in_percent_with_whole_epochs():
    h = history()
    spec = web.curves_figure(h)
    (val,) = traces(spec, "accuracy|val|xavier")
    assert val["y"] == pytest.approx(list(100 * h[h["label"] == "xavier"]["val_accuracy"]))
    assert val["x"] == [1, 2, 3, 4, 5] and spec["layout"]["xaxis"]["dtick"] == 1
    assert "%" in spec["layout"]["yaxis"]["title"]["text"]


def test_curves_spec_puts_a_loss_spanning_thousands_on_a_log_axis():
    h = history()
    assert web.curves_figure(h)["layout"]["yaxis2"]["type"] == "linear"
    h.loc[0, "train_loss"] = 43_000.0
    assert web.curves_figure(h)["layout"]["yaxis2"]["type"] == "log"


def test_json_in_the_page_cannot_end_its_script_element():
    text = web.to_json({"layer": "</script><script>alert(1)</script>", "v": [math.nan, math.inf, np.float32(0.5)]})
    assert "</script" not in text and "<" not in text
    assert json.loads(text) == {"layer": "</script><script>alert(1)</script>", "v": [None, None, 0.5]}
    page_scripts = web.page_scripts()
    assert page_scripts.count("</script>") == 2 and "plotly.js v" in page_scripts


def test_curves_spec_of_a_one_epoch_run_has_that_epoch_alone():
    spec = web.curves_figure(history().groupby("label", sort=False).head(1))
    axis = spec["layout"]["xaxis"]
    assert axis["tickvals"] == [1] and axis["range"] == [0, 2]
    assert {t["marker"]["symbol"] for t in spec["data"] if "|val|" in t["meta"]} == {"circle"}
    assert {t["marker"]["symbol"] for t in spec["data"] if "|train|" in t["meta"]} == {"square-open"}
