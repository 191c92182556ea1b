"""From a source's images to train/validation/test splits: stratified and seeded, normalized, checked.

Every source gives images in [0, 1] and labels (:class:`~initscope.experiments.data.base.Images`);
everything after that is here and the same for every source: the stratified split per class
(:func:`stratified_split`), the ``limit`` subset of the train split (:func:`stratified_subset`), the
refusals of data no run should see (NaN or inf pixels; a class too small to reach every split), and
the normalization. Pixels are first scaled to [0, 1]; then ``normalize``, both as in the second
paper: ``minus-one-one`` maps them to [-1, 1] (``2x - 1``), ``mean-subtract`` subtracts the per-pixel
mean image of the train split (:math:`x - \\bar{x}_{train}`, per channel and position).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from initscope.experiments.data.base import Images
from initscope.fileio import atomic_write_text

NORMALIZATIONS = ("minus-one-one", "mean-subtract")
# The official sets' validation split: a stratified, seeded 1/6 of the official train split (10,000
# images for MNIST and CIFAR, the size of their test splits).
OFFICIAL_VAL_FRACTION = 1 / 6


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
    files: list[str] = field(default_factory=list)  # sources of files: the image paths split_indices index
    skipped: list[str] = field(default_factory=list)  # sources of files: images that could not be decoded
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
        return atomic_write_text(path, json.dumps(doc, indent=1))


# ---------------------------------------------------------------------------------------------- splits


def class_counts(n: int, fractions: Sequence[float]) -> list[int]:
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
        for part, count in zip(parts, class_counts(len(idx), fractions)):
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


def normalized(x01: dict[str, torch.Tensor], how: str) -> dict[str, torch.Tensor]:
    """Apply ``how`` to images in [0, 1]; ``mean-subtract`` takes the mean image of ``x01['train']``."""
    if how == "minus-one-one":
        return {k: v * 2 - 1 for k, v in x01.items()}
    if how == "mean-subtract":
        mean = x01["train"].mean(dim=0, keepdim=True)
        return {k: v - mean for k, v in x01.items()}
    raise ValueError(f"unknown normalize {how!r}; valid: {', '.join(NORMALIZATIONS)}")


def resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Images (N, C, H, W) at ``size`` (bilinear, antialiased); the same tensor when already that size."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)


def square(image_size: int | Sequence[int] | None, default: tuple[int, int]) -> tuple[int, int]:
    """``image_size`` as (H, W): an int is a square, None is ``default``."""
    if image_size is None:
        return default
    if isinstance(image_size, int):
        return (image_size, image_size)
    return (int(image_size[0]), int(image_size[1]))


def require_finite(source: str, x: torch.Tensor, files: list[str] | None) -> None:
    """Refuse images holding NaN or inf: every run on them would end ``diverged``, blaming the initialization."""
    if not x.is_floating_point():  # bytes (decoded files) are finite
        return
    bad = ~torch.isfinite(x.reshape(len(x), -1)).all(dim=1)
    if bool(bad.any()):
        first = int(bad.nonzero()[0])
        what = files[first] if files else f"image {first}"
        raise ValueError(f"{source}: {int(bad.sum())} image(s) hold NaN or inf values, the first is {what}; "
                         "fix or remove them before training")


def min_per_class(fractions: Sequence[float]) -> int:
    """The fewest images a class needs so that every split with a nonzero fraction gets one of them."""
    for n in range(1, 1000):
        if all(c >= 1 for c, f in zip(class_counts(n, fractions), fractions) if f > 0):
            return n
    raise ValueError(f"split {tuple(fractions)}: no class size up to 1000 gives every split an image")


def require_every_class_in_every_split(source: str, y: torch.Tensor, class_names: list[str],
                                        fractions: Sequence[float]) -> None:
    """Refuse data whose smallest classes cannot appear in every split: a class missing from validation
    or test would make the macro scores average over a class with no samples (a silently wrong number)."""
    need = min_per_class(fractions)
    counts = torch.bincount(y, minlength=len(class_names)).tolist()
    small = [f"{name!r} ({n})" for name, n in zip(class_names, counts) if n < need]
    if small:
        raise ValueError(f"{source}: class(es) with too few readable images: {', '.join(small)}; a "
                         f"{'/'.join(f'{round(100 * f)}' for f in fractions)} split needs at least {need} per class to "
                         "put one in each of train, validation and test. Add images or remove those classes")


@dataclass
class Parts:
    """Which images each split takes: ``train`` and ``val`` index the source's images (``Images.y``);
    ``test`` indexes them too, or, where the source has an official test split, that split."""

    train: list[int]
    val: list[int]
    test: list[int]
    official_test: bool = False


def draw_parts(y: torch.Tensor, test_y: torch.Tensor | None, *, split: Sequence[float], limit: int | None,
               eval_limit: int | None, seed: int) -> Parts:
    """The split of a source's labels, drawn with ``seed`` (labels only: no pixel is needed).

    With an official test split (``test_y``) a stratified :data:`OFFICIAL_VAL_FRACTION` of ``y`` is
    validation and the rest train; otherwise ``y`` is split ``split`` per class. Then ``limit`` keeps a
    stratified subset of train, ``eval_limit`` one of validation and one of test.
    """
    if test_y is not None:
        train, val = stratified_split(y, (1 - OFFICIAL_VAL_FRACTION, OFFICIAL_VAL_FRACTION), seed)
        test = list(range(len(test_y)))
    else:
        train, val, test = stratified_split(y, split, seed)

    def subset(idx: list[int], labels: torch.Tensor, n: int | None) -> list[int]:
        return idx if n is None else [idx[i] for i in stratified_subset(labels[idx], n, seed)]

    return Parts(subset(train, y, limit), subset(val, y, eval_limit),
                 subset(test, y if test_y is None else test_y, eval_limit), official_test=test_y is not None)


def assemble(source: str, images: Images, *, split: Sequence[float], normalize: str, limit: int | None,
             seed: int, eval_limit: int | None = None, parts: Parts | None = None) -> DataSplits:
    """The splits of a source's ``images``: an official test split is kept and a stratified
    :data:`OFFICIAL_VAL_FRACTION` of the rest is validation; otherwise the images are split ``split``
    per class with ``seed`` (:func:`draw_parts`, unless ``parts`` were drawn already). Then the checks and
    the normalization.

    A source that decoded only the images the parts use (``images.rows``) may have found some unreadable:
    they are left out of their split here, after it was drawn.
    """
    y, names = images.y, images.class_names
    test_y = images.test[1] if images.test is not None else None
    if len(names) < 2:  # any source: one class trains to the end, then fails in the metrics
        raise ValueError(f"{source}: {len(names)} class(es) ({', '.join(map(repr, names))}); classification needs "
                         "at least two")
    if images.rows is None:
        require_finite(source, images.x, images.files or None)
        if images.test is not None:
            require_finite(f"{source} (test split)", images.test[0], None)
        if test_y is None:
            require_every_class_in_every_split(source, y, names, split)
    if parts is None:
        parts = draw_parts(y, test_y, split=split, limit=limit, eval_limit=eval_limit, seed=seed)
    pool_rows, test_rows = images.rows if images.rows is not None else (None, None)

    def take(idx: list[int], x: torch.Tensor, rows: list[int] | None) -> tuple[list[int], torch.Tensor]:
        if rows is None:
            return idx, x[idx]
        where = {p: r for r, p in enumerate(rows)}
        kept = [i for i in idx if i in where]  # the unreadable ones are not in rows
        return kept, x[[where[i] for i in kept]]

    idx, xs, ys = {}, {}, {}
    for k in ("train", "val"):
        idx[k], xs[k] = take(getattr(parts, k), images.x, pool_rows)
        ys[k] = y[idx[k]]
    if test_y is not None:
        idx["test"], xs["test"] = take(parts.test, images.test[0], test_rows)
        ys["test"] = test_y[idx["test"]]
    else:
        idx["test"], xs["test"] = take(parts.test, images.x, pool_rows)
        ys["test"] = y[idx["test"]]
    xs = {k: x.float() / 255.0 if x.dtype == torch.uint8 else x for k, x in xs.items()}  # decoded files: bytes
    if images.rows is not None:
        for k, x in xs.items():
            files = images.test_files if k == "test" and test_y is not None else images.files
            require_finite(f"{source} ({k} split)", x, [files[i] for i in idx[k]] if files else None)
    xs = normalized(xs, normalize)
    split_indices = {k: list(v) for k, v in idx.items()}
    files = list(images.files)
    if test_y is not None and images.test_files:  # the test split's files are the official split's
        split_indices["test"] = [len(files) + i for i in idx["test"]]
        files += list(images.test_files)
    return DataSplits(
        train=TensorDataset(xs["train"].contiguous(), ys["train"]),
        val=TensorDataset(xs["val"].contiguous(), ys["val"]),
        test=TensorDataset(xs["test"].contiguous(), ys["test"]),
        num_classes=len(names), in_channels=images.x.shape[1], image_size=tuple(images.x.shape[-2:]),
        class_names=list(names), source=source, split_indices=split_indices, files=files,
        skipped=list(images.skipped), normalize=normalize, seed=seed,
    )
