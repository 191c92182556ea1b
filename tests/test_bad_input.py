"""Bad input, each a clear error before anything trains or an item skipped by name, never a crash in the
middle or a silently wrong number: unknown config keys and values, a missing or empty dataset, corrupt
and truncated images, mixed image modes, a class too small to split, NaN in the data, a model that
torch.fx cannot trace; batches of one through BatchNorm, non-finite and negative settings, a device this
machine lacks, a folder with one class; damaged, foreign and misplaced databases and TOML files, read-only
mounts, --threads 0; and brackets in paths, messages and help that rich would have read as markup."""

import io
import math
import re
import sqlite3
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from initscope.cli import app
from initscope.errors import InitscopeError
from initscope.experiments.config import RunConfig, SweepConfig
from initscope.experiments.data import SOURCES, Images, clear_cache, load_data, min_per_class
from initscope.experiments.data.splits import class_counts
from initscope.experiments.engines import run_sweep
from initscope.experiments.store import Store
from initscope.experiments.training import train


def forget_loaded_data():
    """load_data caches by its arguments; a test that changes a folder (or the loader) under it starts afresh."""
    clear_cache()


class Invoked:
    """A CLI call's exit code and its output with the console's line wrapping undone."""

    def __init__(self, *args):
        r = CliRunner().invoke(app, [str(a) for a in args])
        self.exit_code, self.output = r.exit_code, " ".join(r.output.split())


invoke = Invoked


def write_classes(root: Path, n_per_class=5, classes=("ant", "bee"), size=(8, 8)):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


# -- configuration --------------------------------------------------------------------------------------


def test_config_with_unknown_key_or_value_names_it_and_lists_the_valid(tmp_path):
    toml = tmp_path / "s.toml"
    toml.write_text('[grid]\nmethod = ["xavier"]\n[run]\nepoch = 3\n')
    r = invoke("sweep", toml, "--db", tmp_path / "r.db")
    assert r.exit_code == 2 and "unknown key 'epoch'" in r.output and "epochs" in r.output.split("valid:")[1]
    toml.write_text('[grid]\nmethod = ["xavier", "he-normal"]\n')
    r = invoke("sweep", toml, "--db", tmp_path / "r.db")
    assert r.exit_code == 2 and "unknown value 'he-normal'" in r.output and "kaiming-forward" in r.output
    assert not (tmp_path / "r.db").exists()  # refused before the store was touched
    r = invoke("sweep", "--methods", "xavier", "--engine", "spark", "--db", tmp_path / "r.db")
    assert r.exit_code == 2 and "unknown engine 'spark'; valid: local, ray" in r.output
    r = invoke("train", "--optimizer", "adamx", "--out", tmp_path / "runs")
    assert r.exit_code == 2 and "optimizer: unknown value 'adamx'; valid: sgd" in r.output
    with pytest.raises(ValueError, match=r"unknown RunConfig key\(s\) 'lrr'; valid: data, .*lr"):
        RunConfig.from_dict({"lrr": 0.1})


# -- the dataset's path ---------------------------------------------------------------------------------


def test_dataset_path_missing_or_empty(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        load_data(f"folder:{tmp_path / 'missing'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no class sub-folders \(expected PATH/<class>/<image>\)"):
        load_data(f"folder:{tmp_path / 'empty'}")
    (tmp_path / "no-images" / "ant").mkdir(parents=True)
    (tmp_path / "no-images" / "ant" / "readme.txt").write_text("text")
    with pytest.raises(ValueError, match=r"no images \(.png.*\) under ant"):
        load_data(f"folder:{tmp_path / 'no-images'}")
    # the sweep refuses a missing folder before it opens the store; a run on an empty one fails by name
    r = invoke("sweep", "--data", f"folder:{tmp_path / 'missing'}", "--db", tmp_path / "r.db")
    assert r.exit_code == 2 and "missing: no such directory" in r.output and not (tmp_path / "r.db").exists()
    r = invoke("train", "--data", f"folder:{tmp_path / 'empty'}", "--out", tmp_path / "runs")
    assert r.exit_code == 2 and "no class sub-folders" in r.output


# -- images ---------------------------------------------------------------------------------------------


def test_corrupt_and_truncated_images_are_skipped_and_named(tmp_path):
    root = write_classes(tmp_path / "imgs")
    (root / "ant" / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    (root / "bee" / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])  # truncated mid-scan
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 7, np.uint8)).save(buf, "PNG")
    (root / "bee" / "cut.png").write_bytes(buf.getvalue()[:40])  # header only
    (root / "bee" / "empty.png").write_bytes(b"")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        d = load_data(f"folder:{root}", seed=0)
    bad = sorted(str(root / p) for p in ("ant/garbage.png", "bee/cut.jpg", "bee/cut.png", "bee/empty.png"))
    assert sorted(d.skipped) == bad
    named = " ".join(str(w.message) for w in caught)
    assert all(f"skipping unreadable image {p}" in named for p in bad)
    assert len(d.train) + len(d.val) + len(d.test) == 10 and len(d.files) == 10
    assert not any(f.endswith(("garbage.png", "cut.jpg", "cut.png", "empty.png")) for f in d.files)


