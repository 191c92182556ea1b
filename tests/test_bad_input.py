"""Bad input, each a clear error before anything trains or an item skipped by name, never a crash in the
middle or a silently wrong number: unknown config keys and values, a missing or empty dataset, corrupt
and truncated images, mixed image modes, a class too small to split, NaN in the data, and a model that
torch.fx cannot trace."""

import io
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
