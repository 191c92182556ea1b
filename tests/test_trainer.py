"""The trainer of issue 15: folders with their own split, decoded once into a cache, ``--limit`` decoding only
what it uses; batched augmentation (exact crops, repeatable per batch, the same in worker processes); early
stopping; wall and CPU time and the device in the store (older databases migrated); the fields added
without changing older run ids."""

import dataclasses
import json
import sqlite3
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from initscope.errors import ConfigError
from initscope.experiments.config import RunConfig
from initscope.experiments.data import clear_cache, load_data
from initscope.experiments.data import folder as folder_mod
from initscope.experiments.store import Store
from initscope.experiments.training import train
from initscope.experiments.training.augment import (AUGMENTATIONS, Feeder, augment_batch, batch_seed, crop_padding,
                                                    epoch_order)
from initscope.experiments.training.loop import early_stop

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
TINY = dict(data="synthetic", image_size=16, limit=200, batch_size=32, device="cpu")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    """Every test decodes into a cache of its own."""
    where = tmp_path / "cache"
    monkeypatch.setenv("INITSCOPE_CACHE_DIR", str(where))
    clear_cache()
    yield where
    clear_cache()


def _png(path: Path, value: int, size=(10, 10)) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, dtype=np.uint8)).save(path)


def _split_folder(root: Path, n_train=12, n_test=4, classes=("ant", "bee", "cat")) -> Path:
    """train/<class>/ and test/<class>/, each image's pixel value telling where it came from."""
    for k, c in enumerate(classes):
        for i in range(n_train):
            _png(root / "train" / c / f"{i}.png", 10 * k + i)
        for i in range(n_test):
            _png(root / "test" / c / f"{i}.png", 200 + 10 * k + i)
    return root


def _plain_folder(root: Path, n=20, classes=("ant", "bee", "cat")) -> Path:
    for k, c in enumerate(classes):
        for i in range(n):
            _png(root / c / f"{i}.png", 60 * k + i)
    return root


class _Counting:
    """Counts the files the folder source decodes."""

    def __init__(self, monkeypatch):
        self.files: list[str] = []
        real = folder_mod._decode

        def decode(path, size, mode):
            self.files.append(path)
            return real(path, size, mode)

        monkeypatch.setattr(folder_mod, "_decode", decode)


# -- folders ------------------------------------------------------------------------------------------------


def test_a_folder_with_its_own_split_keeps_it_and_draws_validation_from_train(tmp_path):
    root = _split_folder(tmp_path / "imgs")
    d = load_data(f"folder:{root}", seed=0)
    assert d.class_names == ["ant", "bee", "cat"]
    assert len(d.test) == 12 and torch.bincount(d.test.tensors[1]).tolist() == [4, 4, 4]
    assert len(d.train) + len(d.val) == 36 and torch.bincount(d.val.tensors[1]).tolist() == [2, 2, 2]  # 1/6, stratified
    # pixel values: the test images (>= 200) are the test split, and none of them is in train or validation
    value = lambda ds: ((ds.tensors[0][:, 0, 0, 0] + 1) / 2 * 255).round()  # noqa: E731 - [-1, 1] back to bytes
    assert (value(d.test) >= 200).all() and (value(d.val) < 200).all() and (value(d.train) < 200).all()
    # seeded: another seed draws another validation split, never from test/
    other = load_data(f"folder:{root}", seed=1)
    assert not torch.equal(value(other.val), value(d.val)) and (value(other.val) < 200).all()
    doc = json.loads(d.save_split(tmp_path / "split.json").read_text())
    assert all(f.startswith("test/") for f in doc["files"]["test"])
    assert all(f.startswith("train/") for f in doc["files"]["train"] + doc["files"]["val"])


def test_a_folder_without_a_split_is_split_60_20_20(tmp_path):
    d = load_data(f"folder:{_plain_folder(tmp_path / 'imgs')}", seed=0)
    assert [len(d.train), len(d.val), len(d.test)] == [36, 12, 12]


def test_a_split_folder_with_a_third_folder_or_a_stray_class_is_refused(tmp_path):
    root = _split_folder(tmp_path / "imgs")
    _png(root / "val" / "ant" / "0.png", 1)
    with pytest.raises(ValueError, match="has train/ and test/ and also val/; validation is drawn from train/"):
        load_data(f"folder:{root}")
    root = _split_folder(tmp_path / "imgs2")
    _png(root / "test" / "dog" / "0.png", 1)
    with pytest.raises(ValueError, match="test/ has class folder\\(s\\) that train/ lacks: dog"):
        load_data(f"folder:{root}")


