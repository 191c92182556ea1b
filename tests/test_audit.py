"""``initscope.audit``: the initialization a model holds, checked; each flag caught on a model built to
have it, and a model initialized as a scheme says passes clean."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import initscope
from initscope.models import create_model


class Block(nn.Module):
    """A pre-norm transformer block; its attention's output projection is ``attn_out``."""

    def __init__(self, e: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(e), nn.LayerNorm(e)
        self.qkv, self.attn_out = nn.Linear(e, 3 * e), nn.Linear(e, e)
        self.fc, self.proj = nn.Linear(e, 4 * e), nn.Linear(4 * e, e)

    def forward(self, x):
        b, n, e = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, e // self.heads).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(e // self.heads), dim=-1)
        x = x + self.attn_out((a @ v).transpose(1, 2).reshape(b, n, e))
        return x + self.proj(F.gelu(self.fc(self.norm2(x))))


class TinyTransformer(nn.Module):
    def __init__(self, e: int = 64, depth: int = 4, heads: int = 4, tokens: int = 16) -> None:
        super().__init__()
        self.embed = nn.Linear(8, e)
        self.pos = nn.Parameter(torch.zeros(1, tokens, e))
        self.blocks = nn.Sequential(*[Block(e, heads) for _ in range(depth)])
        self.head = nn.Linear(e, 10)
        # GPT-2's scheme: N(0, 0.02) everywhere, the residual branches' output projections scaled by
        # 1/sqrt(2 L), by a name match meant for both "attn_out" and "proj" that only hits "proj": the bug.
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=0.02, generator=g)
                    nn.init.zeros_(m.bias)
            for name, p in self.named_parameters():
                if name.endswith(".proj.weight"):
                    nn.init.normal_(p, std=0.02 / math.sqrt(2 * depth), generator=g)

    def forward(self, x):
        return self.head(self.blocks(self.embed(x) + self.pos).mean(1))


def test_a_scaled_output_projection_that_was_never_applied():
    model = TinyTransformer()
    report = initscope.audit(model, input_shape=(16, 8))
    ends = [l for l in report.layers if l.branch_end]
    assert {l.name.split(".")[-1] for l in ends} == {"attn_out", "proj"} and len(ends) == 8
    for layer in ends:
        if layer.name.endswith("proj"):
            assert "normal(0.02)/sqrt(8)" in layer.matches and not layer.flags
        else:
            assert "normal(0.02)" in layer.matches
            assert any("scaled for depth" in f and "never applied" in f for f in layer.flags), layer.flags
    # Nothing else inside the blocks is flagged (a branch may be small on purpose: its signal and
    # gradient are not judged, the path through the shortcuts is; at this width N(0, 0.02) leaves the
    # logits at 2^-16 for unit inputs, which the head's flag says).
    inside = {name for name in report.flagged if name.startswith("blocks.")}
    assert inside == {f"blocks.{i}.attn_out" for i in range(4)}


def test_a_cnn_with_one_layer_drawn_twice_and_one_never_initialized():
    model = create_model("plain34", width=8, num_classes=10)
    initscope.init_(model, "kaiming-forward", input_shape=(3, 32, 32), generator=torch.Generator().manual_seed(0))
    a, b = model.get_submodule("5"), model.get_submodule("9")  # two 3x3 convs of one stage, one shape
    assert a.weight.shape == b.weight.shape
    with torch.no_grad():
        for conv in (a, b):  # each drawn after re-seeding: the same draw twice
            nn.init.kaiming_normal_(conv.weight, generator=torch.Generator().manual_seed(7))
        model.get_submodule("13").weight.fill_(0.01)
    report = initscope.audit(model, input_shape=(3, 32, 32))
    assert any("same values as 9" in f for f in report["5"].flags)
    assert any("same values as 5" in f for f in report["9"].flags)
    assert any("every entry is 0.01" in f for f in report["13"].flags)
    assert "kaiming-forward" in report["11"].matches
    # A constant layer passes no gradient's fluctuation back: below it the gradient dies, and says so.
    assert report["11"].flags == [f for f in report["11"].flags if "gradient dies" in f] != []


