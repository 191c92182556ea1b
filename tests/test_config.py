"""A run's configuration, described once: run_ids pinned to the values released databases hold, every field
with help and a check, the command-line flags and the sweep file's keys read from the one schema."""

import dataclasses
import inspect

import pytest
from typer.testing import CliRunner

from initscope.cli import app
from initscope.errors import ConfigError
from initscope.experiments.commands import sweep_cmd, train_cmd
from initscope.experiments.config import AXES, RUN_SCHEMA, RunConfig, SweepConfig
from initscope.experiments.config.schema import Schema, setting

runner = CliRunner()


def help_of(*command: str) -> str:
    """A command's --help as one line of words (rich's box and line breaks taken out)."""
    return " ".join(runner.invoke(app, [*command, "--help"]).output.replace("│", " ").split())

FULL = dict(data="folder:imgs", data_root="/d", model="resnet18", width=8, norm="none", head="paper",
            method="asv-backward", optimizer="sgd-nesterov", lr=1, schedule="step", step_epochs=[30, 60],
            step_gamma=0.5, epochs=3, batch_size=32, seed=2, image_size=28, normalize="mean-subtract",
            weight_decay=1e-4, limit=500, device="cpu", probe_every=5)


# -- run_ids: existing results databases must still resume -----------------------------------------------


def test_run_ids_are_the_released_ones():
    # taken from the release before the schema (commit c7368e4): same fields, same values, same id
    assert RunConfig().run_id == "b906f163ef0e"
    assert RunConfig(**FULL).run_id == "d77dd9aeba8c"
    assert RunConfig(**{**FULL, "device": "cuda"}).run_id == "d77dd9aeba8c"  # the device is not in the id
    demo = SweepConfig.from_mapping({"grid": {"data": ["digits"], "model": ["plain34"], "method": [
        "xavier", "kaiming-forward", "kaiming-backward", "asv-forward", "asv-backward", "asv-forward-exact",
        "asv-backward-exact"], "optimizer": ["adam"], "lr": [1e-3], "seed": [0]},
        "run": {"width": 8, "epochs": 8, "batch_size": 64}, "name": "demo-digits"})
    assert [r.run_id for r in demo.expand()] == ["3394e5b492f7", "05d1e179623e", "df030eaa51b5", "564c154c2f0d",
                                                 "46a4ba9ae693", "96c4f6ed1c7d", "585f94f95049"]
    assert demo.sweep_id == "c27eb63453ee"
    per_optimizer = SweepConfig.from_mapping({"grid": {"optimizer": ["adam", "sgd"], "step_epochs": [[3, 6]],
                                                       "lr": {"adam": [1e-3], "sgd": [0.01, 1]}},
                                              "run": {"data_root": "../shared/data", "limit": 500}})
    assert [r.run_id for r in per_optimizer.expand()] == ["904dca8e0ef9", "0c7ab9e3a36d", "98e416af8d4a"]
    assert per_optimizer.sweep_id == "39478d2d42eb"


def test_values_take_their_canonical_types():
    a = RunConfig(lr=1, step_epochs=[3, 6], step_gamma=1, weight_decay=0)
    assert isinstance(a.lr, float) and a.step_epochs == (3, 6) and isinstance(a.weight_decay, float)
    assert a == RunConfig(lr=1.0, step_epochs=(3, 6), step_gamma=1.0, weight_decay=0.0)
    assert a.to_dict()["step_epochs"] == [3, 6]


def test_a_config_that_exists_can_run():
    with pytest.raises(dataclasses.FrozenInstanceError):
        RunConfig().lr = 0.1  # checked once, when made: it cannot become invalid afterwards
    for kw, message in [({"optimizer": "lamb"}, r"optimizer: unknown value 'lamb'; valid: sgd, sgd-nesterov"),
                        ({"method": "he"}, r"method: unknown value 'he'; valid: xavier, kaiming-forward"),
                        ({"data": "imagenet"}, r"data: unknown value 'imagenet'; valid: digits, synthetic, .*folder:PATH"),
                        ({"data": "digits:8"}, r"data: digits takes no argument"),
                        ({"data": "folder:"}, r"data: folder needs its argument, written folder:PATH"),
                        ({"model": "resnet1000"}, r"model: unknown model 'resnet1000'; valid: .*plain34"),
                        ({"device": "tpu"}, r"device: unknown value 'tpu'; valid: auto, cpu, cuda, cuda:N"),
                        ({"lr": 0}, r"lr: 0.0 must be > 0"),
                        ({"lr": float("nan")}, r"lr: nan is not a finite number"),
                        ({"epochs": 0}, r"epochs: 0 must be >= 1"),
                        ({"seed": -1}, r"seed: -1 must be >= 0"),
                        ({"epochs": 2.5}, r"epochs: 2.5 is not an integer"),
                        ({"epochs": True}, r"epochs: True is not an integer"),
                        ({"lr": "fast"}, r"lr: 'fast' is not a number"),
                        ({"step_epochs": 30}, r"step_epochs: 30 is not a list of int values"),
                        ({"norm": "batch"}, r"norm: unknown value 'batch'; valid: default, none"),
                        ({"width": None}, r"width: needs a value")]:
        with pytest.raises(ConfigError, match=message):
            RunConfig(**kw)
    with pytest.raises(ConfigError, match=r"unknown RunConfig key\(s\) 'epoch'; valid: data, data_root, model"):
        RunConfig.from_dict({"epoch": 3})
    assert RunConfig(data="folder:does/not/exist/yet").data  # a folder is looked for before runs, not here


