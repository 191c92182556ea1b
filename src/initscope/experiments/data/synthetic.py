"""``synthetic``: 1,200 class-conditional Gaussian images (10 classes, 3x32x32), the same for every seed.

The pixel logits of class ``c`` are a smooth random prototype (4x4, upsampled) plus white noise,
squashed to [0, 1] by a sigmoid: learnable, since convolutions rather than single pixels carry the
class. The images are drawn from a fixed seed; a run's seed draws the split, as for real data.
"""

from __future__ import annotations

import torch

from initscope.experiments.data.base import DataSource, Images, register_source
from initscope.experiments.data.splits import resize, square

SYNTHETIC_N, SYNTHETIC_CLASSES, SYNTHETIC_SEED = 1200, 10, 1234


@register_source("synthetic")
class Synthetic(DataSource):
    summary = "1,200 Gaussian images of 10 classes, 3x32x32 (generated)"
    converts_channels = True

    def load(self, arg, *, root, image_size, in_channels, progress) -> Images:
        size = square(image_size, (32, 32))
        c = in_channels or 3
        g = torch.Generator().manual_seed(SYNTHETIC_SEED)
        # smooth prototypes (4x4 upsampled) so that convolutions, not single pixels, carry the class
        proto = resize(torch.randn(SYNTHETIC_CLASSES, c, 4, 4, generator=g), size) * 1.5
        y = torch.arange(SYNTHETIC_N) % SYNTHETIC_CLASSES
        y = y[torch.randperm(SYNTHETIC_N, generator=g)]
        x = torch.sigmoid(proto[y] + torch.randn(SYNTHETIC_N, c, *size, generator=g))
        return Images(x, y, [f"class{i}" for i in range(SYNTHETIC_CLASSES)])