def test_a_folder_is_decoded_once_into_a_cache_keyed_by_its_files(tmp_path, monkeypatch, cache_dir):
    root = _plain_folder(tmp_path / "imgs")
    count = _Counting(monkeypatch)
    a = load_data(f"folder:{root}", seed=0, image_size=8)
    n = len(count.files)
    assert n >= 60 and len(list((cache_dir / "folders").glob("*.safetensors"))) == 1
    clear_cache()  # a new process: nothing in memory
    b = load_data(f"folder:{root}", seed=1, image_size=8)
    assert len(count.files) == n  # read from the cache, nothing decoded
    assert len(a.train) == len(b.train) and a.input_shape == b.input_shape == (3, 8, 8)
    clear_cache()
    load_data(f"folder:{root}", seed=0, image_size=6)  # another size: another key
    assert len(count.files) > n
    m = len(count.files)
    clear_cache()
    _png(root / "ant" / "0.png", 99, size=(12, 12))  # a file changed
    load_data(f"folder:{root}", seed=0, image_size=8)
    assert len(count.files) > m and len(list((cache_dir / "folders").glob("*.safetensors"))) == 3


def test_the_cache_can_be_turned_off(tmp_path, monkeypatch):
    monkeypatch.setenv("INITSCOPE_CACHE_DIR", "off")
    assert folder_mod.cache_dir() is None
    count = _Counting(monkeypatch)
    root = _plain_folder(tmp_path / "imgs", n=5)
    load_data(f"folder:{root}")
    clear_cache()
    load_data(f"folder:{root}")
    assert len(count.files) >= 30  # decoded twice


def test_limit_decodes_only_what_the_run_uses_and_draws_the_same_split(tmp_path, monkeypatch):
    root = _split_folder(tmp_path / "imgs", n_train=30, n_test=10)
    count = _Counting(monkeypatch)
    small = load_data(f"folder:{root}", seed=0, limit=9, eval_limit=6, image_size=10)
    assert (len(small.train), len(small.val), len(small.test)) == (9, 6, 6)
    assert len(count.files) == 9 + 6 + 6  # not 120: the cache of the whole folder does not exist yet
    assert torch.bincount(small.train.tensors[1]).tolist() == [3, 3, 3]
    clear_cache()
    full = load_data(f"folder:{root}", seed=0, image_size=10)  # decodes everything, into the cache
    clear_cache()
    again = load_data(f"folder:{root}", seed=0, limit=9, eval_limit=6, image_size=10)  # now from the cache
    for name in ("train", "val", "test"):
        assert torch.equal(getattr(small, name).tensors[0], getattr(again, name).tensors[0]), name
    assert len(full.train) == 75


