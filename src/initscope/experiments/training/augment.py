r"""Training-time augmentation, a whole batch at a time, and the batches an epoch feeds the training step.

Augmentation works on a batch of normalized images (B, C, H, W) wherever it lies (CPU or GPU), with
the random parameters of every sample drawn at once, so that a batch costs a few tensor ops rather than
B Python calls (the per-sample ``torchvision.transforms`` pipeline of a ``DataLoader``):

- ``flip``: each image mirrored left-right with probability 1/2;
- ``crop-flip``: the batch padded by :math:`p = \max(1, \mathrm{round}(\min(H, W) / 8))` pixels on every side
  (by reflection, so no black frame; 4 at 32x32, 8 at 64x64), then an H x W window at a uniform offset in
  :math:`[0, 2p]^2` per image (two ``gather``\ s), then ``flip``;
- ``resized-crop-flip``: per image a window of area fraction :math:`s \sim U(0.35, 1)` and aspect ratio
  :math:`r` with :math:`\log r \sim U(\log 3/4, \log 4/3)` (side fractions :math:`\sqrt{s r}` and
  :math:`\sqrt{s / r}`, at most 1), at a uniform position, resized back to H x W (one ``affine_grid`` and
  ``grid_sample``, bilinear, reflection at the border), mirrored with probability 1/2. The lower area bound
  is 0.35, not torchvision's 0.08: 64-pixel images from a few thousand photographs have little to spare.

Randomness: batch ``i`` of epoch ``e`` of a run with seed ``s`` draws from its own generator, seeded with
:func:`batch_seed`; so a run resumed after a kill, or fed by worker processes (``workers > 0``), sees
exactly the batches it would have seen in one piece. The order of the images is the loop's shuffling
generator's, as without augmentation.

Why batches in the training process by default: on one CPU thread a batch of 64 images of 64x64 is
augmented in about a millisecond, against tens to hundreds of milliseconds for the step it feeds; a
``DataLoader`` worker costs a process and a core's share that the step itself could use when several runs
share the cores (``--parallel``). ``workers > 0`` moves the augmentation into that many worker processes,
for a GPU step fed from the CPU or a machine with cores to spare; ``benchmarks/train_speed.py --loaders``
measures both.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F

AUGMENTATIONS: tuple[str, ...] = ("none", "flip", "crop-flip", "resized-crop-flip")
RESIZED_AREA = (0.35, 1.0)
RESIZED_RATIO = (3 / 4, 4 / 3)


def batch_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of batch ``index`` (0-based) of ``epoch`` (0-based) of a run seeded ``seed``: distinct for
    every (seed, epoch, batch) a run can reach, and a plain function of them (no state to save)."""
    return ((int(seed) * 1_000_003 + int(epoch)) * 1_000_033 + int(index)) % (2**63 - 1)


def crop_padding(size: tuple[int, int]) -> int:
    """The padding of ``crop-flip`` for images of ``size`` (H, W): an eighth of the shorter side, at least 1."""
    return max(1, round(min(size) / 8))


