"""The batch a comparison probes with: Gaussian noise, scikit-learn's digits, or an image folder.

Images are resized to the requested ``(C, H, W)`` (bilinear), grey images are repeated over the
channels, and pixel values are mapped to [-1, 1] as in the Glorot/He paper. Nothing is downloaded:
the digits ship inside scikit-learn.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

SOURCES = ("gaussian", "digits", "folder:PATH")
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


@dataclass(frozen=True)
class Batch:
    """The inputs, and a line saying where they came from (shown in the report)."""

    inputs: torch.Tensor
    description: str
    gaussian: bool


def check_source(data: str | None) -> None:
    """Raise a ValueError for a source this module cannot read, before anything is computed."""
    if data is None or data in ("gaussian", "digits"):
        return
    if data.startswith("folder:"):
        root = Path(data[len("folder:"):]).expanduser()
        if not root.is_dir():
            raise ValueError(f"data={data!r}: {str(root)!r} is not a folder")
        return
    raise ValueError(f"data={data!r} is not one of {SOURCES}")


def load_batch(data: str | None, input_shape: tuple[int, ...], batch: int, seed: int = 0) -> Batch:
    """``batch`` inputs of shape ``input_shape`` from ``data`` (None or ``gaussian``: i.i.d. N(0, 1))."""
    check_source(data)
    if batch < 1:
        raise ValueError(f"batch={batch} must be at least 1")
    if data is None or data == "gaussian":
        gen = torch.Generator().manual_seed(seed)
        return Batch(torch.randn(batch, *input_shape, generator=gen), "Gaussian: i.i.d. N(0, 1)", True)
    if len(input_shape) != 3:
        raise ValueError(f"input_shape={input_shape}: image data needs (C, H, W)")
    if data == "digits":
        from sklearn.datasets import load_digits

        images = torch.as_tensor(load_digits().images, dtype=torch.float32) / 16.0  # 8x8, values 0..16
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:batch]
        x = images[order].unsqueeze(1)
        where = f"scikit-learn digits: {len(x)} random images (seed {seed}), 8x8 resized to {input_shape[1]}x{input_shape[2]}"
    else:
        x, where = _folder(Path(data[len("folder:"):]).expanduser(), batch, input_shape[0])
    x = _fit(x, input_shape)
    return Batch(x * 2.0 - 1.0, where + ", scaled to [-1, 1]", False)


def _fit(x: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """Resize ``(N, c, h, w)`` images in [0, 1] to ``shape``; one grey channel is repeated to C."""
    c, h, w = shape
    if x.shape[1] not in (1, c):
        raise ValueError(f"images have {x.shape[1]} channels, the model wants {c}")
    if x.shape[-2:] != (h, w):
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False).clamp(0.0, 1.0)
    return x.expand(-1, c, -1, -1).contiguous() if x.shape[1] != c else x


def _folder(root: Path, batch: int, channels: int) -> tuple[torch.Tensor, str]:
    """The first ``batch`` images of an ImageFolder tree (``root/<class>/<image>``), in sorted order."""
    from PIL import Image

    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"no images ({', '.join(_IMAGE_SUFFIXES)}) under {str(root)!r}")
    mode = "L" if channels == 1 else "RGB"
    tensors = []
    for path in files[:batch]:
        with Image.open(path) as im:
            im = im.convert(mode)
            t = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(im.height, im.width, -1)
        tensors.append(t.permute(2, 0, 1).float() / 255.0)
    # Images of different sizes are brought to the first one's before stacking; _fit resizes the lot.
    h, w = tensors[0].shape[-2:]
    x = torch.stack([t if t.shape[-2:] == (h, w) else
                     F.interpolate(t[None], size=(h, w), mode="bilinear", align_corners=False)[0] for t in tensors])
    note = f"folder {str(root)!r}: first {len(tensors)} of {len(files)} images"
    if len(tensors) < batch:
        note += f" (fewer than batch={batch})"
    return x, note