def test_an_unreadable_image_is_left_out_after_the_draw_when_only_some_are_decoded(tmp_path):
    root = _plain_folder(tmp_path / "imgs", n=20)
    for i in range(5):
        (root / "bee" / f"{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.warns(UserWarning, match="not really|unreadable"):
        d = load_data(f"folder:{root}", seed=0, limit=35, image_size=10)
    kept = len(d.train) + len(d.val) + len(d.test)
    assert len(d.skipped) >= 4 and kept == 35 + 12 + 12 - len(d.skipped)  # at most one broken file left undrawn
    assert all(Path(f).parent.name == "bee" for f in d.skipped)


@pytest.mark.data
def test_food101_full_keeps_its_official_split():
    if not (SHARED / "food101-10-full").exists():
        pytest.skip("../shared/data is absent")
    d = load_data("folder:food101-10-full", root=SHARED, seed=0, image_size=32, limit=100, eval_limit=50)
    assert d.num_classes == 10 and (len(d.train), len(d.val), len(d.test)) == (100, 50, 50)
    doc = d.split_indices
    assert set(doc) == {"train", "val", "test"}
    assert all(d.files[i].startswith("test/") for i in doc["test"])


# -- augmentation ------------------------------------------------------------------------------------------


def _images(b=6, c=2, h=8, w=8):
    return torch.arange(b * c * h * w, dtype=torch.float32).reshape(b, c, h, w)


def test_crop_flip_gives_windows_of_the_reflection_padded_image():
    x = _images()
    out = augment_batch(x, "crop-flip", torch.Generator().manual_seed(3))
    p = crop_padding((8, 8))
    padded = F.pad(x, (p, p, p, p), mode="reflect")
    for i in range(len(x)):
        windows = [padded[i, :, r:r + 8, s:s + 8] for r in range(2 * p + 1) for s in range(2 * p + 1)]
        assert any(torch.equal(out[i], wdw) or torch.equal(out[i], wdw.flip(-1)) for wdw in windows), i
    assert not torch.equal(out, x)


def test_augmentations_repeat_per_batch_seed_and_keep_shapes():
    x = torch.rand(16, 3, 12, 12)
    for kind in AUGMENTATIONS:
        a = augment_batch(x, kind, torch.Generator().manual_seed(batch_seed(0, 1, 2)))
        b = augment_batch(x, kind, torch.Generator().manual_seed(batch_seed(0, 1, 2)))
        assert a.shape == x.shape and torch.equal(a, b), kind
    assert torch.equal(augment_batch(x, "none", torch.Generator()), x)
    flipped = augment_batch(x, "flip", torch.Generator().manual_seed(0))
    assert all(torch.equal(f, o) or torch.equal(f, o.flip(-1)) for f, o in zip(flipped, x))
    resized = augment_batch(x, "resized-crop-flip", torch.Generator().manual_seed(0))
    assert resized.min() >= x.min() - 1e-6 and resized.max() <= x.max() + 1e-6  # bilinear: within the range
    assert len({batch_seed(s, e, i) for s in range(3) for e in range(50) for i in range(300)}) == 3 * 50 * 300
    with pytest.raises(ValueError, match="valid: none, flip, crop-flip"):
        augment_batch(x, "mixup", torch.Generator())


def test_worker_processes_feed_the_same_batches():
    x, y = torch.rand(70, 3, 8, 8), torch.arange(70) % 5
    here = Feeder(x, y, 16, "crop-flip", seed=4)
    there = Feeder(x, y, 16, "crop-flip", seed=4, workers=1)
    try:
        for epoch in range(2):
            a = list(here.epoch(epoch, torch.Generator().manual_seed(epoch)))
            b = list(there.epoch(epoch, torch.Generator().manual_seed(epoch)))
            assert len(a) == len(b) == 5  # 70 = 4 x 16 + 6
            assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b))
    finally:
        there.close()
    assert [len(c) for c in epoch_order(33, 16, torch.Generator())] == [16, 16]  # a batch of one is dropped


def test_augmented_training_is_bit_for_bit_and_resumes(tmp_path):
    config = RunConfig(model="plain34", width=4, epochs=2, augment="crop-flip", method="asv-backward",
                       optimizer="sgd-nesterov", lr=0.01, **TINY)
    a = train(config, progress=False)
    b = train(config, progress=False)
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert strip(a.history) == strip(b.history) and a.test == b.test

    class Killed(Exception):
        pass

    def kill(row):
        raise Killed

    with pytest.raises(Killed):
        train(config, out_dir=tmp_path, progress=False, on_epoch=kill)
    c = train(config, out_dir=tmp_path, progress=False)
    assert strip(c.history) == strip(a.history) and c.test == a.test
    assert c.wall_seconds > 0 and c.cpu_seconds > 0  # summed over both attempts
    plain = train(dataclasses.replace(config, augment="none"), progress=False)
    assert strip(plain.history) != strip(a.history)


# -- early stopping, test_at, times ------------------------------------------------------------------------


def test_early_stop_rule():
    hist = [{}] * 7
    assert early_stop(hist, best_epoch=3, patience=4, min_epochs=0)
    assert not early_stop(hist, best_epoch=4, patience=4, min_epochs=0)
    assert not early_stop(hist, best_epoch=3, patience=4, min_epochs=8)  # never before min_epochs
    assert not early_stop(hist, best_epoch=1, patience=0, min_epochs=0)  # off
    assert early_stop([{}] * 2, best_epoch=None, patience=2, min_epochs=0)


def test_a_run_stops_early_and_says_when(tmp_path):
    config = RunConfig(model="plain34", width=4, epochs=12, patience=2, lr=1e-6, test_at=(1, 2), **TINY)
    r = train(config, out_dir=tmp_path, progress=False)
    assert r.stopped_epoch is not None and r.stopped_epoch == len(r.history) < 12
    assert r.stopped_epoch - r.best_epoch == 2
    assert [("test_accuracy" in h) for h in r.history[:3]] == [True, True, False]
    assert r.device == "cpu" and r.threads == 1 and r.cpu_seconds > 0 and r.wall_seconds >= r.history[0]["seconds"]
    # train() again on the same folder: the stop is part of the resume state, nothing more is trained
    again = train(config, out_dir=tmp_path, progress=False)
    assert again.stopped_epoch == r.stopped_epoch and again.history == r.history


