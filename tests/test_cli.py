import json

from typer.testing import CliRunner

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
