"""Residual networks the way people write them: an ``nn.Identity`` (a norm or a Fixup scalar switched
off) between a block's input and its first conv must not change what is predicted there."""

import torch
import torch.nn.functional as F
from torch import nn

import initscope


class Block(nn.Module):
    def __init__(self, c: int, identity: bool) -> None:
        super().__init__()
        self.pre = nn.Identity() if identity else None
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)

    def forward(self, x):
        h = self.pre(x) if self.pre is not None else x
        return F.relu(self.conv2(F.relu(self.conv1(h))) + x)


class Net(nn.Module):
    def __init__(self, identity: bool) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.blocks = nn.Sequential(*[Block(8, identity) for _ in range(3)])
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(self.blocks(F.relu(self.stem(x))), 1).flatten(1))


def test_an_identity_before_the_branch_reads_the_gradient_of_the_block_input():
    # nn.Identity returns its input itself: the gradient measured at conv1's input is the block
    # input's, the branch's and the shortcut's together. It was predicted as the branch's alone, 4.6
    # bits low on a BatchNorm-free CIFAR ResNet-20 (its norms are Identities there).
    with_identity = initscope.plan(Net(True), "asv-backward", input_shape=(3, 16, 16), cache=False)
    without = initscope.plan(Net(False), "asv-backward", input_shape=(3, 16, 16), cache=False)
    for a, b in zip(with_identity.layers, without.layers):
        assert a.pred_in_grad_var == b.pred_in_grad_var, a.name
        assert a.pred_out_var == b.pred_out_var, a.name


def test_residual_policy_passes_a_zero_bias_at_the_branch_end():
    # Fixup's scalar bias (a parameter, 0 at init) sits between a branch's last conv and the add; the policy
    # was "not applied" there, so on the CIFAR ResNets with fixup_scalars residual="scale" and "zero" planned
    # exactly what "none" did (the depth sweep's asv-backward (residual=scale) and (residual=zero) runs were
    # the same runs). A bias that is zero changes nothing the knob scales: the policy reaches the conv.
    from initscope.models.cifar import resnet20

    model = resnet20(norm="none", fixup_scalars=True)
    plans = {pol: initscope.plan(model, "asv-backward", input_shape=(3, 32, 32), residual=pol, cache=False)
             for pol in ("none", "scale", "zero")}
    ends = [layer.name for layer in plans["none"].layers if layer.name.endswith("conv2")]
    assert len(ends) == 9
    assert not [n for p in plans.values() for n in p.notes if "residual policy not applied" in n]
    assert all(plans["zero"][e].std == 0.0 for e in ends)
    assert all(0 < plans["scale"][e].std < plans["none"][e].std for e in ends)
    # a bias that is not zero is a real offset: the branch is not positively homogeneous, the policy says so
    with torch.no_grad():
        model.layer1[0].bias2b.value.fill_(0.5)
    notes = initscope.plan(model, "asv-backward", input_shape=(3, 32, 32), residual="scale", cache=False).notes
    assert any("residual policy not applied" in n for n in notes)
