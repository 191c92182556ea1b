"""The comparison: one fresh copy per method, the table, the figures, the self-contained page, the CLI."""

import base64
import re

import numpy as np
import pandas as pd
import pytest
import torch
from pages import outside_scripts, specs
from probe_frames import SHARED_METHODS, make_frame, shared_report, tiny_cnn
from typer.testing import CliRunner

from initscope.cli import app
from initscope.errors import InitscopeError
from initscope.methods import METHODS
from initscope.compare import compare, parse_methods
from initscope.compare.html import page_figure, png_size, render_page
from initscope.compare.inputs import load_batch
from initscope.compare.run import FIGURES

METHODS3 = SHARED_METHODS
runner = CliRunner()


@pytest.fixture(scope="module")
def report():
    return shared_report()  # tiny_cnn, METHODS3, input 3x16x16, batch 8, seed 3


def imgs(page: str) -> list[str]:
    return re.findall(r'<img src="([^"]*)"', page)


def section(page: str, name: str) -> str:
    start = page.index(f'<section id="{name}">')
    return page[start:page.index("</section>", start)]


# -- what compare writes ---------------------------------------------------------------------------

def test_compare_writes_everything(report):
    out = report.out_dir
    assert report.index == out / "index.html" and report.index.exists()
    assert report.stats == out / "stats.parquet"
    assert set(report.figures) == set(FIGURES)
    for png, svg in report.figures.values():
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and svg.read_text().lstrip().startswith("<?xml")
    saved = pd.read_parquet(report.stats)
    assert list(saved.columns[:2]) == ["method", "layer"] and len(saved) == len(report.frame)
    assert list(dict.fromkeys(saved["method"])) == list(METHODS3)
    num = ["second_moment", "q50", "pred_out_var", "meas_in_grad_var"]
    assert np.allclose(saved[num].to_numpy(float), report.frame[num].to_numpy(float), equal_nan=True)
    assert [list(c) for c in saved["hist_counts"]] == [list(c) for c in report.frame["hist_counts"]]


def test_predictions_are_each_methods_plan(report):
    for method, plan in report.plans.items():
        assert plan.method == method
        out = report.frame[(report.frame["method"] == method) & (report.frame["quantity"] == "output")]
        by_layer = out.set_index("layer")
        for layer in plan.layers:
            assert by_layer.loc[layer.name, "pred_out_var"] == pytest.approx(layer.pred_out_var)
            assert by_layer.loc[layer.name, "pred_in_grad_var"] == pytest.approx(layer.pred_in_grad_var)


def test_the_weight_layers_are_the_plans(report):
    for method, p in report.plans.items():
        sub = report.frame[report.frame["method"] == method]
        marked = list(dict.fromkeys(sub.loc[sub["weight_layer"], "layer"]))
        assert marked == [layer.name for layer in p.layers]
        assert set(sub.loc[~sub["weight_layer"], "kind"]).isdisjoint({"conv2d", "linear"})


def test_same_seed_same_draws_for_every_method(report):
    # Same seed, same normal draws: each method's weights are the others' scaled by the ratio of stds.
    w = report.frame[report.frame["quantity"] == "weight"].set_index(["method", "layer"])
    for layer in report.plans["xavier"].layers:
        sx, sk = report.plans["xavier"][layer.name].std, report.plans["kaiming-forward"][layer.name].std
        ratio = w.loc[("kaiming-forward", layer.name), "second_moment"] / w.loc[("xavier", layer.name), "second_moment"]
        assert ratio == pytest.approx((sk / sx) ** 2, rel=1e-5)
        q = w.loc[("kaiming-forward", layer.name), "q50"] / w.loc[("xavier", layer.name), "q50"]
        assert q == pytest.approx(sk / sx, rel=1e-5)
    # and the same batch: the first layer's input gradient aside, its output second moment scales the same way
    out = report.frame[report.frame["quantity"] == "output"].set_index(["method", "layer"])
    first = report.plans["xavier"].layers[0].name
    sx, sk = report.plans["xavier"][first].std, report.plans["kaiming-forward"][first].std
    ratio = out.loc[("kaiming-forward", first), "second_moment"] / out.loc[("xavier", first), "second_moment"]
    assert ratio == pytest.approx((sk / sx) ** 2, rel=1e-4)


# -- the page --------------------------------------------------------------------------------------