def test_a_layer_left_at_its_default_among_reinitialized_siblings():
    model = create_model("resnet18", width=16, num_classes=10)
    initscope.init_(model, "kaiming-forward", input_shape=(3, 32, 32), generator=torch.Generator().manual_seed(0))
    model.layer3[1].conv1.reset_parameters()  # a re-init that missed it: PyTorch's default
    report = initscope.audit(model, input_shape=(3, 32, 32))
    layer = report["layer3.1.conv1"]
    assert "default" in layer.matches and "kaiming-forward" not in layer.matches
    assert any("siblings" in f and "kaiming-forward" in f for f in layer.flags)
    assert report.flagged == ["layer3.1.conv1"]


def test_signal_that_dies_and_zero_layers():
    model = create_model("plain34", width=8, num_classes=10)
    initscope.init_(model, "xavier", input_shape=(3, 32, 32))  # the poster's Xavier: the signal dies
    report = initscope.audit(model, input_shape=(3, 32, 32))
    assert any("signal dies" in f for f in report.layers[-1].flags)
    assert not math.isnan(report.layers[-1].pred_out_var) and not math.isnan(report.layers[-1].meas_out_var)
    fixed = create_model("resnet18-nobn", width=8, num_classes=10)
    initscope.init_(fixed, "fixup", input_shape=(3, 32, 32))
    zero = initscope.audit(fixed, input_shape=(3, 32, 32))
    # Fixup zeroes branch ends and the classifier on purpose: not flagged as never initialized.
    assert not any("never initialized" in f for l in zero.layers for f in l.flags)
    with torch.no_grad():
        fixed.layer2[0].conv1.weight.zero_()
    assert any("all zero" in f for f in initscope.audit(fixed, input_shape=(3, 32, 32))["layer2.0.conv1"].flags)


def test_a_model_initialized_by_one_scheme_is_clean_and_unchanged():
    model = create_model("resnet18-nobn", width=8, num_classes=10)
    initscope.init_(model, "asv-backward", input_shape=(3, 32, 32))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = initscope.audit(model, input_shape=(3, 32, 32))
    assert report.flagged == []
    assert all("asv-backward" in l.matches for l in report.layers)
    for layer in report.layers:  # predicted from the weights it holds, beside the measurement
        assert abs(math.log2(layer.meas_out_var / layer.pred_out_var)) < 1.5, layer.name
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    frame = report.to_frame()
    assert list(frame["layer"]) == [l.name for l in report.layers]


def test_audit_from_the_command_line_with_a_checkpoint(tmp_path):
    import json

    from safetensors.torch import save_file
    from typer.testing import CliRunner

    from initscope.cli import app

    model = create_model("plain34", width=8, num_classes=10)
    initscope.init_(model, "kaiming-forward", input_shape=(3, 32, 32))
    with torch.no_grad():
        model.get_submodule("13").weight.fill_(0.01)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "w.safetensors"))
    args = ["audit", "--model", "initscope.models:plain34", "--input-shape", "3,32,32",
            "--checkpoint", str(tmp_path / "w.safetensors")]
    # module:callable builds plain34 at its defaults (width 16); the checkpoint is width 8: a clear error.
    out = CliRunner().invoke(app, args)
    assert out.exit_code == 2 and "size mismatch" in out.output
    torch.save(model.state_dict(), tmp_path / "w.pt")
    out = CliRunner().invoke(app, ["audit", "--model", "tests_audit_models:plain8", "--input-shape", "3,32,32",
                                   "--checkpoint", str(tmp_path / "w.pt"), "--json"])
    assert out.exit_code == 0, out.output
    rows = [json.loads(line) for line in out.output.splitlines()]
    assert [r["layer"] for r in rows if "every entry is 0.01" in r["flags"]] == ["13"]