def test_mixed_modes_become_rgb_with_the_right_values(tmp_path):
    root = tmp_path / "modes"
    pixels = {}  # file -> the RGB values it must load as
    for c in ("ant", "bee"):
        (root / c).mkdir(parents=True)
        for i, mode in enumerate(["L", "RGB", "RGBA", "P", "L"]):
            v = 20 + 40 * i + (7 if c == "bee" else 0)
            if mode == "L":
                im, rgb = Image.new("L", (6, 6), v), (v, v, v)
            elif mode == "RGB":
                im, rgb = Image.new("RGB", (6, 6), (v, 255 - v, 3)), (v, 255 - v, 3)
            elif mode == "RGBA":  # the alpha channel is dropped, the colour kept
                im, rgb = Image.new("RGBA", (6, 6), (v, 9, 255 - v, 100)), (v, 9, 255 - v)
            else:  # a palette image: its colours looked up
                im = Image.new("P", (6, 6), 1)
                im.putpalette([0, 0, 0, v, 2 * v % 256, 50] + [0] * 762)
                rgb = (v, 2 * v % 256, 50)
            im.save(root / c / f"{i}_{mode}.png")
            pixels[f"{c}/{i}_{mode}.png"] = rgb
    d = load_data(f"folder:{root}", seed=0)
    assert d.in_channels == 3 and d.input_shape == (3, 6, 6) and not d.skipped
    for split in ("train", "val", "test"):
        x, _ = getattr(d, split).tensors
        for j, i in enumerate(d.split_indices[split]):
            expected = torch.tensor(pixels[d.files[i]], dtype=torch.float32) / 255 * 2 - 1  # minus-one-one
            assert torch.allclose(x[j], expected.view(3, 1, 1).expand(3, 6, 6), atol=1e-6), d.files[i]


def test_a_class_too_small_to_split_is_refused_by_name(tmp_path):
    root = write_classes(tmp_path / "imgs")
    (root / "cat").mkdir()
    Image.new("RGB", (8, 8), 3).save(root / "cat" / "only.png")
    with pytest.raises(ValueError, match=r"too few readable images: 'cat' \(1\); a 60/20/20 split needs at least 4"):
        load_data(f"folder:{root}")
    # three more images: now every split holds the class once at least
    for i in range(3):
        Image.new("RGB", (8, 8), 10 * i).save(root / "cat" / f"{i}.png")
    forget_loaded_data()  # load_data caches by path: the folder changed under it
    d = load_data(f"folder:{root}")
    for split in ("train", "val", "test"):
        assert torch.bincount(getattr(d, split).tensors[1], minlength=3).min() >= 1
    # the rule is the split's own rounding: the smallest class size that fills every part
    assert min_per_class((0.6, 0.2, 0.2)) == 4 and class_counts(3, (0.6, 0.2, 0.2))[-1] == 0
    assert min_per_class((0.5, 0.5)) == 2 and min_per_class((1.0, 0.0)) == 1
    # a class whose images are all unreadable counts as empty
    (root / "dog").mkdir()
    (root / "dog" / "x.png").write_bytes(b"nope")
    forget_loaded_data()
    with pytest.warns(UserWarning, match="x.png"), pytest.raises(ValueError, match=r"'dog' \(0\)"):
        load_data(f"folder:{root}")


