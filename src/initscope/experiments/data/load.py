"""``load_data``: a source's images, split train/validation/test with the seed, normalized, in memory.

The result holds ``TensorDataset``s, so every epoch is tensor slicing, never a disk read; it is cached
by its arguments, because a sweep runs many configs on the same data and loading (a folder's decoding
above all) should happen once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from initscope.experiments.data.base import parse_data
from initscope.experiments.data.splits import NORMALIZATIONS, DataSplits, assemble, draw_parts, square

# A sweep runs many configs on the same data: loading (a folder's decoding above all) happens once.
_CACHE: dict[tuple, DataSplits] = {}
_CACHE_SIZE = 4


def load_data(source: str, *, root: str | Path | None = None, seed: int = 0, image_size: int | None = None,
              normalize: str = "minus-one-one", split: Sequence[float] = (0.6, 0.2, 0.2), limit: int | None = None,
              in_channels: int | None = None, progress: bool = False, eval_limit: int | None = None) -> DataSplits:
    """Load ``source``, split it train/validation/test with ``seed`` and normalize it.

    Args:
        source: a registered data source as written: ``digits``, ``synthetic``, ``mnist``,
            ``fashion-mnist``, ``cifar10``, ``cifar100``, ``folder:PATH`` (see :data:`SOURCES`).
        root: where the user keeps data: the torchvision sets (``root`` or ``root/<source>``, default
            ``./data``), relative folder paths.
        seed: draws the split (and the ``limit`` subset).
        image_size: resize to this many pixels square (default: the source's own; 32 for digits).
        normalize: ``minus-one-one`` or ``mean-subtract``.
        split: train/validation/test fractions per class, for sources without an official test split.
        limit: keep this many train images (stratified); None keeps all.
        eval_limit: keep this many validation and this many test images (stratified); None keeps all.
        in_channels: ``folder`` and ``synthetic`` only: 1 (grayscale) or 3 (RGB, the default).
        progress: show a bar while a folder is decoded.

    The result is cached (same arguments, same object): the tensors are shared, never write to them. A
    source that can (``folder:``) decodes only the images the run uses when a limit leaves some out.

    Examples:
        >>> d = load_data("digits", seed=0)
        >>> d.input_shape, d.num_classes, len(d.train), len(d.val), len(d.test)
        ((1, 32, 32), 10, 1078, 359, 360)
    """
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"unknown normalize {normalize!r}; valid: {', '.join(NORMALIZATIONS)}")
    if in_channels not in (None, 1, 3):
        raise ValueError(f"in_channels must be 1 or 3, got {in_channels!r}")
    ref = parse_data(source)
    key = (source, None if root is None else str(root), int(seed),
           None if image_size is None else square(image_size, (0, 0)), normalize, tuple(float(f) for f in split),
           limit, in_channels, eval_limit)
    if key not in _CACHE:
        src, size = ref.source, key[3]
        listed = None
        if limit is not None or eval_limit is not None:
            listed = src.labels(ref.arg, root=root, image_size=size, in_channels=in_channels)
        if listed is not None:  # decode only what the parts use
            test_y = listed.test[1] if listed.test is not None else None
            parts = draw_parts(listed.y, test_y, split=key[5], limit=limit, eval_limit=eval_limit, seed=seed)
            images = src.load(ref.arg, root=root, image_size=size, in_channels=in_channels, progress=progress,
                              rows=(parts.train + parts.val + ([] if parts.official_test else parts.test),
                                    parts.test if parts.official_test else []))
            _CACHE[key] = assemble(source, images, split=key[5], normalize=normalize, limit=limit, seed=seed,
                                   eval_limit=eval_limit, parts=parts)
        else:
            images = src.load(ref.arg, root=root, image_size=size, in_channels=in_channels, progress=progress)
            _CACHE[key] = assemble(source, images, split=key[5], normalize=normalize, limit=limit, seed=seed,
                                   eval_limit=eval_limit)
        while len(_CACHE) > _CACHE_SIZE:  # the oldest goes first
            _CACHE.pop(next(iter(_CACHE)))
    return _CACHE[key]


def clear_cache() -> None:
    """Forget every loaded dataset (after the files under a source changed, say)."""
    _CACHE.clear()