def test_page_is_self_contained(report):
    from initscope.plotting import web

    page = report.index.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    markup = outside_scripts(page)
    for forbidden in ("http://", "https://", "<link", "url(", "@import", "src=\"file:"):
        assert forbidden not in markup, forbidden
    # Scripts are inline: plotly.js (the installed package's own copy), the page's script, the figures' JSON;
    # none is fetched (the browser test checks that the page asks for nothing but itself).
    attributes = re.findall(r"<script\b([^>]*)>", page)
    assert attributes.count("") == 2 and all(a.startswith(' type="application/json" id="fig-') for a in attributes
                                             if a), attributes
    assert web.plotly_js().replace("</script", "<\\/script") in page
    assert [s["layout"]["title"]["text"] != "" for s in specs(page)] == [True] * 4
    srcs = imgs(markup)
    assert len(srcs) == len(report.figures)
    for src, (png, _svg) in zip(srcs, report.figures.values()):
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]) == png.read_bytes()
    for w, h in re.findall(r'width="(\d+)" height="(\d+)"', section(page, "figures")):
        assert int(w) > 0 and int(h) > 0


def test_page_header_says_what_was_run(report):
    run = section(report.index.read_text(encoding="utf-8"), "run")
    import initscope

    for label, value in (("model", "tiny_cnn"), ("methods", ", ".join(METHODS3)), ("input shape", "3 × 16 × 16"),
                         ("batch", "8"), ("seed", "3"), ("data", "Gaussian"), ("initscope", initscope.__version__)):
        assert re.search(rf"<th>{label}</th><td>[^<]*{re.escape(value)}", run), label
    assert re.search(r"<th>date</th><td>\d{4}-\d\d-\d\d \d\d:\d\d UTC", run)


def test_page_plan_tables(report):
    plans = section(report.index.read_text(encoding="utf-8"), "plans")
    blocks = plans.split("<details>")[1:]
    assert len(blocks) == len(METHODS3)
    for block, (method, plan) in zip(blocks, report.plans.items()):
        assert f"<summary>{method}</summary>" in block
        assert block.count("<tr>") == 1 + len(plan.layers)  # header + one per layer
        assert f">{plan.rows()[0][2]}<" in block  # the first layer's std, as the plan prints it


def test_flagged_rows_highlighted():
    frame = make_frame(methods=METHODS3, n_layers=5, flag_layer=2)
    png = base64.b64decode(
        "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==")
    page = render_page({"model": "m"}, frame, {}, [page_figure("t", "c", png)])
    check = section(page, "check")
    flagged_rows = re.findall(r'<tr class="flag">(.*?)</tr>', check)
    assert len(flagged_rows) == len(METHODS3)  # one flagged layer per method
    assert all(">features.4<" in r and 'class="off"' in r for r in flagged_rows)
    n_flagged = frame[frame["flagged"]].drop_duplicates(["method", "layer"]).shape[0]
    assert n_flagged == len(flagged_rows)
    # a layer with a non-finite value is highlighted even with its ratios in range
    bad = frame.copy()
    sel = (bad["layer"] == "features.0") & (bad["quantity"] == "output_grad")
    bad.loc[sel, "nonfinite"] = 7
    check = section(render_page({"model": "m"}, bad, {}, []), "check")
    rows = re.findall(r'<tr class="flag">(.*?)</tr>', check)
    assert len(rows) == 2 * len(METHODS3) and sum('>features.0<' in r and '>7<' in r for r in rows) == len(METHODS3)
    summary = section(render_page({"model": "m"}, bad, {}, []), "summary")
    assert summary.count('<tr class="flag">') == len(METHODS3)


def test_png_size():
    png = base64.b64decode(
        "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==")
    assert png_size(png) == (1, 1)
    with pytest.raises(ValueError, match="not a PNG"):
        png_size(b"GIF89a" + bytes(30))


# -- bad input loses nothing -----------------------------------------------------------------------

def test_parse_methods():
    assert parse_methods(" xavier, asv-backward ") == ["xavier", "asv-backward"]
    with pytest.raises(ValueError, match=r"\['he'\].*'kaiming-forward'"):
        parse_methods("xavier,he")
    with pytest.raises(ValueError, match="more than once"):
        parse_methods(["xavier", "xavier"])
    with pytest.raises(ValueError, match="no method"):
        parse_methods(",")


