"""``folder:PATH``: an ImageFolder tree (``PATH/<class>/<image>``), decoded once into memory.

A relative ``PATH`` is looked for under the data root (``--data-root``) first, then where the command
runs; so a sweep file can name ``folder:plant-seedlings-64`` and each user says where their data live.
The images are split 60/20/20 per class with the seed (:meth:`DataSplits.save_split` writes the split
as JSON). Worker processes decode every image once, so no epoch waits on the disk; an image that cannot
be decoded is reported by path (a warning, and ``DataSplits.skipped``) and left out before the split is
drawn. Mixed modes (L, RGBA, P, CMYK) are converted to RGB (or L for ``in_channels=1``); images of
another size are resized (bilinear) to ``image_size`` (default: the first readable image's size).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch.utils.data import Dataset

from initscope.experiments.data.base import DataSource, Images, register_source
from initscope.experiments.data.splits import square
from initscope.progress import progress_bar

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
# Decoding in the loading process is quicker than starting workers for a small folder.
_MIN_FILES_FOR_WORKERS = 500


def _decode(path: str, size: tuple[int, int] | None, mode: str) -> torch.Tensor | None:
    """One image file as a uint8 (C, H, W) tensor, converted to ``mode``, resized to ``size``; None if unreadable."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert(mode)
            if size is not None and im.size != (size[1], size[0]):
                im = im.resize((size[1], size[0]), Image.BILINEAR)
            data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
            return data.view(im.size[1], im.size[0], len(mode)).permute(2, 0, 1).clone()
    except Exception:  # any decoder failure means the file is unusable; it is reported by path
        return None


class _Files(Dataset):
    def __init__(self, files: list[str], size: tuple[int, int], mode: str) -> None:
        self.files, self.size, self.mode = files, size, mode

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        return i, _decode(self.files[i], self.size, self.mode)


@register_source("folder")
class Folder(DataSource):
    summary = "an ImageFolder tree PATH/<class>/<image>, under --data-root or where the command runs"
    argument = "PATH"
    converts_channels = True

    def parse(self, arg: str) -> Path:
        return Path(arg).expanduser()

    @staticmethod
    def candidates(path: Path, root: str | Path | None) -> list[Path]:
        """Where ``path`` may lie: under ``root`` (when given and ``path`` is relative), then as it is."""
        if path.is_absolute() or root is None:
            return [path]
        return [Path(root) / path, path]

    def resolve(self, path: Path, root: str | Path | None) -> Path:
        """The folder ``path`` names, or FileNotFoundError saying where it was looked for."""
        candidates = self.candidates(path, root)
        for cand in candidates:
            if cand.is_dir():
                return cand
        where = "" if len(candidates) == 1 else f" (looked in {' and '.join(map(str, candidates))})"
        raise FileNotFoundError(f"folder:{path}: no such directory{where}; a relative path is taken under "
                                "--data-root, then where the command runs")

    @staticmethod
    def classes(folder: Path, spec: str) -> list[str]:
        """The class sub-folders of ``folder`` (none is refused)."""
        classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not classes:
            raise ValueError(f"{spec}: no class sub-folders (expected PATH/<class>/<image>)")
        return classes

    @staticmethod
    def refuse_one_class(classes: list[str], spec: str) -> None:
        """One class is nothing to classify: the run would train to the end and fail in the metrics."""
        if len(classes) == 1:
            raise ValueError(f"{spec}: one class sub-folder ({classes[0]!r}); classification needs at least two "
                             "(PATH/<class>/<image>, one folder per class)")

    def check(self, path: Path, root) -> None:
        spec = f"folder:{path}"
        self.refuse_one_class(self.classes(self.resolve(path, root), spec), spec)

    def load(self, path: Path, *, root, image_size, in_channels, progress) -> Images:
        folder = self.resolve(path, root)
        spec = f"folder:{path}"
        classes = self.classes(folder, spec)
        files, labels = [], []
        for k, c in enumerate(classes):
            for f in sorted((folder / c).rglob("*")):
                if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
                    files.append(str(f))
                    labels.append(k)
        if not files:
            raise ValueError(f"{spec}: no images ({', '.join(IMAGE_SUFFIXES)}) under {', '.join(classes)}")
        self.refuse_one_class(classes, spec)
        mode = "L" if in_channels == 1 else "RGB"
        size = square(image_size, (0, 0))
        if image_size is None:  # the first readable image sets the size
            for f in files:
                first = _decode(f, None, mode)
                if first is not None:
                    size = tuple(first.shape[-2:])
                    break
        images: list[torch.Tensor | None] = [None] * len(files)
        workers = 0 if len(files) < _MIN_FILES_FOR_WORKERS else min(4, os.cpu_count() or 1)
        loader = torch.utils.data.DataLoader(_Files(files, size, mode), batch_size=64, num_workers=workers,
                                             collate_fn=list)
        with progress_bar(enabled=progress, transient=True) as bar:
            task = bar.add_task(f"decoding {len(files)} images", total=len(files))
            for batch in loader:
                for i, img in batch:
                    images[i] = img
                bar.advance(task, len(batch))
        skipped = [f for f, img in zip(files, images) if img is None]
        for f in skipped:
            warnings.warn(f"{spec}: skipping unreadable image {f}", stacklevel=2)
        keep = [i for i, img in enumerate(images) if img is not None]
        if not keep:
            raise ValueError(f"{spec}: none of the {len(files)} images could be decoded")
        x = torch.stack([images[i] for i in keep]).float() / 255.0
        y = torch.tensor([labels[i] for i in keep], dtype=torch.long)
        return Images(x, y, classes, files=[os.path.relpath(files[i], folder) for i in keep], skipped=skipped)
