"""What each initialization hands the optimizer on the campaign's nets: the logits' second moment, the
cross-entropy, and ``|grad W| / |W|`` of the first, middle and last weight layers, on one batch of training
images at initialization (geometric mean over draws). SGD moves a weight by ``lr x gradient``, so the last
three columns are the relative step per unit of learning rate (docs/results/README.md, Table 3).

Run from the repository root with the data beside it:

    python docs/results/campaign/init_scales.py [--model plain50 --width 8 --image-size 48 --draws 3]
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F

import initscope
from initscope.experiments.config import RunConfig
from initscope.experiments.data import load_data
from initscope.experiments.training import build_model

METHODS = ("xavier", "kaiming-forward", "kaiming-backward", "asv-forward", "asv-backward", "asv-forward-exact",
           "asv-balanced", "lsuv")


def scales(config: RunConfig, x: torch.Tensor, y: torch.Tensor, classes: int) -> tuple[float, ...]:
    """(logits' second moment, loss, |grad W|/|W| of the first, middle and last weight layer) for one draw."""
    torch.manual_seed(config.seed)
    model = build_model(config, x.shape[1], classes).train()
    # LSUV rescales on a batch, as the training loop gives it one; the others plan from the shape alone
    where = {"example_input": x[:64]} if config.method == "lsuv" else {"input_shape": tuple(x.shape[1:])}
    initscope.init_(model, config.method, generator=torch.Generator().manual_seed(config.seed), **where)
    logits = model(x)
    loss = F.cross_entropy(logits, y)
    loss.backward()
    weights = [p for p in model.parameters() if p.ndim > 1]
    ratio = [float(p.grad.norm() / p.detach().norm()) for p in weights]
    picked = (ratio[0], ratio[len(ratio) // 2], ratio[-1])
    return (float(logits.detach().pow(2).mean()), float(loss.detach()), *picked)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="folder:food101-10-full")
    parser.add_argument("--data-root", default="../shared/data")
    parser.add_argument("--model", default="plain50")
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=48)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--methods", default=",".join(METHODS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = load_data(args.data, root=args.data_root, seed=0, image_size=args.image_size)
    x, y = (t[:args.batch] for t in data.train.tensors)
    print(f"{args.model} width {args.width}, {args.data} at {args.image_size} px, {len(x)} images, "
          f"{args.draws} draws (geometric mean)")
    print(f"{'method':<18} {'logits m2':>10} {'loss':>6} {'|gW|/|W| first':>15} {'middle':>9} {'last':>9}")
    for method in args.methods.split(","):
        draws = [scales(RunConfig(data=args.data, model=args.model, width=args.width, method=method, seed=s), x, y,
                        data.num_classes)
                 for s in range(args.draws)]
        mean = [math.exp(sum(math.log(max(d[i], 1e-300)) for d in draws) / len(draws)) for i in range(5)]
        print(f"{method:<18} {mean[0]:>10.3g} {mean[1]:>6.3g} {mean[2]:>15.3g} {mean[3]:>9.3g} {mean[4]:>9.3g}")


if __name__ == "__main__":
    main()
