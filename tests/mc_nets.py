"""Small nets the Monte Carlo tests share: an op between two convs, so that its forward is read at the
second conv's output and its backward at the first conv's input (tests/test_rules_mc.py, test_norm_eval.py)."""

from __future__ import annotations

from torch import nn


class Sandwich(nn.Module):
    """``Conv2d(3, width)``, the op, ``Conv2d(c_mid or width, 16)``; 3×3 convs with padding, no bias."""

    def __init__(self, op: nn.Module, width: int, c_mid: int | None = None) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.op = op
        self.b = nn.Conv2d(c_mid or width, 16, 3, padding=1, bias=False)

    def forward(self, x):
        return self.b(self.op(self.a(x)))
