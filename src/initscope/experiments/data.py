"""Datasets for the experiments, split train/validation/test and normalized, as in-memory tensors.

``load_data(source)`` takes:

- ``digits``: scikit-learn's bundled 8x8 digits (1,797 images, 10 classes), resized to 32x32 by bilinear
  interpolation (``image_size`` changes it), split 60/20/20 per class with the seed. Needs no download.
- ``mnist``, ``fashion-mnist``, ``cifar10``, ``cifar100``: torchvision's files under ``root`` (or
  ``root/<source>``), never downloaded at run time; missing files raise ``FileNotFoundError`` naming
  every path looked for. The official test split is the test split; a stratified, seeded 1/6 of the
  official train split (10,000 images for MNIST and CIFAR) is the validation split.
- ``folder:PATH``: an ImageFolder tree (``PATH/<class>/<image>``), split ``split`` (60/20/20) per class
  with the seed; :meth:`DataSplits.save_split` writes the split as JSON. Images are decoded once, by
  worker processes, into memory, so no epoch waits on the disk; an image that cannot be decoded is
  reported by path (a warning, and ``DataSplits.skipped``) and left out before the split is drawn.
  Mixed modes (L, RGBA, P, CMYK) are converted to RGB (or L for ``in_channels=1``); images of another
  size are resized (bilinear) to ``image_size`` (default: the first image's size).
- ``synthetic``: 1,200 class-conditional Gaussian images (10 classes, 3x32x32): the pixel logits of
  class ``c`` are a smooth random prototype plus white noise, squashed to [0, 1]; learnable, and the
  same images for every seed (the seed draws the split, as for real data).

Pixels are first scaled to [0, 1]; then ``normalize``, both as in the second paper:
``minus-one-one`` maps them to [-1, 1] (``2x - 1``), ``mean-subtract`` subtracts the per-pixel mean
image of the train split (:math:`x - \\bar{x}_{train}`, per channel and position). ``limit`` keeps a
stratified, seeded subset of that many train images (validation and test are kept whole).
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

SOURCES = ("digits", "synthetic", "mnist", "fashion-mnist", "cifar10", "cifar100", "folder:PATH")
NORMALIZATIONS = ("minus-one-one", "mean-subtract")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
OFFICIAL_VAL_FRACTION = 1 / 6
SYNTHETIC_N, SYNTHETIC_CLASSES, SYNTHETIC_SEED = 1200, 10, 1234


@dataclass
class DataSplits:
    """Train/validation/test datasets (``TensorDataset`` of normalized images and int64 labels) and facts."""

    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    in_channels: int
    image_size: tuple[int, int]
    class_names: list[str]
    source: str
    split_indices: dict[str, list[int]] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)  # folder sources: the image paths split_indices index
    skipped: list[str] = field(default_factory=list)  # folder sources: images that could not be decoded
    normalize: str = "minus-one-one"
    seed: int = 0

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.in_channels, *self.image_size)

    def save_split(self, path: str | Path) -> Path:
        """Write the split (indices, and for folders the file paths of each split) as JSON; returns the path."""
        path = Path(path)
        doc: dict = {"source": self.source, "seed": self.seed, "class_names": self.class_names,
                     "indices": self.split_indices, "skipped": self.skipped}
        if self.files:
            doc["files"] = {k: [self.files[i] for i in v] for k, v in self.split_indices.items()}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        os.replace(tmp, path)
        return path


# ---------------------------------------------------------------------------------------------- splits


def _class_counts(n: int, fractions: Sequence[float]) -> list[int]:
    """Split ``n`` items into ``len(fractions)`` parts: the first ones rounded, the last takes the rest."""
    counts = [int(round(n * f)) for f in fractions[:-1]]
    while sum(counts) > n:  # rounding up in every part could overshoot a tiny class
        counts[counts.index(max(counts))] -= 1
    return counts + [n - sum(counts)]


def stratified_split(labels: torch.Tensor, fractions: Sequence[float], seed: int) -> list[list[int]]:
    """Indices of ``labels`` split by ``fractions`` within every class, each class shuffled with ``seed``.

    Class ``c`` with ``n_c`` items gives ``round(f_k n_c)`` to each part but the last, which takes the
    rest; so every part holds each class in proportion (up to rounding). Returns sorted index lists.
    """
    if abs(sum(fractions) - 1) > 1e-6 or any(f < 0 for f in fractions):
        raise ValueError(f"split fractions must be >= 0 and sum to 1, got {tuple(fractions)}")
    g = torch.Generator().manual_seed(seed)
    parts: list[list[int]] = [[] for _ in fractions]
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        start = 0
        for part, count in zip(parts, _class_counts(len(idx), fractions)):
            part.extend(idx[start:start + count].tolist())
            start += count
    return [sorted(p) for p in parts]


def stratified_subset(labels: torch.Tensor, n: int, seed: int) -> list[int]:
    """``n`` indices of ``labels`` drawn with ``seed``, each class in proportion (largest remainders)."""
    if n >= len(labels):
        return list(range(len(labels)))
    if n < 1:
        raise ValueError(f"limit must be >= 1, got {n}")
    classes, counts = torch.unique(labels, return_counts=True)
    exact = counts.double() * n / len(labels)
    take = exact.floor().long()
    rest = n - int(take.sum())
    take[torch.argsort(exact - take, descending=True, stable=True)[:rest]] += 1
    g = torch.Generator().manual_seed(seed)
    out: list[int] = []
    for c, k in zip(classes.tolist(), take.tolist()):
        idx = torch.nonzero(labels == c).flatten()
        out.extend(idx[torch.randperm(len(idx), generator=g)[:k]].tolist())
    return sorted(out)


# ---------------------------------------------------------------------------------------- normalizing


def _normalized(x01: dict[str, torch.Tensor], how: str) -> dict[str, torch.Tensor]:
    """Apply ``how`` to images in [0, 1]; ``mean-subtract`` takes the mean image of ``x01['train']``."""
    if how == "minus-one-one":
        return {k: v * 2 - 1 for k, v in x01.items()}
    if how == "mean-subtract":
        mean = x01["train"].mean(dim=0, keepdim=True)
        return {k: v - mean for k, v in x01.items()}
    raise ValueError(f"unknown normalize {how!r}; valid: {', '.join(NORMALIZATIONS)}")


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)


def _size(image_size: int | Sequence[int] | None, default: tuple[int, int]) -> tuple[int, int]:
    if image_size is None:
        return default
    if isinstance(image_size, int):
        return (image_size, image_size)
    return (int(image_size[0]), int(image_size[1]))


def _require_finite(source: str, x: torch.Tensor, files: list[str] | None) -> None:
    """Refuse images holding NaN or inf: every run on them would end ``diverged``, blaming the initialization."""
    bad = ~torch.isfinite(x.reshape(len(x), -1)).all(dim=1)
    if bool(bad.any()):
        first = int(bad.nonzero()[0])
        what = files[first] if files else f"image {first}"
        raise ValueError(f"{source}: {int(bad.sum())} image(s) hold NaN or inf values, the first is {what}; "
                         "fix or remove them before training")


def min_per_class(fractions: Sequence[float]) -> int:
    """The fewest images a class needs so that every split with a nonzero fraction gets one of them."""
    for n in range(1, 1000):
        if all(c >= 1 for c, f in zip(_class_counts(n, fractions), fractions) if f > 0):
            return n
    raise ValueError(f"split {tuple(fractions)}: no class size up to 1000 gives every split an image")


def _require_every_class_in_every_split(source: str, y: torch.Tensor, class_names: list[str],
                                        fractions: Sequence[float]) -> None:
    """Refuse a folder whose smallest classes cannot appear in every split: a class missing from validation
    or test would make the macro scores average over a class with no samples (a silently wrong number)."""
    need = min_per_class(fractions)
    counts = torch.bincount(y, minlength=len(class_names)).tolist()
    small = [f"{name!r} ({n})" for name, n in zip(class_names, counts) if n < need]
    if small:
        raise ValueError(f"{source}: class folder(s) with too few readable images: {', '.join(small)}; a "
                         f"{'/'.join(f'{round(100 * f)}' for f in fractions)} split needs at least {need} per class to "
                         "put one in each of train, validation and test. Add images or remove those folders")


def _assemble(source: str, x01: torch.Tensor, y: torch.Tensor, parts: list[list[int]], *, normalize: str,
              limit: int | None, seed: int, class_names: list[str], files: list[str] | None = None,
              skipped: list[str] | None = None, tests: tuple[torch.Tensor, torch.Tensor] | None = None) -> DataSplits:
    """DataSplits from images in [0, 1] (N, C, H, W), labels and index parts [train, val(, test)]."""
    _require_finite(source, x01, files)
    if tests is not None:
        _require_finite(f"{source} (test split)", tests[0], None)
    train_idx = parts[0]
    if limit is not None:
        sub = stratified_subset(y[train_idx], limit, seed)
        train_idx = [train_idx[i] for i in sub]
    names = ["train", "val", "test"]
    xs = {k: x01[idx] for k, idx in zip(names, [train_idx, *parts[1:]])}
    ys = {k: y[idx] for k, idx in zip(names, [train_idx, *parts[1:]])}
    if tests is not None:  # an official test split
        xs["test"], ys["test"] = tests
    xs = _normalized(xs, normalize)
    return DataSplits(
        train=TensorDataset(xs["train"].contiguous(), ys["train"]),
        val=TensorDataset(xs["val"].contiguous(), ys["val"]),
        test=TensorDataset(xs["test"].contiguous(), ys["test"]),
        num_classes=len(class_names), in_channels=x01.shape[1], image_size=tuple(x01.shape[-2:]),
        class_names=class_names, source=source,
        split_indices={"train": list(train_idx), **{k: list(v) for k, v in zip(names[1:], parts[1:])}},
        files=files or [], skipped=skipped or [], normalize=normalize, seed=seed,
    )


# ----------------------------------------------------------------------------------------------- sources


def _digits(image_size) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # pixel values are 0..16
    return _resize(x, _size(image_size, (32, 32))), torch.tensor(d.target, dtype=torch.long), [str(i) for i in range(10)]


def _synthetic(image_size, in_channels: int | None) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    size = _size(image_size, (32, 32))
    c = in_channels or 3
    g = torch.Generator().manual_seed(SYNTHETIC_SEED)
    # smooth prototypes (4x4 upsampled) so that convolutions, not single pixels, carry the class
    proto = _resize(torch.randn(SYNTHETIC_CLASSES, c, 4, 4, generator=g), size) * 1.5
    y = torch.arange(SYNTHETIC_N) % SYNTHETIC_CLASSES
    y = y[torch.randperm(SYNTHETIC_N, generator=g)]
    x = torch.sigmoid(proto[y] + torch.randn(SYNTHETIC_N, c, *size, generator=g))
    return x, y, [f"class{i}" for i in range(SYNTHETIC_CLASSES)]


_OFFICIAL = {
    # source: (torchvision class, sub-folder torchvision reads, files it needs there)
    "mnist": ("MNIST", "MNIST/raw", ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                                     "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")),
    "fashion-mnist": ("FashionMNIST", "FashionMNIST/raw", ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                                                           "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")),
    "cifar10": ("CIFAR10", "cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)),
    "cifar100": ("CIFAR100", "cifar-100-python", ("train", "test")),
}


def _official(source: str, root: str | Path | None, image_size):
    import torchvision.datasets as tvd

    cls_name, sub, needed = _OFFICIAL[source]
    base = Path(root) if root is not None else Path("data")
    candidates = [base, base / source]
    for cand in candidates:
        if all((cand / sub / f).exists() for f in needed):
            break
    else:
        looked = [str(c / sub / f) for c in candidates for f in needed]
        raise FileNotFoundError(
            f"{source}: files not found (nothing is downloaded at run time); looked for:\n  " + "\n  ".join(looked)
            + f"\nput torchvision's {cls_name} files there or pass --data-root")
    cls = getattr(tvd, cls_name)
    tr, te = cls(str(cand), train=True, download=False), cls(str(cand), train=False, download=False)

    def tensors(ds):
        data = torch.as_tensor(ds.data)
        x = data.unsqueeze(1) if data.ndim == 3 else data.permute(0, 3, 1, 2)  # CIFAR is stored N, H, W, C
        x = _resize(x.float() / 255.0, _size(image_size, tuple(x.shape[-2:])))
        return x, torch.as_tensor(ds.targets, dtype=torch.long)

    return tensors(tr), tensors(te), list(tr.classes)


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


def _folder(path: str, image_size, in_channels: int | None, progress: bool):
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"folder:{path}: no such directory")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"folder:{path}: no class sub-folders (expected PATH/<class>/<image>)")
    files, labels = [], []
    for k, c in enumerate(classes):
        for f in sorted((root / c).rglob("*")):
            if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
                files.append(str(f))
                labels.append(k)
    if not files:
        raise ValueError(f"folder:{path}: no images ({', '.join(IMAGE_SUFFIXES)}) under {', '.join(classes)}")
    mode = "L" if in_channels == 1 else "RGB"
    size = _size(image_size, (0, 0))
    if image_size is None:  # the first readable image sets the size
        for f in files:
            first = _decode(f, None, mode)
            if first is not None:
                size = tuple(first.shape[-2:])
                break
    images: list[torch.Tensor | None] = [None] * len(files)
    workers = 0 if len(files) < 500 else min(4, os.cpu_count() or 1)
    loader = torch.utils.data.DataLoader(_Files(files, size, mode), batch_size=64, num_workers=workers,
                                         collate_fn=list)
    from rich.progress import Progress

    with Progress(transient=True, disable=not progress) as bar:
        task = bar.add_task(f"decoding {len(files)} images", total=len(files))
        for batch in loader:
            for i, img in batch:
                images[i] = img
            bar.advance(task, len(batch))
    skipped = [f for f, img in zip(files, images) if img is None]
    for f in skipped:
        warnings.warn(f"folder:{path}: skipping unreadable image {f}", stacklevel=3)
    keep = [i for i, img in enumerate(images) if img is not None]
    if not keep:
        raise ValueError(f"folder:{path}: none of the {len(files)} images could be decoded")
    x = torch.stack([images[i] for i in keep]).float() / 255.0
    y = torch.tensor([labels[i] for i in keep], dtype=torch.long)
    rel = [os.path.relpath(files[i], root) for i in keep]
    return x, y, classes, rel, skipped


# ----------------------------------------------------------------------------------------------- public


def load_data(source: str, *, root: str | Path | None = None, seed: int = 0, image_size: int | None = None,
              normalize: str = "minus-one-one", split: Sequence[float] = (0.6, 0.2, 0.2), limit: int | None = None,
              in_channels: int | None = None, progress: bool = False) -> DataSplits:
    """Load ``source``, split it train/validation/test with ``seed`` and normalize it (see the module doc).

    Args:
        source: ``digits``, ``synthetic``, ``mnist``, ``fashion-mnist``, ``cifar10``, ``cifar100`` or
            ``folder:PATH``.
        root: where the torchvision sets lie (``root`` or ``root/<source>``); default ``./data``.
        seed: draws the split (and the ``limit`` subset).
        image_size: resize to this many pixels square (default: the source's own; 32 for digits).
        normalize: ``minus-one-one`` or ``mean-subtract``.
        split: train/validation/test fractions per class, for sources without an official test split.
        limit: keep this many train images (stratified); None keeps all.
        in_channels: ``folder`` and ``synthetic`` only: 1 (grayscale) or 3 (RGB, the default).
        progress: show a bar while a folder is decoded.

    The result is cached (same arguments, same object): the tensors are shared, never write to them.

    Examples:
        >>> d = load_data("digits", seed=0)
        >>> d.input_shape, d.num_classes, len(d.train), len(d.val), len(d.test)
        ((1, 32, 32), 10, 1078, 359, 360)
    """
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"unknown normalize {normalize!r}; valid: {', '.join(NORMALIZATIONS)}")
    if in_channels not in (None, 1, 3):
        raise ValueError(f"in_channels must be 1 or 3, got {in_channels!r}")
    key = (source, None if root is None else str(root), int(seed),
           None if image_size is None else _size(image_size, (0, 0)), normalize, tuple(float(f) for f in split),
           limit, in_channels)
    if key not in _CACHE:
        _CACHE[key] = _load(*key, progress=progress)
        while len(_CACHE) > _CACHE_SIZE:  # the oldest goes first
            _CACHE.pop(next(iter(_CACHE)))
    return _CACHE[key]


# A sweep runs many configs on the same data: loading (a folder's decoding above all) happens once.
_CACHE: dict[tuple, DataSplits] = {}
_CACHE_SIZE = 4


def _load(source, root, seed, image_size, normalize, split, limit, in_channels, *, progress: bool) -> DataSplits:
    common = dict(normalize=normalize, limit=limit, seed=seed)
    if source == "digits":
        x, y, names = _digits(image_size)
        return _assemble(source, x, y, stratified_split(y, split, seed), class_names=names, **common)
    if source == "synthetic":
        x, y, names = _synthetic(image_size, in_channels)
        return _assemble(source, x, y, stratified_split(y, split, seed), class_names=names, **common)
    if source in _OFFICIAL:
        (x, y), test, names = _official(source, root, image_size)
        train_idx, val_idx = stratified_split(y, (1 - OFFICIAL_VAL_FRACTION, OFFICIAL_VAL_FRACTION), seed)
        return _assemble(source, x, y, [train_idx, val_idx], class_names=names, tests=test, **common)
    if source.startswith("folder:") and len(source) > len("folder:"):
        x, y, names, files, skipped = _folder(source[len("folder:"):], image_size, in_channels, progress)
        _require_every_class_in_every_split(source, y, names, split)
        return _assemble(source, x, y, stratified_split(y, split, seed), class_names=names, files=files,
                         skipped=skipped, **common)
    raise ValueError(f"unknown data source {source!r}; valid: {', '.join(SOURCES)}")