def test_nan_in_the_data_is_refused_naming_the_image(tmp_path, monkeypatch):
    source = SOURCES["synthetic"]
    real = source.load

    def with_nan(arg, **kw):
        images = real(arg, **kw)
        x = images.x.clone()
        x[17, 0, 2, 3] = float("nan")
        x[40, 1] = float("inf")
        return Images(x, images.y, images.class_names)

    monkeypatch.setattr(source, "load", with_nan)
    forget_loaded_data()
    try:
        with pytest.raises(ValueError, match="synthetic: 2 image\\(s\\) hold NaN or inf values, the first is image 17"):
            load_data("synthetic", image_size=9)
        # in a sweep the run is failed with that reason (not 'diverged', which would blame the initialization)
        sweep = SweepConfig(grid={"method": ["xavier"]}, fixed={"data": "synthetic", "image_size": 9, "width": 4,
                                                                "epochs": 1, "limit": 32},
                            db=tmp_path / "r.db", out=tmp_path / "runs")
        assert run_sweep(sweep, progress=False).ran == {"failed": 1}
        with Store(sweep.db) as s:
            (row,) = s.runs()
            assert row["status"] == "failed" and "hold NaN or inf values, the first is image 17" in row["error"]
    finally:
        forget_loaded_data()


def test_a_model_fx_cannot_trace_is_a_clear_error(tmp_path, monkeypatch):
    (tmp_path / "untraceable_net.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        class Gate(nn.Module):
            def __init__(self, num_classes=10):
                super().__init__()
                self.conv = nn.Conv2d(3, 8, 3, padding=1)
                self.fc = nn.Linear(8, num_classes)

            def forward(self, x):
                x = self.conv(x)
                if x.mean() > 0:  # control flow on a tensor's value: torch.fx cannot trace it
                    x = torch.relu(x)
                return self.fc(x.mean((2, 3)))

        def make(num_classes=10, **kw):
            return Gate(num_classes)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = RunConfig(data="synthetic", model="untraceable_net:make", epochs=1, limit=32, width=4)
    with pytest.raises(InitscopeError) as info:
        train(cfg, progress=False)
    msg = str(info.value)
    assert "torch.fx cannot trace Gate" in msg and "control flow" in msg
    assert "What to do" in msg and "register_rule" in msg


# -- configurations that cannot train (issue 14, items 3, 5, 6) ------------------------------------------


def test_batch_size_1_trains_without_batchnorm_and_is_refused_with_it(tmp_path):
    # The repro: `--batch-size 1` dropped every one-sample batch, trained nothing (train_loss 0.0) and was
    # recorded `finished`. plain34 has no BatchNorm: every sample is a step now.
    cfg = RunConfig(data="synthetic", model="plain34", width=4, epochs=1, limit=64, image_size=16, batch_size=1,
                    device="cpu")
    steps = []
    real = torch.optim.Adam.step

    def counted(self, *a, **kw):
        steps.append(1)
        return real(self, *a, **kw)

    torch.optim.Adam.step = counted
    try:
        result = train(cfg, progress=False)
    finally:
        torch.optim.Adam.step = real
    assert result.status == "finished" and len(steps) == 64 and result.history[0]["train_loss"] > 0.1
    # BatchNorm in train mode is the real constraint: refused before the sweep starts, saying so
    r = invoke("sweep", "--data", "synthetic", "--model", "resnet18", "--width", "4", "--limit", "64", "--methods",
               "xavier", "--epochs", "1", "--batch-size", "1", "--db", tmp_path / "r.db", "--out", tmp_path / "runs",
               "--threads", "1")
    assert r.exit_code == 2 and "batch_size 1" in r.output and "BatchNorm" in r.output and "--norm none" in r.output
    assert "normalizes each channel over the batch" in r.output
    assert not (tmp_path / "r.db").exists()  # before the store was opened
    r = invoke("train", "--data", "synthetic", "--model", "resnet18", "--width", "4", "--batch-size", "1",
               "--out", tmp_path / "runs")
    assert r.exit_code == 2 and "BatchNorm" in r.output
    with pytest.raises(InitscopeError, match="BatchNorm"):  # and from Python
        train(RunConfig(data="synthetic", model="resnet18", width=4, epochs=1, limit=1, device="cpu"), progress=False)


@pytest.mark.parametrize("key,value,message", [
    ("lr", float("inf"), "lr: inf is not a finite number"),
    ("step_gamma", float("nan"), "step_gamma: nan is not a finite number"),
    ("weight_decay", float("nan"), "weight_decay: nan is not a finite number"),
    ("step_epochs", (30, -1), "step_epochs: -1 must be >= 0"),
    ("norm", "group", "norm: unknown value 'group'; valid: default, none"),
    ("head", "mlp", "head: unknown value 'mlp'; valid: default, paper"),
    ("device", "tpu", "device: unknown value 'tpu'; valid: auto, cpu"),
    ("device", "meta", "device: unknown value 'meta'; valid: auto, cpu"),
])
def test_every_field_is_checked_before_any_run(tmp_path, key, value, message):
    # The repro: lr = inf and step_gamma = nan ended runs as `diverged` (the init's fault, never retried);
    # weight_decay = nan and negative step_epochs were accepted; norm, head, device failed each run.
    with pytest.raises(InitscopeError, match=re.escape(message)):
        RunConfig(**{key: value})
    toml = tmp_path / "s.toml"
    literal = {float("inf"): "inf", }.get(value) if isinstance(value, float) and not math.isnan(value) else None
    text = literal or ("nan" if isinstance(value, float) else repr(list(value)) if isinstance(value, tuple)
                       else f'"{value}"')
    toml.write_text(f'[grid]\nmethod = ["xavier"]\n[run]\n{key} = {text}\n')
    r = invoke("sweep", toml, "--db", tmp_path / "r.db", "--out", tmp_path / "runs")
    assert r.exit_code == 2 and message in r.output and not (tmp_path / "r.db").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_a_gpu_this_machine_lacks_is_refused_before_any_claim(tmp_path):
    r = invoke("sweep", "--data", "synthetic", "--methods", "xavier", "--device", "cuda", "--db", tmp_path / "r.db",
               "--out", tmp_path / "runs", "--threads", "1")
    assert r.exit_code == 2 and "device: 'cuda' but this machine has no CUDA GPU" in r.output
    assert not (tmp_path / "r.db").exists()  # no run claimed, none left `running`
    r = invoke("train", "--data", "synthetic", "--device", "cuda:1", "--out", tmp_path / "runs")
    assert r.exit_code == 2 and "device: 'cuda:1' but this machine has no CUDA GPU" in r.output


def test_a_folder_with_one_class_is_refused_at_load_time(tmp_path):
    # The repro: it trained fully, then failed in the metrics.
    root = write_classes(tmp_path / "one", classes=("ant",), n_per_class=8)
    with pytest.raises(ValueError, match=r"one class sub-folder \('ant'\); classification needs at least two"):
        load_data(f"folder:{root}")
    r = invoke("sweep", "--data", f"folder:{root}", "--methods", "xavier", "--db", tmp_path / "r.db",
               "--out", tmp_path / "runs")
    assert r.exit_code == 2 and "one class sub-folder" in r.output and not (tmp_path / "r.db").exists()


# -- errors a user can act on (issue 14, item 11) ---------------------------------------------------------


@pytest.fixture
def a_store(tmp_path):
    """A real results store with one finished run (a fake train: no training needed to read it)."""
    from initscope.experiments.training import RunResult

    def fake(cfg, *, out_dir, progress, on_epoch, resume):
        row = {"epoch": 1, "train_loss": 1.0, "train_accuracy": 0.5, "val_loss": 1.0, "val_accuracy": 0.5}
        on_epoch(row)
        return RunResult(cfg.run_id, cfg, "finished", history=[row], best_epoch=1,
                         test={"accuracy": 0.5, "precision": 0.5, "recall": 0.5, "f1": 0.5, "loss": 1.0})

    sweep = SweepConfig(grid={"method": ["xavier"]}, fixed={"data": "synthetic", "width": 4, "epochs": 1},
                        db=tmp_path / "store" / "r.db", out=tmp_path / "store" / "runs")
    run_sweep(sweep, train_fn=fake, progress=False)
    return sweep.db


def test_a_damaged_database_is_named_and_left_unchanged(tmp_path, a_store):
    truncated, garbage = tmp_path / "truncated.db", tmp_path / "garbage.db"
    data = a_store.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    garbage.write_bytes(np.random.default_rng(0).bytes(8192))
    sweep = ["sweep", "--data", "synthetic", "--methods", "xavier", "--out", tmp_path / "runs", "--threads", "1"]
    for db in (truncated, garbage):
        before = db.read_bytes()
        for r in (invoke("report", db, "--out", tmp_path / "rep"), invoke(*sweep, "--db", db)):
            assert r.exit_code == 2 and str(db) in r.output and "Traceback" not in r.output, r.output
            assert "it was left as it was" in r.output
        assert db.read_bytes() == before and not Path(f"{db}-wal").exists()


def test_folders_files_and_foreign_databases_in_the_wrong_place(tmp_path, a_store):
    folder = tmp_path / "a-folder.toml"
    folder.mkdir()
    r = invoke("sweep", folder)
    assert r.exit_code == 2 and f"{folder} is a folder, not a sweep TOML file" in r.output
    r = invoke("report", folder)
    assert r.exit_code == 2 and f"{folder} is a folder, not a results database" in r.output
    r = invoke("sweep", "--data", "synthetic", "--methods", "xavier", "--db", folder, "--out", tmp_path / "runs")
    assert r.exit_code == 2 and f"{folder} is a folder, not a results database" in r.output
    binary = tmp_path / "sweep.toml"
    binary.write_bytes(b"\x00\x01binary\xff\xfe")
    r = invoke("sweep", binary)  # used to say only "'utf-8' codec can't decode byte 0xff"
    assert r.exit_code == 2 and f"{binary}: not a TOML file (not UTF-8 text" in r.output
    other = tmp_path / "other.db"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE photos (name TEXT)")
    conn.commit()
    conn.close()
    r = invoke("report", other, "--out", tmp_path / "rep")
    assert r.exit_code == 2 and "not an initscope results store (its tables: photos)" in r.output
    r = invoke("sweep", "--data", "synthetic", "--methods", "xavier", "--db", other, "--out", tmp_path / "runs")
    assert r.exit_code == 2 and "not an initscope results store" in r.output
    with sqlite3.connect(other) as conn:  # left as it was: no runs table added to someone else's database
        assert [t for (t,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")] == ["photos"]
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    r = invoke("report", a_store, "--out", a_file)
    assert r.exit_code == 2 and f"--out {a_file} is a file" in r.output
    r = invoke("sweep", "--data", "synthetic", "--methods", "xavier", "--threads", "0", "--db", tmp_path / "t.db")
    assert r.exit_code == 2 and "--threads: 0 is not a positive number of threads" in r.output
    assert not (tmp_path / "t.db").exists()


def _ro_mount_works() -> bool:
    import shutil
    import subprocess

    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return False
    return subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _ro_mount_works(), reason="a read-only bind mount needs root (unshare --mount)")
def test_report_reads_a_database_on_a_read_only_mount_and_says_when_it_cannot_write(tmp_path, a_store):
    import subprocess
    import sys

    ro = tmp_path / "ro"
    ro.mkdir()
    script = (f"mount --bind {a_store.parent} {ro} && mount -o remount,ro,bind {ro} && "
              f"{sys.executable} -m initscope report {ro / a_store.name} --out {tmp_path / 'rep'} && "
              f"{sys.executable} -m initscope report {a_store} --out {ro / 'rep'}")
    done = subprocess.run(["unshare", "--mount", "sh", "-c", script], capture_output=True, text=True, timeout=300)
    out = " ".join((done.stdout + done.stderr).split())
    # reading works (the database could not be opened in SQLite's read-only mode there before)
    assert (tmp_path / "rep" / "report.md").is_file() and "1 finished" in (tmp_path / "rep" / "report.md").read_text()
    # writing into the read-only mount says so, with the path
    assert done.returncode == 2 and f"{ro / 'rep'}: Read-only file system" in out and "Traceback" not in out, out


# -- rich markup: brackets are text (issue 14, item 12) ----------------------------------------------------


def test_brackets_in_paths_messages_and_help_are_printed_as_written(tmp_path, a_store, monkeypatch):
    import sys

    # a path holding [/x] crashed with MarkupError; here it is the database's and the runs' folder
    odd = tmp_path / "a[/x]" / "b[bold]"
    r = invoke("sweep", "--data", "synthetic", "--methods", "xavier", "--dry-run", "--db", odd / "r.db",
               "--out", odd / "runs")
    assert r.exit_code == 0 and f"db {odd / 'r.db'}; out {odd / 'runs'}" in r.output, r.output
    r = invoke("report", odd / "none.db")
    assert r.exit_code == 2 and f"no results database at {odd / 'none.db'}" in r.output
    # messages quoting a TOML table: "run settings go under [grid] or [run]" lost its brackets
    toml = tmp_path / "s.toml"
    toml.write_text('[grid]\nmethod = ["xavier"]\n[foo]\nx = 1\n')
    r = invoke("sweep", toml)
    assert r.exit_code == 2 and "(run settings go under [grid] or [run])" in r.output
    # help: an engine's summary naming the extra to install kept "initscope" and lost "[ray]"
    r = invoke("sweep", "--help")
    assert "pip install 'initscope[ray]'" in " ".join(r.output.replace("│", " ").split())  # the box's borders out
    # the error when Ray is missing
    monkeypatch.setitem(sys.modules, "ray", None)
    r = invoke("sweep", "--data", "synthetic", "--methods", "xavier", "--engine", "ray", "--db", tmp_path / "r.db",
               "--out", tmp_path / "runs")
    assert r.exit_code == 2 and "pip install 'initscope[ray]'" in r.output
