"""The probe inside Lightning, and on Weights & Biases (each skipped when its extra is not installed)."""

import math

import pytest
import torch
from torch import nn

import initscope


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))


def test_lightning_callback_probes_the_steps_own_pass(tmp_path):
    L = pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from initscope.integrations.lightning import InitscopeCallback

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _net()
            self.plan = initscope.init_(self.net, "kaiming-forward", input_shape=(3, 6, 6))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    g = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(32, 3, 6, 6, generator=g), torch.randint(0, 4, (32,), generator=g))
    callback = InitscopeCallback(every=2)
    trainer = L.Trainer(max_steps=5, callbacks=[callback], logger=TensorBoardLogger(tmp_path), enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", default_root_dir=tmp_path, enable_checkpointing=False)
    module = Module()
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=8))
    frame = callback.frame()
    assert sorted(frame["step"].unique()) == [0, 2, 4]
    layers = set(frame["layer"])
    assert layers == {"0", "3"}  # the planned network's names, not the LightningModule's
    row = frame[(frame["step"] == 0) & (frame["layer"] == "3") & (frame["quantity"] == "output")].iloc[0]
    assert row["pred_out_var"] == pytest.approx(module.plan["3"].pred_out_var)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in module.modules())
    acc = EventAccumulator(str(tmp_path / "lightning_logs" / "version_0"), size_guidance={"scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("probe/output/3")] == [0, 2, 4]


def test_wandb_sink_logs_charts_across_depth(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    from initscope.probe.sinks import WandbSink

    class Run:  # stands in for a wandb run: the sink only calls log
        def __init__(self):
            self.logged = []

        def log(self, data, step=None):
            self.logged.append((step, data))

    run = Run()
    model = _net()
    plan = initscope.init_(model, "asv-backward", input_shape=(3, 6, 6))
    callback = initscope.ProbeCallback(every=1, writer=WandbSink(run))
    result = callback(0, model, torch.randn(8, 3, 6, 6))
    step, data = run.logged[0]
    assert step == 0
    assert {"probe/output", "probe/input_grad", "probe/log2_ratio"} <= set(data)
    assert isinstance(data["probe_histogram/output/0"], wandb.Histogram)
    table = data["probe/output"].table  # the line chart's data: measured and predicted across layers
    rows = [r for r in table.data if r[1] == "predicted"]
    assert [r[2] for r in rows] == pytest.approx([plan[l.name].pred_out_var for l in result.layers])
    with pytest.raises(ValueError, match="wandb.init"):
        monkeypatch.setattr(wandb, "run", None)
        WandbSink()
