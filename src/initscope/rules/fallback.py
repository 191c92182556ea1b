"""What an op with no rule becomes when the caller asks for it (``on_unknown``).

``skip`` models it as the identity, ``kaiming`` as a ReLU (half the second moment each way), which is
what Kaiming's initialization assumes of every layer. Either way the output's shape comes from
running the op on fake tensors, and its second moment is uniform.
"""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from initscope.rules.base import Context, Rule
from initscope.rules.passthrough import _signals, _swap
from initscope.stats.signal import Grad, Signal, compact


def _stand_in(s: Signal) -> torch.Tensor:
    return s.const if s.const is not None else torch.empty(s.shape)


class FallbackRule(Rule):
    def __init__(self, halve: bool = False) -> None:
        self.factor = 0.5 if halve else 1.0

    def _run(self, ctx: Context, args, kwargs):
        node = ctx.node
        with FakeTensorMode(allow_non_fake_inputs=True):
            # A constant goes in as itself (an index buffer must stay an integer tensor); a tensor as
            # an empty one of its shape.
            fake_args = _swap(args, _stand_in)
            fake_kwargs = _swap(kwargs, _stand_in)
            if node.op == "call_module":
                out = ctx.module(*fake_args, **fake_kwargs)
            elif node.op == "call_method":
                out = getattr(fake_args[0], node.target)(*fake_args[1:], **fake_kwargs)
            else:
                out = node.target(*fake_args, **fake_kwargs)
        return out

    def forward(self, ctx: Context, *args, **kwargs):
        x = _signals(args) + _signals(kwargs)
        m = sum(s.mean_m2 for s in x) / max(len(x), 1) * self.factor
        out = self._run(ctx, args, kwargs)

        def wrap(o):
            if isinstance(o, torch.Tensor):
                shape = torch.Size(o.shape)
                return Signal(shape, compact(torch.tensor(m, dtype=torch.float64), shape))
            if isinstance(o, (tuple, list)):
                return type(o)(wrap(v) for v in o)
            return o

        return wrap(out)

    def backward(self, ctx: Context, grad) -> dict:
        grads = grad if isinstance(grad, (list, tuple)) else [grad]
        g = [x.mean_m2 for x in grads if x is not None]
        m = (sum(g) / max(len(g), 1)) * self.factor
        return {s: Grad(s.shape, compact(torch.tensor(m, dtype=torch.float64), s.shape))
                for s in _signals(ctx.args) + _signals(ctx.kwargs) if s.const is None}
