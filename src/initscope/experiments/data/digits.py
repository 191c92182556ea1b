"""``digits``: scikit-learn's bundled 8x8 handwritten digits, resized to 32x32. Needs no download.

1,797 images of 10 classes, pixel values 0..16 scaled to [0, 1], resized by bilinear interpolation
(``image_size`` changes the size); split 60/20/20 per class with the seed, like every source without an
official test split.
"""

from __future__ import annotations

import torch

from initscope.experiments.data.base import DataSource, Images, register_source
from initscope.experiments.data.splits import resize, square


@register_source("digits")
class Digits(DataSource):
    summary = "scikit-learn's 8x8 digits at 32x32 (bundled, no download)"

    def load(self, arg, *, root, image_size, in_channels, progress) -> Images:
        from sklearn.datasets import load_digits

        d = load_digits()
        x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # pixel values are 0..16
        return Images(resize(x, square(image_size, (32, 32))), torch.tensor(d.target, dtype=torch.long),
                      [str(i) for i in range(10)])
