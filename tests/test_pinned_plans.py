"""Every plan is what it was: the stds and predictions of five networks under every method, pinned.

``tests/pinned/plans.json.gz`` was written by ``tests/pinned/make_pinned.py`` before the registries and
the pass-owned state of issue 13 replaced the name checks and ``node.meta`` channels; a refactor that
moves any number by more than 1e-12 (relative) is a change of the math, not of the code's shape.
"""

import gzip
import json
import math
import sys
from pathlib import Path

import pytest

import initscope

sys.path.insert(0, str(Path(__file__).parent / "pinned"))
from make_pinned import FIELDS, SHAPE, cases, describe, key, models  # noqa: E402

PINNED = Path(__file__).parent / "pinned" / "plans.json.gz"
REL = 1e-12


def _pinned() -> dict:
    with gzip.open(PINNED, "rt") as fh:
        return json.load(fh)


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        if a is None or b is None:
            return a is b
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return a == b or abs(a - b) <= REL * max(abs(a), abs(b))
    return a == b


@pytest.fixture(scope="module")
def nets():
    return models()


@pytest.mark.slow
@pytest.mark.parametrize("model", ["plain34", "resnet50", "mobilenet_v2", "densenet121", "efficientnet_b0"])
def test_plans_are_unchanged(model, nets, one_thread):
    pinned = _pinned()
    # The methods there were when the plans were pinned (methods added since are not pinned).
    methods = list(dict.fromkeys(k.split("|")[1] for k in pinned))
    checked = 0
    for name, method, options in cases(methods):
        if name != model:
            continue
        k = key(name, method, options)
        assert k in pinned, f"no pinned plan for {k}"
        got = describe(initscope.plan(nets[model], method, input_shape=SHAPE, cache=False, **options))
        want = pinned[k]
        assert [l["name"] for l in got["layers"]] == [l["name"] for l in want["layers"]], k
        for g, w in zip(got["layers"], want["layers"]):
            for f in FIELDS:
                assert _same(g[f], w[f]), f"{k} {g['name']}.{f}: {g[f]!r} != pinned {w[f]!r}"
        assert got["norm_scales"].keys() == want["norm_scales"].keys(), k
        for n in got["norm_scales"]:
            assert _same(got["norm_scales"][n], want["norm_scales"][n]), (k, n)
        assert json.loads(json.dumps(got["residual"])) == want["residual"], k
        assert got["notes"] == want["notes"], k
        checked += 1
    assert checked >= 10