def test_the_store_keeps_times_device_and_stop(tmp_path):
    config = RunConfig(model="plain34", width=4, epochs=3, patience=1, lr=1e-6, test_at=(1,), **TINY)
    r = train(config, progress=False)
    with Store(tmp_path / "r.db") as s:
        s.claim(r.run_id, config.to_dict())
        assert s.finish(r)
        row = s.run(r.run_id)
        assert row["stopped_epoch"] == r.stopped_epoch and row["device"] == "cpu" and row["threads"] == 1
        assert row["wall_seconds"] == pytest.approx(r.wall_seconds) and row["cpu_seconds"] > 0
        assert s.epochs(r.run_id)[0]["test_accuracy"] == pytest.approx(r.history[0]["test_accuracy"])


def test_an_older_database_gets_the_new_columns(tmp_path):
    db = tmp_path / "old.db"
    conn = sqlite3.connect(db)
    conn.executescript("""
        CREATE TABLE runs (run_id TEXT PRIMARY KEY, status TEXT NOT NULL, config TEXT NOT NULL,
            test_accuracy REAL, test_precision REAL, test_recall REAL, test_f1 REAL, test_loss REAL,
            best_epoch INTEGER, best_val_accuracy REAL, diverged_epoch INTEGER, error TEXT, run_dir TEXT,
            data TEXT, model TEXT, method TEXT, optimizer TEXT, lr REAL, seed INTEGER,
            started_at TEXT, finished_at TEXT, heartbeat_at REAL, attempts INTEGER NOT NULL DEFAULT 0,
            host TEXT, pid INTEGER);
        CREATE TABLE epochs (run_id TEXT NOT NULL, epoch INTEGER NOT NULL, train_loss REAL, train_accuracy REAL,
            val_loss REAL, val_accuracy REAL, lr REAL, seconds REAL, PRIMARY KEY (run_id, epoch));
        INSERT INTO runs (run_id, status, config) VALUES ('old', 'finished', '{}');
        INSERT INTO epochs (run_id, epoch, val_accuracy) VALUES ('old', 1, 0.5);
    """)
    conn.commit()
    conn.close()
    with Store(db) as s:
        assert s.run("old")["status"] == "finished" and s.run("old")["wall_seconds"] is None
        assert s.epochs("old")[0]["val_accuracy"] == 0.5 and s.epochs("old")[0]["test_accuracy"] is None
        s.claim("new", {"method": "xavier"})
        s.finish(SimpleNamespace(run_id="new", status="finished", history=[{"epoch": 1, "test_accuracy": 0.3}],
                                 best_epoch=1, test={}, stopped_epoch=1, wall_seconds=2.0, cpu_seconds=1.5,
                                 device="cpu", threads=1))
        assert s.run("new")["cpu_seconds"] == 1.5 and s.epochs("new")[0]["test_accuracy"] == 0.3
        assert s.selections() == []


# -- the configuration -------------------------------------------------------------------------------------


def test_fields_added_later_leave_older_run_ids_alone():
    base = RunConfig()
    assert base.run_id == "b906f163ef0e"  # as released before these fields existed
    for changed in (dict(augment="crop-flip"), dict(patience=5), dict(min_epochs=3), dict(distribution="uniform"),
                    dict(eval_limit=100), dict(test_at=[1]), dict(residual="zero")):
        assert RunConfig(**changed).run_id != base.run_id, changed
    assert RunConfig(workers=2).run_id == base.run_id  # how batches are prepared does not change the result
    assert RunConfig(model="resnet20", fixup_scalars=True).run_id != RunConfig(model="resnet20").run_id
    with pytest.raises(ConfigError, match="fixup_scalars: model 'plain34' has no Fixup scalars"):
        RunConfig(fixup_scalars=True)
    with pytest.raises(ConfigError, match="augment: unknown value 'mixup'; valid: none, flip, crop-flip"):
        RunConfig(augment="mixup")
    with pytest.raises(ConfigError, match="fixup_scalars: 'yes' is not true or false"):
        RunConfig(model="resnet20", fixup_scalars="yes")


def test_plan_options_reach_the_initialization():
    from initscope.experiments.training.loop import build_model, init_options

    cfg = RunConfig(model="resnet20", norm="none", fixup_scalars=True, method="asv-backward", residual="zero",
                    distribution="uniform", width=4)
    assert init_options(cfg) == {"residual": "zero", "distribution": "uniform"}
    assert init_options(RunConfig(method="lsuv", distribution="uniform")) == {}  # lsuv draws its own way
    model = build_model(cfg, 3, 10)
    assert sum(name.endswith("scale.value") for name, _ in model.named_parameters()) == 9
