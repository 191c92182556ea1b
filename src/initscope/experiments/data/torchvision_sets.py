"""``mnist``, ``fashion-mnist``, ``cifar10``, ``cifar100``: torchvision's files under the data root.

Nothing is downloaded at run time: the files are looked for under ``root`` and ``root/<source>``
(``root`` is ``--data-root``, default ``./data``), and missing files are a ``FileNotFoundError`` naming
every path looked for, raised by :meth:`TorchvisionSet.check` before any run starts. The official test
split is the test split; a stratified, seeded 1/6 of the official train split (10,000 images for
MNIST and CIFAR) is the validation split.
"""

from __future__ import annotations

from pathlib import Path

import torch

from initscope.experiments.data.base import DataSource, Images, register_source
from initscope.experiments.data.splits import resize, square


class TorchvisionSet(DataSource):
    """One of torchvision's image classification sets, read from its files.

    Args:
        cls_name: the ``torchvision.datasets`` class.
        sub: the sub-folder torchvision reads under its root.
        needed: the files it needs there.
        summary: the help line.
    """

    def __init__(self, cls_name: str, sub: str, needed: tuple[str, ...], summary: str) -> None:
        self.cls_name, self.sub, self.needed, self.summary = cls_name, sub, needed, summary

    def _candidates(self, root: str | Path | None) -> list[Path]:
        base = Path(root) if root is not None else Path("data")
        return [base, base / self.name]

    def _find(self, root: str | Path | None) -> Path:
        """The folder holding every file (``root`` or ``root/<name>``), or FileNotFoundError listing them."""
        candidates = self._candidates(root)
        for cand in candidates:
            if all((cand / self.sub / f).exists() for f in self.needed):
                return cand
        looked = [str(c / self.sub / f) for c in candidates for f in self.needed]
        raise FileNotFoundError(
            f"{self.name}: files not found (nothing is downloaded at run time); looked for:\n  " + "\n  ".join(looked)
            + f"\nput torchvision's {self.cls_name} files there or pass --data-root")

    def check(self, arg, root) -> None:
        self._find(root)

    def load(self, arg, *, root, image_size, in_channels, progress) -> Images:
        import torchvision.datasets as tvd

        where = str(self._find(root))
        cls = getattr(tvd, self.cls_name)
        train, test = cls(where, train=True, download=False), cls(where, train=False, download=False)

        def tensors(ds) -> tuple[torch.Tensor, torch.Tensor]:
            data = torch.as_tensor(ds.data)
            x = data.unsqueeze(1) if data.ndim == 3 else data.permute(0, 3, 1, 2)  # CIFAR is stored N, H, W, C
            x = resize(x.float() / 255.0, square(image_size, tuple(x.shape[-2:])))
            return x, torch.as_tensor(ds.targets, dtype=torch.long)

        x, y = tensors(train)
        return Images(x, y, list(train.classes), test=tensors(test))


_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
register_source("mnist")(TorchvisionSet("MNIST", "MNIST/raw", _MNIST_FILES, "handwritten digits, 1x28x28 (torchvision's files)"))
register_source("fashion-mnist")(TorchvisionSet("FashionMNIST", "FashionMNIST/raw", _MNIST_FILES,
                                                "Zalando's clothes, 1x28x28 (torchvision's files)"))
register_source("cifar10")(TorchvisionSet("CIFAR10", "cifar-10-batches-py",
                                          tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",),
                                          "10 classes of objects, 3x32x32 (torchvision's files)"))
register_source("cifar100")(TorchvisionSet("CIFAR100", "cifar-100-python", ("train", "test"),
                                           "100 classes of objects, 3x32x32 (torchvision's files)"))
