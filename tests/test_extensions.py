"""Extension points from outside the package: a data source and an engine, each registered here as a user
would, work like the built-ins (validation, loading, one tiny run, a sweep, the command line, the help),
and a name registered twice is refused."""

import math

import pytest
import torch
from typer.testing import CliRunner

from initscope.cli import app
from initscope.errors import ConfigError
from initscope.experiments.config import RunConfig, SweepConfig
from initscope.experiments.data import SOURCES, DataSource, Images, load_data, register_source, source_usages
from initscope.experiments.engines import ENGINES, EngineOption, SweepSummary, register_engine, run_sweep
from initscope.experiments.store import Store
from initscope.experiments.training import RunResult, train

runner = CliRunner()


def help_of(*command: str) -> str:
    """A command's --help as one line of words (rich's box and line breaks taken out)."""
    return " ".join(runner.invoke(app, [*command, "--help"]).output.replace("│", " ").split())


class Stripes(DataSource):
    """Horizontal against vertical stripes: ``stripes:N`` gives N images of each, 1x12x12, a little noise."""

    summary = "horizontal against vertical stripes, 1x12x12 (a test's own source)"
    argument = "N"

    def parse(self, arg: str) -> int:
        if not arg.isdigit() or int(arg) < 4:
            raise ConfigError(f"data: stripes:{arg}: N must be a whole number of images per class, at least 4")
        return int(arg)

    def load(self, n, *, root, image_size, in_channels, progress) -> Images:
        size = image_size or (12, 12)
        g = torch.Generator().manual_seed(7)
        rows = (torch.arange(size[0]) % 4 < 2).float()
        horizontal = rows[:, None].expand(size)
        x = torch.stack([horizontal] * n + [horizontal.T[:size[0], :size[1]]] * n)[:, None]
        x = (x * 0.8 + 0.2 * torch.rand(x.shape, generator=g)).clamp(0, 1)
        return Images(x, torch.tensor([0] * n + [1] * n), ["horizontal", "vertical"])


@pytest.fixture
def stripes():
    register_source("stripes")(Stripes)
    yield SOURCES["stripes"]
    SOURCES.remove("stripes")


TINY = dict(model="plain34", width=4, epochs=2, batch_size=16, device="cpu")


def test_a_source_registered_outside_works_like_a_built_in(stripes, tmp_path, one_thread):
    assert stripes.name == "stripes" and "stripes:N" in source_usages()
    d = load_data("stripes:20", seed=0)
    assert d.input_shape == (1, 12, 12) and d.class_names == ["horizontal", "vertical"]
    assert (len(d.train), len(d.val), len(d.test)) == (24, 8, 8)  # split 60/20/20 per class, as every source
    assert d.train.tensors[0].min() >= -1 and d.train.tensors[0].max() <= 1  # normalized like the others
    with pytest.raises(ConfigError, match="N must be a whole number"):
        RunConfig(data="stripes:x")  # its own parse, at the config, before anything runs
    with pytest.raises(ConfigError, match="stripes needs its argument, written stripes:N"):
        RunConfig(data="stripes")
    # one tiny run
    r = train(RunConfig(data="stripes:20", **TINY), progress=False)
    assert r.status == "finished" and set(r.test) == {"accuracy", "precision", "recall", "f1", "loss"}
    # a sweep, through the store
    sweep = SweepConfig(grid={"data": ["stripes:20", "synthetic"], "method": ["xavier"]},
                        fixed={**TINY, "limit": 32}, db=tmp_path / "r.db", out=tmp_path / "runs")
    assert run_sweep(sweep, progress=False).ran == {"finished": 2}
    with Store(sweep.db) as s:
        assert sorted(r["data"] for r in s.runs()) == ["stripes:20", "synthetic"]
    # the command line: in the help, taken by --data
    assert "stripes:N" in help_of("train")
    result = runner.invoke(app, ["train", "--data", "stripes:12", "--width", "4", "--epochs", "1", "--device", "cpu",
                                 "--batch-size", "8", "--out", str(tmp_path / "cli"), "--no-progress"])
    assert result.exit_code == 0, result.output