# -- one description of every field ---------------------------------------------------------------------------


def test_every_field_has_its_setting():
    names = [f.name for f in dataclasses.fields(RunConfig)]
    assert list(RUN_SCHEMA.names()) == names
    for name in names:
        s = RUN_SCHEMA.setting(name)
        assert s.help and RUN_SCHEMA.describe(name).startswith(s.help)
        assert RUN_SCHEMA.validate(name, RUN_SCHEMA.default(name)) == getattr(RunConfig(), name)
    assert "one of: xavier, kaiming-forward" in RUN_SCHEMA.describe("method")
    assert RUN_SCHEMA.from_text("step_epochs", "30, 60") == (30, 60)
    with pytest.raises(ConfigError, match="step_epochs: '30;60' is not a list of integers: write it like 30,60"):
        RUN_SCHEMA.from_text("step_epochs", "30;60")


def test_the_commands_flags_are_the_schemas():
    train = inspect.signature(train_cmd).parameters
    assert list(train)[:len(RUN_SCHEMA.names())] == list(RUN_SCHEMA.names())
    for name in RUN_SCHEMA.names():
        option = train[name].default
        assert option.help == RUN_SCHEMA.describe(name)
        if not RUN_SCHEMA.type_of(name).sequence:
            assert option.default == RUN_SCHEMA.default(name)  # typer shows it as the flag's default
    assert train["model"].default.param_decls == ("--model", "-m")
    sweep = inspect.signature(sweep_cmd).parameters
    assert set(RUN_SCHEMA.names()) <= set(sweep)
    assert [sweep[a].default.param_decls[0] for a in AXES] == ["--seeds", "--data", "--model", "--methods",
                                                               "--optimizers", "--lrs"]
    help_text = help_of("train")
    for name in RUN_SCHEMA.names():
        assert RUN_SCHEMA.flags(name)[0] in help_text
    assert "folder:PATH" in help_text and "sgd-nesterov" in help_text


def test_flags_are_checked_by_the_schema(tmp_path):
    r = runner.invoke(app, ["train", "--step-epochs", "30;60", "--out", str(tmp_path)])
    assert r.exit_code == 2 and "step_epochs: '30;60' is not a list of integers" in r.output
    r = runner.invoke(app, ["sweep", "--lrs", "1e-3,fast", "--dry-run"])
    assert r.exit_code == 2 and "lr: 'fast' is not a number" in r.output
    r = runner.invoke(app, ["sweep", "--methods", "xavier", "--schedule", "step", "--step-epochs", "1,2",
                            "--weight-decay", "1e-4", "--normalize", "mean-subtract", "--dry-run"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["sweep", "--methods", "xavier", "--normalize", "zscore", "--dry-run"])
    assert r.exit_code == 2 and "normalize: unknown value 'zscore'; valid: minus-one-one, mean-subtract" in r.output


def test_the_sweep_file_is_checked_by_the_schema(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text('[grid]\nmethods = ["xavier"]\nepochs = [1, 2]\n[run]\nschedule = "step"\nstep_epochs = [1]\n')
    sweep = SweepConfig.from_toml(path)
    assert sweep.grid == {"method": ["xavier"], "epochs": [1, 2]} and sweep.fixed["step_epochs"] == (1,)
    assert [r.epochs for r in sweep.expand()] == [1, 2]
    path.write_text('[run]\nwidht = 4\n')
    with pytest.raises(ConfigError, match=r"s.toml: run: unknown key 'widht'; valid: data, data_root, model, width"):
        SweepConfig.from_toml(path)
    path.write_text('[run]\nwidth = "4"\n')
    with pytest.raises(ConfigError, match=r"width: '4' is not an integer"):
        SweepConfig.from_toml(path)


def test_a_schema_of_another_dataclass():
    @dataclasses.dataclass(frozen=True)
    class Small:
        name: str = setting("a", "a name", choices=("a", "b"))
        sizes: tuple[int, ...] = setting((), "sizes", minimum=1)
        scale: float | None = setting(None, "a scale", above=0)

    schema = Schema(Small)
    assert schema.validate("sizes", [1, 2]) == (1, 2) and schema.validate("scale", None) is None
    assert schema.describe("name") == "a name; one of: a, b"
    with pytest.raises(ConfigError, match=r"sizes: 0 must be >= 1"):
        schema.validate("sizes", [1, 0])
    with pytest.raises(ConfigError, match=r"scale: -1.0 must be > 0"):
        schema.validate("scale", -1)
    with pytest.raises(ConfigError, match=r"unknown Small key\(s\) 'size'; valid: name, sizes, scale"):
        schema.check_keys({"size": 1}, "Small")
