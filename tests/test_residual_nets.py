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
