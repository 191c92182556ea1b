"""Training: metrics against a direct computation, optimizers and schedules, the config, a short run end
to end, divergence as a result, bit-for-bit repeatability and resume on the CPU, the CLI."""

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from initscope.cli import app
from initscope.experiments.config import RunConfig
from initscope.experiments.training import RunResult, train
from initscope.experiments.training.metrics import classification_metrics
from initscope.experiments.training.optim import OPTIMIZERS, SCHEDULES, lr_at, make_optimizer

# tiny runs: 16x16 synthetic images, 200 train samples
TINY = dict(data="synthetic", image_size=16, limit=200, batch_size=32, device="cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


def _no_seconds(history):
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


def test_metrics_against_direct_computation():
    g = torch.Generator().manual_seed(0)
    k, n = 5, 300
    targets = torch.randint(0, k, (n,), generator=g)
    logits = torch.randn(n, k, generator=g) + 1.5 * torch.nn.functional.one_hot(targets, k)
    logits[:, 4] -= 100  # class 4 is never predicted: its precision counts as 0
    m = classification_metrics(logits, targets, k)
    pred = logits.argmax(1).numpy()
    t = targets.numpy()
    precision, recall, f1 = [], [], []
    for c in range(k):
        tp = np.sum((pred == c) & (t == c))
        fp = np.sum((pred == c) & (t != c))
        fn = np.sum((pred != c) & (t == c))
        p = tp / (tp + fp) if tp + fp else 0.0
        r = tp / (tp + fn) if tp + fn else 0.0
        precision.append(p)
        recall.append(r)
        f1.append(2 * p * r / (p + r) if p + r else 0.0)
    log_p = logits.double() - torch.logsumexp(logits.double(), 1, keepdim=True)
    assert m["accuracy"] == pytest.approx(np.mean(pred == t), abs=1e-6)
    assert m["precision"] == pytest.approx(np.mean(precision), abs=1e-6)
    assert m["recall"] == pytest.approx(np.mean(recall), abs=1e-6)
    assert m["f1"] == pytest.approx(np.mean(f1), abs=1e-6)
    assert m["loss"] == pytest.approx(float(-log_p[torch.arange(n), targets].mean()), rel=1e-5)
    assert precision[4] == 0 and m["accuracy"] != pytest.approx(m["recall"])  # macro is not micro here


def test_optimizers_and_schedules():
    params = [torch.nn.Parameter(torch.ones(3))]
    assert OPTIMIZERS == ("sgd", "sgd-nesterov", "adadelta", "adagrad", "rmsprop", "adam", "adamw")
    for name in OPTIMIZERS:
        opt = make_optimizer(name, params, lr=0.5, weight_decay=1e-4)
        assert opt.param_groups[0]["lr"] == 0.5
    nesterov = make_optimizer("sgd-nesterov", params, lr=0.1).param_groups[0]
    assert nesterov["momentum"] == 0.9 and nesterov["nesterov"]
    with pytest.raises(ValueError, match="valid: sgd, sgd-nesterov, adadelta"):
        make_optimizer("lamb", params, lr=0.1)
    assert SCHEDULES == ("constant", "step", "cosine")
    steps = [lr_at(e, 0.1, "step", step_epochs=(30, 60), step_gamma=0.1) for e in (0, 29, 30, 59, 60, 99)]
    assert steps == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    assert lr_at(5, 0.2, "cosine", epochs=10) == pytest.approx(0.2 * 0.5 * (1 + math.cos(math.pi / 2)))
    assert lr_at(0, 0.2, "cosine", epochs=10) == 0.2 and lr_at(7, 0.2) == 0.2
    with pytest.raises(ValueError, match="valid: constant, step, cosine"):
        lr_at(0, 0.1, "linear")


def test_run_config_id_and_dict():
    a = RunConfig(lr=1, step_epochs=[3, 6])
    b = RunConfig.from_dict({**a.to_dict(), "device": "cuda"})
    assert a.run_id == b.run_id and len(a.run_id) == 12  # the device does not change the result
    assert RunConfig(lr=1.0, step_epochs=(3, 6)).run_id == a.run_id  # 1 and 1.0 are one run
    assert RunConfig(seed=1).run_id != RunConfig(seed=0).run_id
    assert json.loads(json.dumps(a.to_dict())) == a.to_dict()
    with pytest.raises(ValueError, match=r"unknown RunConfig key\(s\) 'learning_rate'.*valid: data, data_root"):
        RunConfig.from_dict({"learning_rate": 0.1})
    with pytest.raises(ValueError, match="valid: sgd"):
        train(RunConfig(optimizer="lamb"), progress=False)  # refused before any data or model is made


def test_short_run_end_to_end(tmp_path):
    rows = []
    config = RunConfig(model="resnet18", width=8, epochs=3, method="kaiming-forward", lr=3e-3, **TINY)
    r = train(config, out_dir=tmp_path, progress=False, on_epoch=rows.append)
    assert isinstance(r, RunResult) and r.status == "finished" and r.error is None and r.diverged_epoch is None
    assert [h["epoch"] for h in r.history] == [1, 2, 3] and rows == r.history
    assert set(r.history[0]) == {"epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "seconds"}
    assert r.history[-1]["train_loss"] < r.history[0]["train_loss"]
    val = [h["val_accuracy"] for h in r.history]
    assert r.best_epoch == 1 + val.index(max(val)) and max(val) > 0.2  # learns: chance is 0.1
    assert set(r.test) == {"accuracy", "precision", "recall", "f1", "loss"}
    assert all(0 <= r.test[k] <= 1 for k in ("accuracy", "precision", "recall", "f1"))
    assert r.checkpoint == tmp_path / r.run_id / "best.safetensors" and r.checkpoint.exists()
    weights = load_file(str(r.checkpoint))
    assert "conv1.weight" in weights and weights["fc.weight"].shape == (10, 512 // 8)
    saved = json.loads((tmp_path / r.run_id / "result.json").read_text())
    assert saved["status"] == "finished" and saved["test"] == pytest.approx(r.test)
    assert not list((tmp_path / r.run_id).glob("*.tmp"))  # atomic writes left no temporary file


def test_divergence_is_a_result():
    rows = []
    r = train(RunConfig(model="plain34", width=4, epochs=3, optimizer="sgd", lr=1e30, **TINY),
              progress=False, on_epoch=rows.append)
    assert r.status == "diverged" and r.diverged_epoch == 1
    assert r.history == [] == rows and r.test == {} and r.checkpoint is None and r.best_epoch is None


def test_bit_for_bit_on_the_cpu_and_resume_after_a_kill(tmp_path):
    config = RunConfig(model="plain34", width=4, epochs=2, method="asv-backward", optimizer="sgd-nesterov",
                       lr=0.01, **TINY)
    a = train(config, progress=False)
    b = train(config, progress=False)
    assert _no_seconds(a.history) == _no_seconds(b.history) and a.test == b.test

    class Killed(Exception):
        pass

    def kill_after_first(row):
        if row["epoch"] == 1:
            raise Killed

    with pytest.raises(Killed):
        train(config, out_dir=tmp_path, progress=False, on_epoch=kill_after_first)
    assert (tmp_path / config.run_id / "state.pt").exists()
    resumed_rows = []
    c = train(config, out_dir=tmp_path, progress=False, on_epoch=resumed_rows.append)
    assert [h["epoch"] for h in resumed_rows] == [2]  # epoch 1 was not run again
    assert _no_seconds(c.history) == _no_seconds(a.history) and c.test == a.test


def test_checkpoints_are_written_beside_training_and_each_row_follows_its_checkpoint(tmp_path, monkeypatch):
    # The checkpoint of a short epoch cost a tenth of it (benchmarks/train_speed.py: 0.90x a bare loop): it is
    # written on a thread of its own while the next epoch trains. A row handed to on_epoch (which a sweep
    # stores, and a resumed run then takes as done) must still find its own epoch's state on the disk.
    import threading

    from initscope.experiments.training import checkpoint

    writers, real = [], checkpoint.atomic_write

    def spy(path, data):
        writers.append(threading.current_thread().name)
        return real(path, data)

    monkeypatch.setattr(checkpoint, "atomic_write", spy)
    config = RunConfig(model="plain34", width=4, epochs=3, **TINY)
    run_dir = tmp_path / config.run_id
    seen = []

    def on_epoch(row):
        state = checkpoint.load_state(run_dir / "state.pt")
        best = checkpoint.read_weights(run_dir / "best.safetensors")[1]["epoch"]
        seen.append((row["epoch"], state["epoch"], state["best_epoch"], best))

    r = train(config, out_dir=tmp_path, progress=False, on_epoch=on_epoch)
    assert [s[0] for s in seen] == [1, 2, 3] and all(e == s for e, s, _, _ in seen), seen
    assert all(b == f for _, _, b, f in seen), seen  # the best file is the one its state names
    assert writers and all(n.startswith("initscope-checkpoint") for n in writers), writers
    assert r.best_epoch == seen[-1][2] and set(r.test) == {"accuracy", "precision", "recall", "f1", "loss"}


def test_a_background_write_runs_its_follow_up_on_the_caller_and_raises_there():
    import threading

    from initscope.fileio import BackgroundWriter

    done, gate = [], threading.Event()
    with BackgroundWriter() as w:
        w.submit(gate.wait, then=lambda: done.append(threading.current_thread().name))
        w.poll()
        assert done == []  # the write is held up: its follow-up waits, and poll does not block
        gate.set()
        w.wait()
        assert done == [threading.current_thread().name]

        def full():
            raise OSError(28, "No space left on device")

        w.submit(full, then=lambda: done.append("never"))
        with pytest.raises(OSError, match="No space"):
            w.wait()
        assert done[-1] != "never"
    # a run failing already: the write in flight ends, its follow-up is dropped, the error is the run's
    with pytest.raises(KeyError):
        with BackgroundWriter() as w:
            w.submit(lambda: None, then=lambda: done.append("dropped"))
            raise KeyError("the run's own error")
    assert "dropped" not in done


def test_probe_frame_beside_the_results(tmp_path):
    pd = pytest.importorskip("pandas")
    config = RunConfig(model="plain34", width=4, epochs=1, probe_every=3, **TINY)  # 7 steps: probes at 0, 3, 6
    r = train(config, out_dir=tmp_path, progress=False)
    frame = pd.read_parquet(tmp_path / r.run_id / "probe.parquet")
    assert sorted(frame["step"].unique()) == [0, 3, 6, 7]  # and once more after the last step (7)
    assert r.status == "finished"


def test_the_end_probe_runs_in_training_mode_and_leaves_the_running_statistics(tmp_path, monkeypatch):
    # A BatchNorm net probed after its last step: in eval mode the probe would plan the trained model
    # again, and set eval-mode predictions beside the training-mode ones of every earlier probe; in
    # training mode the batch moves the running statistics that the test then reads, unless put back.
    from initscope.experiments.training import loop
    from initscope.probe import callback

    seen = {"modes": []}
    real_probe, real_end = callback.probe, loop._probe_at_end

    def probe_spy(model, *args, **kwargs):
        seen["modes"].append(model.training)
        return real_probe(model, *args, **kwargs)

    def end_spy(probe, step, model, x, y):
        before = {n: b.clone() for n, b in model.named_buffers()}
        seen["before"] = model.training
        real_end(probe, step, model, x, y)
        seen["after"] = model.training
        seen["running"] = [n for n in before if n.endswith("running_var")]
        seen["moved"] = [n for n, b in model.named_buffers() if not torch.equal(b, before[n])]

    monkeypatch.setattr(callback, "probe", probe_spy)
    monkeypatch.setattr(loop, "_probe_at_end", end_spy)
    config = RunConfig(model="mobilenet_v1", width=4, epochs=1, probe_every=5, **TINY)  # 5 steps: 0, and the end
    r = train(config, out_dir=tmp_path, progress=False)
    assert r.status == "finished"
    assert seen["modes"] and all(seen["modes"]), seen["modes"]  # every probe, the last one too, in training mode
    assert seen["before"] is False and seen["after"] is False  # the mode put back as it was
    assert seen["running"] and seen["moved"] == []


def test_train_command(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["train", "--data", "synthetic", "--image-size", "16", "--limit", "64",
                                 "--model", "plain34", "--width", "4", "--epochs", "1", "--device", "cpu",
                                 "--out", str(tmp_path), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "test (best validation epoch 1)" in result.output
    assert len(list(tmp_path.glob("*/result.json"))) == 1
    bad = runner.invoke(app, ["train", "--optimizer", "lamb", "--out", str(tmp_path)])
    assert bad.exit_code == 2 and "valid: sgd" in bad.output


def test_a_method_that_needs_data_is_planned_on_the_first_train_batch(monkeypatch):
    from types import SimpleNamespace

    import initscope
    from initscope.experiments.training import loop

    seen = []
    real = initscope.init_

    def init_(model, method, **kw):
        seen.append(kw)
        return real(model, method, **kw)

    monkeypatch.setattr(initscope, "init_", init_)
    train(RunConfig(model="plain34", width=4, epochs=1, method="xavier", **TINY), progress=False)
    assert seen[-1]["input_shape"] == (3, 16, 16) and "example_input" not in seen[-1]
    # xavier as the loop would see a method that sets its scale on data (LSUV)
    monkeypatch.setattr(loop, "METHODS", {"xavier": SimpleNamespace(needs_data=True)})
    r = train(RunConfig(model="plain34", width=4, epochs=1, method="xavier", **TINY), progress=False)
    batch = seen[-1]["example_input"]
    assert "input_shape" not in seen[-1] and batch.shape == (32, 3, 16, 16) and batch.device.type == "cpu"
    from initscope.experiments.data import load_data

    train_x = load_data("synthetic", seed=0, image_size=16, limit=200).train.tensors[0]
    assert torch.equal(batch, train_x[:32]) and r.status == "finished"


def test_a_run_notes_weights_that_adams_first_steps_swamp(tmp_path):
    # asv-backward with the scale policy puts a BatchNorm-free ResNet's branch ends at std ~0.01: Adam
    # at 1e-3 moves each of their weights by ~1e-3 per step, over 10 % of its scale. Fixup's zero branch
    # ends are meant to start at zero, and SGD's steps follow the gradient: neither is noted.
    from initscope import models
    from initscope.experiments.training.optim import first_step, small_weights_note

    import initscope

    model = models.create("resnet20", width=16, in_channels=1, num_classes=10, norm="none", fixup_scalars=True)
    initscope.init_(model, "asv-backward", input_shape=(1, 32, 32), residual="scale",
                    generator=torch.Generator().manual_seed(0))
    note = small_weights_note(model, "adam", 1e-3)
    assert note is not None and "layer3.0.conv2" in note and "0.001 per step" in note
    assert small_weights_note(model, "adam", 1e-5) is None  # every std is above 10 x 1e-5
    assert small_weights_note(model, "sgd-nesterov", 1e-3) is None and first_step("sgd", 0.1) is None
    assert first_step("rmsprop", 1e-3) == pytest.approx(1e-2)  # g / sqrt((1 - 0.99) g^2)
    # what Adam's first update actually is, for a weight far smaller than lr: about lr
    w = torch.nn.Parameter(torch.full((4, 4), 1e-4))
    opt = torch.optim.Adam([w], lr=1e-3)
    w.grad = torch.randn(4, 4).sign() * 1e-5  # any size well above Adam's eps (1e-8)
    before = w.detach().clone()
    opt.step()
    assert torch.allclose((w.detach() - before).abs(), torch.full((4, 4), 1e-3), rtol=0.02)

    initscope.init_(model, "fixup", input_shape=(1, 32, 32), generator=torch.Generator().manual_seed(0))
    fixup = small_weights_note(model, "adam", 1e-3) or ""
    assert "layer3.0.conv2" not in fixup  # zero at init: meant to start there

    config = RunConfig(model="resnet20", width=16, norm="none", fixup_scalars=True, method="asv-backward",
                       residual="scale", optimizer="adam", lr=1e-3, epochs=1, **TINY)
    r = train(config, out_dir=tmp_path, progress=False)
    assert any("adam moves every weight" in n for n in r.notes)
