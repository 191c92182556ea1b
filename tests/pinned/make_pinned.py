"""Regenerate ``plans.json.gz``: the plans the refactor of issue 13 must leave unchanged.

Run from the repository root: ``python tests/pinned/make_pinned.py``. Only regenerate when a change is
meant to move predictions, and say so in its commit.
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import torch

import initscope
from initscope.models import create_model

HERE = Path(__file__).parent
SHAPE = (3, 64, 64)
FIELDS = ("std", "fan_in", "fan_out", "eps", "tau_in", "gamma", "clamped", "residual_scale", "pred_out_var",
          "pred_in_grad_var", "out_spread", "grad_spread", "calls", "bias", "distribution")


def models() -> dict[str, torch.nn.Module]:
    return {
        "plain34": create_model("plain34", width=16),
        "resnet50": create_model("resnet50"),
        "mobilenet_v2": create_model("mobilenet_v2"),
        "densenet121": create_model("densenet121"),
        "efficientnet_b0": create_model("efficientnet_b0"),
    }


# (model, method, options): every method on every model, and the options that take other paths.
EXTRA = [
    ("mobilenet_v2", "kaiming-backward", {"fan": "framework"}),
    ("resnet50", "asv-backward", {"residual": "zero"}),
    ("resnet50", "asv-forward", {"residual": "none"}),
    ("resnet50", "asv-backward-exact", {"residual": "zero"}),
    ("plain34", "asv-backward", {"max_std_ratio": None}),
    ("plain34", "asv-forward-exact", {"distribution": "uniform"}),
    ("efficientnet_b0", "asv-backward", {"max_cov_positions": 16}),
]


def cases(methods) -> list[tuple[str, str, dict]]:
    return [(m, meth, {}) for m in models() for meth in methods] + EXTRA


def describe(p) -> dict:
    return {
        "layers": [{"name": l.name, **{f: getattr(l, f) for f in FIELDS}} for l in p.layers],
        "norm_scales": dict(p.norm_scales),
        "residual": dict(p.residual),
        "notes": list(p.notes),
    }


def key(model: str, method: str, options: dict) -> str:
    return f"{model}|{method}|{json.dumps(options, sort_keys=True)}"


def main() -> None:
    torch.set_num_threads(1)
    nets = models()
    out = {}
    for model, method, options in cases([m for m in initscope.METHODS if not initscope.METHODS[m].needs_data]):
        p = initscope.plan(nets[model], method, input_shape=SHAPE, cache=False, **options)
        out[key(model, method, options)] = describe(p)
        print(model, method, options, file=sys.stderr)
    with gzip.open(HERE / "plans.json.gz", "wt") as fh:
        json.dump(out, fh)


if __name__ == "__main__":
    main()
