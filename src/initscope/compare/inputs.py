"""The batch a comparison probes with: i.i.d. Gaussian noise, or images from a data source.

Images come from :func:`initscope.experiments.data.load_data` (the same sources, loading, resizing and
normalization as training: pixels to [-1, 1] by default): the first ``batch`` images of the seeded
train split (then validation and test, for a source smaller than the batch), resized to the model's
``(H, W)``, a grey channel repeated when the model takes three. Nothing is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

GAUSSIAN = "gaussian"


@dataclass(frozen=True)
class Batch:
    """The inputs, and a line saying where they came from (shown in the report)."""

    inputs: torch.Tensor
    description: str
    gaussian: bool


def sources() -> tuple[str, ...]:
    """What ``--data`` takes: ``gaussian`` and every registered data source as it is written."""
    from initscope.experiments.data import source_usages

    return (GAUSSIAN, *source_usages())


def check_source(data: str | None, root: str | Path | None = None) -> None:
    """Raise a ValueError for a source that cannot be read (unknown, or its files missing), before anything
    is computed."""
    if data is None or data == GAUSSIAN:
        return
    from initscope.errors import ConfigError
    from initscope.experiments.data import parse_data

    try:
        ref = parse_data(data)
    except ConfigError as exc:
        raise ConfigError(f"{exc}; or {GAUSSIAN} (i.i.d. N(0, 1) noise, the default)") from None
    try:
        ref.check(root)
    except FileNotFoundError as exc:  # a folder or a torchvision set not on disk: a bad argument, not a crash
        raise ValueError(str(exc)) from None


def load_batch(data: str | None, input_shape: tuple[int, ...], batch: int, seed: int = 0,
               root: str | Path | None = None, normalize: str = "minus-one-one") -> Batch:
    """``batch`` inputs of shape ``input_shape`` from ``data`` (None or ``gaussian``: i.i.d. N(0, 1), seeded)."""
    check_source(data, root)
    if batch < 1:
        raise ValueError(f"batch={batch} must be at least 1")
    if data is None or data == GAUSSIAN:
        gen = torch.Generator().manual_seed(seed)
        return Batch(torch.randn(batch, *input_shape, generator=gen), "Gaussian: i.i.d. N(0, 1)", True)
    if len(input_shape) != 3:
        raise ValueError(f"input_shape={tuple(input_shape)}: image data needs (C, H, W)")
    from initscope.experiments.data import load_data, parse_data

    c, h, w = input_shape
    channels = c if c in (1, 3) and parse_data(data).source.converts_channels else None
    splits = load_data(data, root=root, seed=seed, image_size=(h, w), normalize=normalize, in_channels=channels)
    images, taken = [], 0
    for part in (splits.train, splits.val, splits.test):
        take = min(batch - taken, len(part))
        if take > 0:
            images.append(torch.stack([part[i][0] for i in range(take)]))
            taken += take
    x = torch.cat(images)
    if x.shape[1] != c:
        if x.shape[1] != 1:
            raise ValueError(f"data={data!r} has {x.shape[1]} channels, the model takes {c} (input_shape={tuple(input_shape)})")
        x = x.expand(-1, c, -1, -1).contiguous()  # grey images into a colour model
    note = f"{data}: the first {len(x)} images of the seeded train split (seed {seed}), {h}x{w}, {normalize}"
    if len(x) < batch:
        note += f" (the whole source: fewer than batch={batch})"
    return Batch(x, note, False)
