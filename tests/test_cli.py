import json
import subprocess
import sys

from torch import nn
from typer.testing import CliRunner

import initscope
from initscope.cli import app

runner = CliRunner()


def test_help():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "plan" in result.output and "demo" in result.output


def test_plan_json():
    result = runner.invoke(app, ["plan", "--model", "plain34", "--method", "asv-backward", "--input-shape", "3,32,32", "--json"])
    assert result.exit_code == 0, result.output
    d = json.loads(result.output)
    assert d["method"] == "asv-backward" and len(d["layers"]) == 34


def test_plan_table_module_callable():
    result = runner.invoke(app, ["plan", "--model", "initscope.models:plain34", "--method", "xavier", "--input-shape", "3,32,32"])
    assert result.exit_code == 0, result.output
    assert "pred_out" in result.output


def test_plan_bad_model_and_shape():
    result = runner.invoke(app, ["plan", "--model", "no_such_net", "--input-shape", "3,32,32"])
    assert result.exit_code == 2 and "unknown model" in result.output
    result = runner.invoke(app, ["plan", "--model", "plain34", "--input-shape", "three"])
    assert result.exit_code == 2


def test_methods():
    result = runner.invoke(app, ["methods"])
    assert result.exit_code == 0 and "asv-forward-exact" in result.output


def test_one_progress_bar_helper():
    import io

    from rich.console import Console

    from initscope.progress import progress_bar, step_bar

    with progress_bar("loss", "rate", enabled=False) as bar:  # a disabled bar still counts
        task = bar.add_task("epoch 1/1", total=4, loss="loss -", rate="- img/s")
        bar.update(task, advance=3, loss="loss 2.3026")
        assert bar.tasks[0].completed == 3 and bar.tasks[0].fields["loss"] == "loss 2.3026"
    out = io.StringIO()
    with step_bar(3, console=Console(file=out, width=120)) as step:
        for what in ("planning a", "planning b", "drawing"):
            step(what)
    assert "3/3" in out.getvalue() and "drawing" in out.getvalue()  # the last step is counted on leaving


def test_help_lists_every_command():
    result = runner.invoke(app, ["--help"])
    for command in ("plan", "methods", "compare", "train", "sweep", "report", "demo"):
        assert command in result.output


def test_your_own_model_from_the_command_line_and_a_table_that_fits():
    # plan/compare/audit could not pass a model's arguments (compare --data mnist --input-shape
    # 1,28,28 failed on a 3-channel stem), and the plan table was 131 columns wide under COLUMNS=80.
    import json
    import os

    from typer.testing import CliRunner

    from initscope.cli import app

    args = ["plan", "--model", "plain34", "--model-arg", "width=8", "--model-args", '{"in_channels": 1}',
            "--input-shape", "1,28,28"]
    whole = CliRunner().invoke(app, args + ["--json"])
    assert whole.exit_code == 0, whole.output
    plan = json.loads(whole.output)
    assert plan["layers"][0]["weight_shape"] == [8, 1, 7, 7] and "eps" in plan["layers"][0]
    narrow = CliRunner().invoke(app, args, env={**os.environ, "COLUMNS": "80"})
    assert narrow.exit_code == 0
    table = [line for line in narrow.output.splitlines() if line.startswith(("┃", "│", "┏", "└"))]
    assert table and max(len(line) for line in table) <= 80
    assert "left out to fit the terminal" in narrow.output and "--json" in narrow.output
    chosen = CliRunner().invoke(app, args + ["--columns", "layer,std,gamma"])
    assert "gamma" in chosen.output and "pred_out" not in chosen.output
    bad = CliRunner().invoke(app, args + ["--columns", "layer,nope"])
    assert bad.exit_code == 2 and "unknown column" in bad.output
    typo = CliRunner().invoke(app, ["plan", "--model", "plain34", "--model-arg", "widht=8"])
    assert typo.exit_code == 2 and "widht" in typo.output


def test_listing_methods_imports_neither_torchvision_nor_timm():
    # `initscope methods` and `--help` are what a user runs first; torchvision's import (torch._dynamo)
    # costs as much as torch's own (benchmarks/cli_start.py). Its rules register at trace time instead.
    code = ("import sys, initscope.cli\n"
            "from typer.testing import CliRunner\n"
            "r = CliRunner().invoke(initscope.cli.app, ['methods'])\n"
            "assert r.exit_code == 0 and 'asv-backward' in r.output, r.output\n"
            "print(sorted(m for m in ('torchvision', 'timm', 'torch._dynamo') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_torchvision_rules_register_when_a_model_is_traced():
    import torchvision

    from initscope.rules import registry

    block = torchvision.ops.StochasticDepth(0.2, "row").train()
    model = nn.Sequential(nn.Conv2d(3, 8, 3), block, torchvision.ops.misc.Permute([0, 2, 3, 1]), nn.Flatten(),
                          nn.Linear(8 * 6 * 6, 4))
    initscope.plan(model, "kaiming-forward", input_shape=(3, 8, 8), cache=False)  # no UnknownOpError
    assert registry.function_rule(torchvision.ops.stochastic_depth) is not None
    assert registry.module_rule(torchvision.ops.misc.Permute([0, 1])) is not None
