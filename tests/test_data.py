"""Data: stratified repeatable splits, normalizations, folders with bad images, offline errors, real sets."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from initscope.experiments.data import load_data, stratified_split, stratified_subset

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def _labels(ds):
    return ds.tensors[1]


def test_stratified_split_per_class_and_repeatable():
    labels = torch.tensor([0] * 50 + [1] * 31 + [2] * 7 + [3] * 1)
    parts = stratified_split(labels, (0.6, 0.2, 0.2), seed=3)
    flat = sorted(i for p in parts for i in p)
    assert flat == list(range(len(labels)))  # disjoint and complete
    for c, n in [(0, 50), (1, 31), (2, 7)]:
        counts = [int((labels[p] == c).sum()) for p in parts]
        assert counts[0] == round(0.6 * n) and counts[1] == round(0.2 * n) and sum(counts) == n
    assert parts == stratified_split(labels, (0.6, 0.2, 0.2), seed=3)
    assert parts != stratified_split(labels, (0.6, 0.2, 0.2), seed=4)
    with pytest.raises(ValueError, match="sum to 1"):
        stratified_split(labels, (0.6, 0.2, 0.3), seed=0)


def test_stratified_subset_exact_size_and_proportions():
    labels = torch.tensor([0] * 600 + [1] * 300 + [2] * 100)
    sub = stratified_subset(labels, 100, seed=0)
    assert len(sub) == 100 == len(set(sub))
    assert torch.bincount(labels[sub]).tolist() == [60, 30, 10]
    assert sub == stratified_subset(labels, 100, seed=0) != stratified_subset(labels, 100, seed=1)


def test_digits_60_20_20_stratified_resized_and_normalized():
    from sklearn.datasets import load_digits

    d = load_data("digits", seed=0)
    assert d.input_shape == (1, 32, 32) and d.num_classes == 10
    per_class = np.bincount(load_digits().target)
    for name, frac in [("train", 0.6), ("val", 0.2)]:
        counts = torch.bincount(_labels(getattr(d, name)), minlength=10).numpy()
        assert np.array_equal(counts, np.round(per_class * frac).astype(int)), name
    assert len(d.train) + len(d.val) + len(d.test) == 1797
    x = d.train.tensors[0]
    assert x.min() >= -1 and x.max() <= 1 and x.min() < -0.99 and x.max() > 0.9
    # resized, not padded: the 8x8 content spans the whole 32x32 frame
    assert x[:, :, :, :4].abs().sum() > 0
    # the same seed gives the same split; another seed another one
    again = load_data("digits", seed=0, image_size=32)
    assert torch.equal(again.train.tensors[0], x)
    other = load_data("digits", seed=1)
    assert not torch.equal(other.train.tensors[1], d.train.tensors[1])


def test_mean_subtract_is_train_mean_and_limit_is_stratified():
    d = load_data("digits", seed=0, normalize="mean-subtract", limit=100)
    raw = load_data("digits", seed=0, limit=100)  # minus-one-one: x = 2 p - 1
    p_train, p_val = (raw.train.tensors[0] + 1) / 2, (raw.val.tensors[0] + 1) / 2
    mean = p_train.mean(0, keepdim=True)
    assert torch.allclose(d.train.tensors[0], p_train - mean, atol=1e-6)
    assert torch.allclose(d.val.tensors[0], p_val - mean, atol=1e-6)  # the train mean, on every split
    assert len(d.train) == 100 and torch.bincount(_labels(d.train)).min() >= 9
    assert len(d.val) == 359  # validation and test are kept whole


def test_synthetic_is_seeded():
    a, b = load_data("synthetic", seed=0, image_size=8), load_data("synthetic", seed=0, image_size=8)
    assert torch.equal(a.train.tensors[0], b.train.tensors[0])
    assert a.input_shape == (3, 8, 8) and (len(a.train), len(a.val), len(a.test)) == (720, 240, 240)


def test_bad_names_and_offline_files():
    with pytest.raises(ValueError, match="valid: digits, synthetic"):
        load_data("imagenet")
    with pytest.raises(ValueError, match="valid: minus-one-one, mean-subtract"):
        load_data("digits", normalize="zscore")
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        load_data("mnist", root="/nonexistent/data")


def _write_folder(root: Path) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    modes = ["RGB", "L", "RGBA", "P"]
    for c in ["ant", "bee", "cat"]:
        (root / c).mkdir(parents=True)
        for i in range(10):
            size = (12, 12) if i else (16, 10)  # one odd-sized image per class
            arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(arr).convert(modes[i % 4]).save(root / c / f"{i}.png")
    (root / "bee" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (root / "cat" / "notes.txt").write_text("not an image")
    return root


def test_folder_split_skips_corrupt_images_and_saves_split(tmp_path):
    root = _write_folder(tmp_path / "imgs")
    with pytest.warns(UserWarning, match="broken.png"):
        d = load_data(f"folder:{root}", seed=0, image_size=12)
    assert d.skipped == [str(root / "bee" / "broken.png")]
    assert d.class_names == ["ant", "bee", "cat"] and d.input_shape == (3, 12, 12)
    for name, n in [("train", 6), ("val", 2), ("test", 2)]:
        assert torch.bincount(_labels(getattr(d, name))).tolist() == [n, n, n]
    path = d.save_split(tmp_path / "out" / "split.json")
    doc = json.loads(path.read_text())
    assert sorted(doc["files"]) == ["test", "train", "val"]
    assert all(f.split("/")[0] in ("ant", "bee", "cat") for f in doc["files"]["train"])
    assert doc["skipped"] == d.skipped and len(set(sum(doc["files"].values(), []))) == 30
    with pytest.warns(UserWarning, match="broken.png"):
        gray = load_data(f"folder:{root}", seed=0, image_size=12, in_channels=1)
    assert gray.input_shape == (1, 12, 12)


@pytest.mark.data
@pytest.mark.parametrize("source", ["fashion-mnist", "mnist"])
def test_official_sets_from_shared_data(source):
    if not (SHARED / source).exists():
        pytest.skip("../shared/data is absent")
    d = load_data(source, root=SHARED, seed=0, limit=600)  # root/<source> is found too
    assert d.input_shape == (1, 28, 28) and d.num_classes == 10
    assert (len(d.train), len(d.test)) == (600, 10_000)
    assert abs(len(d.val) - 10_000) <= 10  # 1/6 of each class, rounded
    assert torch.bincount(_labels(d.val)).min() > 900  # stratified 1/6 of the official train split


@pytest.mark.data
@pytest.mark.slow
def test_plant_seedlings_folder():
    root = SHARED / "plant-seedlings-64"
    if not root.exists():
        pytest.skip("../shared/data is absent")
    d = load_data(f"folder:{root}", seed=0)
    assert d.num_classes == 12 and d.input_shape == (3, 64, 64) and not d.skipped
    assert len(d.train) + len(d.val) + len(d.test) == 4750
    counts = torch.bincount(_labels(d.train)).float() / torch.bincount(
        torch.cat([_labels(d.train), _labels(d.val), _labels(d.test)])).float()
    assert torch.allclose(counts, torch.full_like(counts, 0.6), atol=0.01)