@pytest.mark.parametrize("kwargs,match", [
    ({"methods": "xavier,bogus"}, "unknown method"),
    ({"data": "imagenet"}, "data: unknown value 'imagenet'; valid: .*cifar10.*; or gaussian"),
    ({"data": "folder:/no/such/dir"}, "folder:/no/such/dir: no such directory"),
    ({"input_shape": (3, 0, 16)}, "positive sizes"),
    ({"batch": 0}, "batch=0"),
])
def test_compare_refuses_before_writing(tmp_path, kwargs, match):
    args = {"methods": "xavier", "input_shape": (3, 16, 16), "out_dir": tmp_path / "out"}
    args.update(kwargs)
    methods = args.pop("methods")
    with pytest.raises(ValueError, match=match):
        compare(tiny_cnn, methods, **args)
    assert not (tmp_path / "out").exists()


def test_compare_wants_a_factory_not_a_model(tmp_path):
    with pytest.raises(TypeError, match="fresh copy"):
        compare(tiny_cnn(), "xavier", input_shape=(3, 16, 16), out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


class _Raises(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.conv(x)
        if y.shape[-1] < 100:  # data-dependent: fx cannot trace it, and eager runs raise
            raise RuntimeError("boom inside forward")
        return y


def test_a_model_that_raises_writes_nothing(tmp_path):
    with pytest.raises(InitscopeError, match="_Raises"):
        compare(_Raises, "xavier", input_shape=(3, 8, 8), out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_unknown_model(tmp_path):
    result = runner.invoke(app, ["compare", "--model", "no_such_net", "--methods", "xavier", "--input-shape", "3,32,32",
                                 "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "unknown model" in result.output
    assert not (tmp_path / "o").exists()


def test_cli_unknown_method_lists_valid_ones(tmp_path):
    result = runner.invoke(app, ["compare", "--model", "plain34", "--methods", "xavier,he", "--input-shape", "3,32,32",
                                 "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "he" in result.output and all(m in result.output for m in METHODS)
    assert not (tmp_path / "o").exists()


def test_cli_writes_the_report(tmp_path):
    out = tmp_path / "cli"
    result = runner.invoke(app, ["compare", "--model", "probe_frames:tiny_cnn", "--methods", "xavier,lecun",
                                 "--input-shape", "3,12,12", "--batch", "4", "--data", "digits", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1] == str(out / "index.html")
    page = (out / "index.html").read_text(encoding="utf-8")
    assert "digits: the first 4 images" in section(page, "run") and len(imgs(page)) == len(FIGURES)
    frame = pd.read_parquet(out / "stats.parquet")
    assert set(frame["method"]) == {"xavier", "lecun"}


@pytest.mark.slow
def test_cli_plain34_end_to_end(tmp_path):
    out = tmp_path / "p34"
    result = runner.invoke(app, ["compare", "--model", "plain34", "--methods", "xavier,asv-backward",
                                 "--input-shape", "3,32,32", "--batch", "4", "--out", str(out)])
    assert result.exit_code == 0, result.output
    frame = pd.read_parquet(out / "stats.parquet")
    weight_layers = frame[frame["kind"].isin(["conv2d", "linear"])].groupby("method")["layer"].nunique()
    assert weight_layers.to_dict() == {"xavier": 34, "asv-backward": 34}
    page = (out / "index.html").read_text(encoding="utf-8")
    assert section(page, "check").count("<tr") == 2 * (1 + 34)


# -- where the batch comes from ----------------------------------------------------------------------

def test_gaussian_batch_is_seeded():
    a, b = load_batch(None, (3, 8, 8), 4, seed=1), load_batch("gaussian", (3, 8, 8), 4, seed=1)
    assert a.gaussian and torch.equal(a.inputs, b.inputs)
    assert torch.equal(a.inputs, torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1)))


def test_digits_batch():
    from initscope.experiments.data import load_data

    b = load_batch("digits", (3, 20, 24), 6, seed=0)
    assert b.inputs.shape == (6, 3, 20, 24) and not b.gaussian
    assert b.inputs.min() >= -1.0 and b.inputs.max() <= 1.0 and b.inputs.min() < -0.9
    assert torch.equal(b.inputs[:, 0], b.inputs[:, 2])  # grey repeated over channels
    train = load_data("digits", seed=0, image_size=(20, 24)).train
    assert torch.equal(b.inputs[:, :1], torch.stack([train[i][0] for i in range(6)]))
    # at the native 8x8 size, straight from scikit-learn: pixel/16 mapped to [-1, 1]
    from sklearn.datasets import load_digits

    native = load_batch("digits", (1, 8, 8), 2, seed=0).inputs
    first = load_data("digits", seed=0, image_size=(8, 8)).split_indices["train"][:2]
    expect = torch.as_tensor(load_digits().images[first], dtype=torch.float32)[:, None] / 16.0 * 2 - 1
    assert torch.allclose(native, expect)


def test_folder_batch(tmp_path):
    from PIL import Image

    for cls, value in (("a", 0), ("b", 255)):
        (tmp_path / cls).mkdir()
        for i in range(4):  # a 60/20/20 split needs 4 per class
            Image.new("RGB", (10 + i, 7), (value, value, value)).save(tmp_path / cls / f"{i}.png")
    b = load_batch(f"folder:{tmp_path}", (3, 5, 6), 10)
    assert b.inputs.shape == (8, 3, 5, 6)  # the whole source: 8 images
    per_image = b.inputs.flatten(1)
    assert torch.all(per_image.min(1).values == per_image.max(1).values)  # flat images stay flat
    assert sorted(per_image[:, 0].tolist()) == [-1.0] * 4 + [1.0] * 4
    assert "fewer than batch=10" in b.description
    with pytest.raises(ValueError, match="nope: no such directory"):
        load_batch(f"folder:{tmp_path / 'nope'}", (3, 5, 6), 3)
    with pytest.raises(ValueError, match=r"needs \(C, H, W\)"):
        load_batch("digits", (64,), 3)


def test_missing_torchvision_set_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="mnist"):
        load_batch("mnist", (1, 28, 28), 2, root=tmp_path)


def test_html_in_a_folder_path_is_text_on_the_compare_page(tmp_path):
    # issue 14, item 9: the compare page escapes what it shows (here a folder path holding <script>…</script>)
    from PIL import Image

    root = tmp_path / "<script>alert(1)<" / "script>"
    for c in ("ant", "bee"):
        (root / c).mkdir(parents=True)
        for i in range(5):
            Image.new("RGB", (8, 8), (40 * i, 10, 200 if c == "bee" else 0)).save(root / c / f"{i}.png")
    assert "<script>alert(1)</script>" in str(root)
    r = compare(tiny_cnn, "xavier", input_shape=(3, 8, 8), batch=4, data=f"folder:{root}", out_dir=tmp_path / "out")
    page = r.index.read_text(encoding="utf-8")
    # the page's own scripts are its only script elements; the path is text in the markup and in the figures' JSON
    assert "<script>alert(1)" not in page and "alert(1)</script>" not in page
    assert "<script" not in outside_scripts(page) and "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_compare_flags_by_the_plans_spread_and_averages_draws(tmp_path):
    # The README's command: no layer flagged that sits inside the plan's own spread; --draws narrows
    # the band by sqrt(draws) and averages the measurements.
    from initscope.compare import compare

    one = compare("plain34", "xavier,kaiming-forward,asv-backward", input_shape=(3, 64, 64), out_dir=tmp_path / "a")
    assert len(one.flagged()) == 0
    three = compare("plain34", "kaiming-forward", input_shape=(3, 32, 32), draws=3, out_dir=tmp_path / "b")
    rows = three.frame[(three.frame["quantity"] == "output") & three.frame["weight_layer"]]
    assert set(rows["draws"]) == {3}
    first = compare("plain34", "kaiming-forward", input_shape=(3, 32, 32), out_dir=tmp_path / "c")
    r1 = first.frame[(first.frame["quantity"] == "output") & first.frame["weight_layer"]]
    deep = rows["pred_out_spread"] > 0.5
    assert (rows.loc[deep, "flag_out_bits"].to_numpy() < r1.loc[deep.to_numpy(), "flag_out_bits"].to_numpy()).all()
    assert not (rows["second_moment"].to_numpy() == r1["second_moment"].to_numpy()).all()


def test_compare_announces_every_plan_and_draw(tmp_path):
    # A large model's probe takes a while: the bar advances per method's plan and per draw, and its total
    # (compare_steps) is exactly the number of announcements.
    from initscope.compare.run import compare_steps

    seen: list[str] = []
    compare(tiny_cnn, "xavier,kaiming-forward", input_shape=(3, 16, 16), batch=4, draws=3, out_dir=tmp_path,
            progress=seen.append)
    assert len(seen) == compare_steps(2, 3)
    assert seen[:4] == ["xavier: planning", "xavier: probing draw 1/3", "xavier: probing draw 2/3",
                        "xavier: probing draw 3/3"]
    assert seen[-1] == "drawing the report"
