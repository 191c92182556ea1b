"""A small U-Net: an encoder of conv pairs and max pools, a decoder that upsamples (a transposed
conv, then a bilinear upsampling) and concatenates the encoder's maps, no normalization.

``unet_like()`` reads a 3×32×32 image: encoder 16 → 32 → 64 channels at 32, 16 and 8 pixels; decoder
``ConvTranspose2d(64, 32, 2, stride=2)`` back to 16 pixels and ``Upsample(bilinear)`` to 32, each
followed by the skip concatenation and a conv pair; a 1×1 conv to ``out_channels``. It is the
encoder–decoder on which initscope's predictions are held against measurement (tests/test_unet.py).
"""

from __future__ import annotations

import torch
from torch import nn


def _pair(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(), nn.Conv2d(c_out, c_out, 3, padding=1),
                         nn.ReLU())


class UNet(nn.Module):
    def __init__(self, in_channels: int = 3, out_channels: int = 3, width: int = 16):
        super().__init__()
        w = width
        self.enc1, self.enc2 = _pair(in_channels, w), _pair(w, 2 * w)
        self.pool = nn.MaxPool2d(2)
        self.bottom = _pair(2 * w, 4 * w)
        self.up2 = nn.ConvTranspose2d(4 * w, 2 * w, 2, stride=2)
        self.dec2 = _pair(4 * w, 2 * w)
        self.up1 = nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                                 nn.Conv2d(2 * w, w, 1))
        self.dec1 = _pair(2 * w, w)
        self.out = nn.Conv2d(w, out_channels, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(self.pool(e1))
        b = self.bottom(self.pool(e2))
        d2 = self.dec2(torch.cat([self.up2(b), e2], dim=1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], dim=1))
        return self.out(d1)


def unet_like(**kwargs) -> UNet:
    return UNet(**kwargs)