def test_a_source_name_is_registered_once(stripes):
    with pytest.raises(ValueError, match="a data source named 'stripes' is already registered"):
        register_source("stripes")(Stripes)
    with pytest.raises(ValueError, match="a data source named 'digits' is already registered"):
        register_source("digits")(Stripes())
    assert SOURCES["digits"].name == "digits" and type(SOURCES["digits"]).__name__ == "Digits"
    with pytest.raises(ValueError, match="without ':'"):
        register_source("a:b")
    with pytest.raises(TypeError, match="is not a DataSource"):
        register_source("plain")(object())
    assert "plain" not in SOURCES


class FakeTrain:
    """train() without training: a history row per epoch, then a finished result."""

    def __call__(self, cfg, *, out_dir=None, progress=True, on_epoch=None, resume=True):
        history = [{"epoch": e, "train_loss": 1.0 / e, "train_accuracy": 0.5, "val_loss": 1.0 / e,
                    "val_accuracy": 0.5, "lr": cfg.lr, "seconds": 0.0} for e in range(1, cfg.epochs + 1)]
        for row in history:
            on_epoch(row)
        return RunResult(cfg.run_id, cfg, "finished", history=history, best_epoch=cfg.epochs,
                         test={"accuracy": 0.5, "precision": 0.5, "recall": 0.5, "f1": 0.5, "loss": math.log(2)})


@pytest.fixture
def last_first():
    """An engine of the test's own: the local engine, last run first, with an option of its own."""
    calls = []

    @register_engine("last-first", summary="the runs in reverse order, here (a test's own engine)",
                     options=(EngineOption("note", str, "a word to remember"),))
    def run_last_first(sweep, *, db=None, out=None, train_fn=None, progress=True, retry_failed=True,
                       lease_s=3600.0, name=None, note=None) -> SweepSummary:
        runs = list(reversed(sweep.expand()))
        calls.append({"runs": [r.run_id for r in runs], "note": note})
        return run_sweep(runs, db=db or sweep.db, out=out or sweep.out, train_fn=FakeTrain(), progress=progress,
                         retry_failed=retry_failed, lease_s=lease_s, name=name or sweep.name)

    yield calls
    ENGINES.remove("last-first")


def test_an_engine_registered_outside_runs_a_sweep(last_first, tmp_path):
    db = tmp_path / "r.db"
    flags = ["sweep", "--data", "synthetic", "--methods", "xavier,asv-forward", "--seeds", "0,1", "--epochs", "2",
             "--db", str(db), "--out", str(tmp_path / "runs")]
    help_text = help_of("sweep")
    assert "last-first: the runs in reverse order" in help_text and "--note" in help_text
    result = runner.invoke(app, flags + ["--engine", "last-first", "--note", "hello"])
    assert result.exit_code == 0, result.output
    assert "4 runs: trained 4 (4 finished)" in result.output
    (call,) = last_first
    expected = [r.run_id for r in SweepConfig.from_flags(grid={"data": "synthetic", "method": "xavier,asv-forward",
                                                               "seed": "0,1"}, fixed={"epochs": 2}).expand()]
    assert call == {"runs": expected[::-1], "note": "hello"}
    with Store(db) as s:
        assert sorted(r["run_id"] for r in s.runs("finished")) == sorted(expected)
        assert [e["epoch"] for e in s.epochs(expected[0])] == [1, 2]
    # another engine's option is refused, naming what this one takes; so is an unknown engine
    result = runner.invoke(app, flags + ["--engine", "last-first", "--threads", "1"])
    assert result.exit_code == 2 and "--threads: not an option of --engine last-first (it takes --note)" in result.output
    result = runner.invoke(app, flags + ["--engine", "local", "--note", "x"])
    assert result.exit_code == 2 and "--note: not an option of --engine local (it takes --threads, --parallel)" in result.output
    result = runner.invoke(app, flags + ["--engine", "spark"])
    assert result.exit_code == 2 and "unknown engine 'spark'; valid: local, ray, last-first" in result.output


def test_an_engine_name_is_registered_once(last_first):
    with pytest.raises(ValueError, match="an? engine named 'local' is already registered"):
        register_engine("local", summary="another")(run_sweep)
    assert ENGINES["local"].run is run_sweep and list(ENGINES)[:2] == ["local", "ray"]
