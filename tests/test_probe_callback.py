"""ProbeCallback: every N steps of a short SGD run, to its table and to a TensorBoard event file."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

import initscope
from initscope.probe import COLUMNS, summarize


def _tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(4 * 5 * 5, 3))


def _batches(n):
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 3, 5, 5, generator=gen), torch.randint(0, 3, (4,), generator=gen)) for _ in range(n)]


def _no_hooks(model):
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_separate_pass_every_n_steps_to_tensorboard(tmp_path):
    model = _tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = nn.CrossEntropyLoss()
    callback = initscope.ProbeCallback(every=2, writer=tmp_path / "tb")
    probes = {}
    for step, (x, y) in enumerate(_batches(5)):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        result = callback(step, model, x, y, loss_fn)
        assert (result is not None) == (step % 2 == 0)
        if result is not None:
            probes[step] = result
            # The probe's own pass leaves the training's .grad alone.
            assert all(torch.equal(p.grad, grads[n]) for n, p in model.named_parameters())
            assert result["0"].stats["weight"].mean == pytest.approx(float(model[0].weight.detach().double().mean()), rel=1e-9)
    callback.close()
    assert _no_hooks(model)

    frame = callback.frame()
    assert list(frame.columns) == ["step", *COLUMNS]
    assert sorted(frame["step"].unique()) == [0, 2, 4]
    assert len(frame) == sum(len(p.to_frame()) for p in probes.values())

    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"histograms": 0, "scalars": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    assert "probe_histogram/output/0" in tags["histograms"] and "probe_histogram/weight_grad/3" in tags["histograms"]
    hist = acc.Histograms("probe_histogram/activation/0")
    assert [h.step for h in hist] == [0, 2, 4]
    for h in hist:
        s = probes[h.step]["0"].stats["activation"]
        assert list(h.histogram_value.bucket) == list(s.hist_counts)
        assert h.histogram_value.min == pytest.approx(s.min) and h.histogram_value.max == pytest.approx(s.max)
        edges = np.linspace(s.hist_lo, s.hist_hi, len(s.hist_counts) + 1)[1:]
        np.testing.assert_allclose(h.histogram_value.bucket_limit, edges, rtol=1e-6)
    sm = acc.Scalars("probe/output_grad/3")
    assert [e.step for e in sm] == [0, 2, 4]
    for e in sm:
        assert e.value == pytest.approx(probes[e.step]["3"].stats["output_grad"].second_moment, rel=1e-6)
    sm = acc.Scalars("probe/input_grad/0")
    assert [e.value for e in sm] == pytest.approx([probes[s]["0"].meas_in_grad_var for s in (0, 2, 4)], rel=1e-6)
    # Charts by quantity, layers together: 406 charts for a width-16 plain34 were one per tag.
    assert "probe/depth" in tags["images"]


def test_tensorboard_groups_charts_and_logs_predictions(tmp_path):
    from tensorboard.plugins.custom_scalar import layout_pb2, metadata

    model = _tiny()
    plan = initscope.init_(model, "kaiming-forward", input_shape=(3, 5, 5))
    callback = initscope.ProbeCallback(every=1, writer=tmp_path / "tb")
    x, _ = _batches(1)[0]
    result = callback(0, model, x)
    callback.close()
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    ratio = acc.Scalars("probe/log2_ratio_output/3")[0].value
    assert ratio == pytest.approx(np.log2(result["3"].meas_out_var / plan["3"].pred_out_var), rel=1e-6)
    layout = layout_pb2.Layout()
    layout.ParseFromString(acc.Tensors(metadata.CONFIG_SUMMARY_TAG)[0].tensor_proto.string_val[0])
    charts = [c.title for cat in layout.category for c in cat.chart]
    assert {"output", "input_grad", "weight"} <= set(charts)
    assert len(charts) == len(set(callback.quantities)) + 2  # one per quantity, one per ratio


def test_in_step_watch_uses_the_training_pass(tmp_path):
    model = _tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = nn.CrossEntropyLoss()
    callback = initscope.ProbeCallback(every=3, quantities=["output", "activation", "output_grad", "weight_grad"])
    seen = []
    for step, (x, y) in enumerate(_batches(7)):
        opt.zero_grad()
        with callback.watch(model, step) as watch:
            out = model(x)
            out.retain_grad()
            loss_fn(out, y).backward()
        assert _no_hooks(model)
        if step % 3 == 0:
            p = watch.probe
            seen.append(step)
            g = model[0].weight.grad.double().numpy()
            assert p["0"].stats["weight_grad"].second_moment == pytest.approx(np.mean(g * g), rel=1e-9)
            og = out.grad.double().numpy()
            assert p["3"].stats["output_grad"].second_moment == pytest.approx(np.mean(og * og), rel=1e-9)
            assert p["0"].stats["activation"].zero_frac > 0
            assert "input_grad" not in p["0"].stats  # not asked for (and the batch does not require grad)
        else:
            assert watch.probe is None
        opt.step()
    frame = callback.frame()
    assert sorted(frame["step"].unique()) == seen == [0, 3, 6]
    assert set(frame["quantity"]) == {"output", "activation", "output_grad", "weight_grad"}
    path = callback.save(tmp_path / "run.parquet")
    back = initscope.Probe.load(path)
    assert back["step"].tolist() == frame["step"].tolist()


def test_watch_removes_hooks_when_the_step_fails():
    model = _tiny()
    callback = initscope.ProbeCallback(every=1)
    with pytest.raises(RuntimeError, match="channels"):
        with callback.watch(model, 0):
            model(torch.randn(2, 5, 5, 5))
    assert _no_hooks(model) and callback.frame().empty
    # Attach twice without collecting is refused; collect on the wrong step too.
    assert callback.attach(model, 1)
    with pytest.raises(RuntimeError, match="attached already"):
        callback.attach(model, 2)
    with pytest.raises(RuntimeError, match="collected at step 2"):
        callback.collect(2)
    callback.detach()
    assert _no_hooks(model)


def test_bad_arguments():
    with pytest.raises(ValueError, match="every"):
        initscope.ProbeCallback(every=0)
    with pytest.raises(ValueError, match="unknown quantities"):
        initscope.ProbeCallback(quantities=["activations"])


def test_noise_loss_when_no_targets():
    model = _tiny()
    callback = initscope.ProbeCallback(every=1)
    p = callback(0, model, torch.randn(4, 3, 5, 5), None, None)
    direct = initscope.probe(model, torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(9)))
    assert p["3"].stats["output_grad"].count == direct["3"].stats["output_grad"].count == 12
    s = summarize(torch.randn(12, generator=torch.Generator().manual_seed(0)))
    assert p["3"].stats["output_grad"].second_moment == pytest.approx(s.second_moment, rel=1e-6)