def _flip(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    mask = (torch.rand(len(x), generator=g) < 0.5).to(x.device)
    return torch.where(mask[:, None, None, None], x.flip(3), x)


def _crop(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    b, c, h, w = x.shape
    p = crop_padding((h, w))
    # reflection needs the padding smaller than the side; a 1-pixel image has nothing to crop
    xp = F.pad(x, (p, p, p, p), mode="reflect" if min(h, w) > p else "replicate")
    oy = torch.randint(0, 2 * p + 1, (b,), generator=g).to(x.device)
    ox = torch.randint(0, 2 * p + 1, (b,), generator=g).to(x.device)
    rows = (oy[:, None] + torch.arange(h, device=x.device))[:, None, :, None].expand(b, c, h, w + 2 * p)
    out = torch.gather(xp, 2, rows)
    cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, None, :].expand(b, c, h, w)
    return torch.gather(out, 3, cols)


def _resized_crop(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    b = len(x)
    area = torch.empty(b).uniform_(*RESIZED_AREA, generator=g)
    log_ratio = torch.empty(b).uniform_(math.log(RESIZED_RATIO[0]), math.log(RESIZED_RATIO[1]), generator=g)
    ratio = log_ratio.exp()
    sw, sh = (area * ratio).sqrt().clamp(max=1.0), (area / ratio).sqrt().clamp(max=1.0)  # side fractions
    cx = (torch.rand(b, generator=g) * 2 - 1) * (1 - sw)  # the window's centre, in [-1, 1] coordinates
    cy = (torch.rand(b, generator=g) * 2 - 1) * (1 - sh)
    sign = torch.where(torch.rand(b, generator=g) < 0.5, -1.0, 1.0)  # the flip, folded into the map
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sw * sign, cx, sh, cy
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def augment_batch(x: torch.Tensor, kind: str, generator: torch.Generator) -> torch.Tensor:
    """``x`` (B, C, H, W) augmented by ``kind`` (see the module doc), random parameters from ``generator``
    (a CPU generator, whatever the device of ``x``); a new tensor, ``x`` is not changed.

    Examples:
        >>> augment_batch(torch.zeros(8, 3, 32, 32), "crop-flip", torch.Generator().manual_seed(0)).shape
        torch.Size([8, 3, 32, 32])
    """
    if kind == "none":
        return x
    if kind == "flip":
        return _flip(x, generator)
    if kind == "crop-flip":
        return _flip(_crop(x, generator), generator)
    if kind == "resized-crop-flip":
        return _resized_crop(x, generator)
    raise ValueError(f"unknown augment {kind!r}; valid: {', '.join(AUGMENTATIONS)}")


# -- an epoch's batches ---------------------------------------------------------------------------------


def epoch_order(n: int, batch_size: int, generator: torch.Generator | None) -> list[torch.Tensor]:
    """The index chunks of one epoch: a permutation of ``n`` drawn from ``generator`` (in order without one),
    cut into batches; a final train batch of one sample is dropped when the batches are larger (BatchNorm
    cannot normalize a single sample)."""
    if generator is None:
        return [torch.arange(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    order = torch.randperm(n, generator=generator)
    chunks = [order[s:s + batch_size] for s in range(0, n, batch_size)]
    return [c for c in chunks if len(c) > 1 or n == 1 or batch_size == 1]


class _AugmentedBatches(torch.utils.data.Dataset):
    """For worker processes: item ``(i, idx)`` is batch ``i`` of the current epoch, augmented."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, kind: str, seed: int) -> None:
        self.x, self.y, self.kind, self.seed = x, y, kind, seed
        self.epoch = 0

    def __getitem__(self, key: tuple[int, int, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, i, idx = key
        g = torch.Generator().manual_seed(batch_seed(self.seed, epoch, i))
        return augment_batch(self.x[idx], self.kind, g), self.y[idx]


class _Keys(torch.utils.data.Sampler):
    """The current epoch's ``(epoch, i, idx)`` keys, set before each pass (read in the main process)."""

    def __init__(self) -> None:
        self.keys: list[tuple[int, int, torch.Tensor]] = []

    def __iter__(self):
        return iter(self.keys)

    def __len__(self) -> int:
        return len(self.keys)


def _one_thread(_: int) -> None:
    torch.set_num_threads(1)  # a worker beside a training process: it must not spread over every core


class Feeder:
    """What a training epoch iterates over: ``(images, labels)`` batches of the train split, shuffled by the
    loop's generator, augmented (``kind``) in this process or in ``workers`` worker processes.

    Args:
        x, y: the train split (on the training device for ``workers=0``; on the CPU otherwise).
        batch_size: images per batch.
        kind: one of :data:`AUGMENTATIONS`.
        seed: the run's seed (with the epoch and the batch, it seeds each batch's augmentation).
        workers: worker processes (0: augment here, on the tensors' device).
        device: where the batches go (the workers' CPU batches are moved there).
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, kind: str, seed: int, *,
                 workers: int = 0, device: torch.device | None = None) -> None:
        if kind not in AUGMENTATIONS:
            raise ValueError(f"unknown augment {kind!r}; valid: {', '.join(AUGMENTATIONS)}")
        self.x, self.y, self.batch_size, self.kind, self.seed = x, y, batch_size, kind, seed
        self.device = device if device is not None else x.device
        self.loader = None
        if workers > 0 and kind != "none":
            self.keys = _Keys()
            self.loader = torch.utils.data.DataLoader(
                _AugmentedBatches(x.cpu(), y.cpu(), kind, seed), batch_size=None, sampler=self.keys,
                num_workers=workers, persistent_workers=True, worker_init_fn=_one_thread,
                pin_memory=self.device.type == "cuda", prefetch_factor=2)

    def epoch(self, epoch: int, generator: torch.Generator | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The batches of ``epoch`` (0-based), in the order ``generator`` draws."""
        chunks = epoch_order(len(self.x), self.batch_size, generator)
        if self.loader is not None:
            self.keys.keys = [(epoch, i, idx) for i, idx in enumerate(chunks)]
            for xb, yb in self.loader:
                yield xb.to(self.device, non_blocking=True), yb.to(self.device, non_blocking=True)
            return
        for i, idx in enumerate(chunks):
            idx = idx.to(self.x.device)
            xb, yb = self.x[idx], self.y[idx]
            if self.kind != "none":
                xb = augment_batch(xb, self.kind, torch.Generator().manual_seed(batch_seed(self.seed, epoch, i)))
            yield xb, yb

    def close(self) -> None:
        """Stop the worker processes (if any)."""
        if self.loader is not None:
            it = getattr(self.loader, "_iterator", None)
            if it is not None:
                it._shutdown_workers()
            self.loader = None
