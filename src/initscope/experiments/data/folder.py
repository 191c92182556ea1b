"""``folder:PATH``: an ImageFolder tree, decoded once into a cached tensor file, then held in memory.

Two layouts:

- ``PATH/<class>/<image>``: no split of its own; the images are split 60/20/20 per class with the seed;
- ``PATH/train/<class>/<image>`` and ``PATH/test/<class>/<image>``: the folder's own split is kept. The
  test split is ``test/`` as it is; validation is a stratified, seeded 1/6 of ``train/``
  (:data:`~initscope.experiments.data.splits.OFFICIAL_VAL_FRACTION`, as for the torchvision sets), never
  drawn from ``test/``. Another folder beside ``train/`` and ``test/`` (a ``val/``) is refused, not guessed at.

A relative ``PATH`` is looked for under the data root (``--data-root``) first, then where the command
runs; so a sweep file can name ``folder:plant-seedlings-64`` and each user says where their data live.
:meth:`DataSplits.save_split` writes the split as JSON (a run writes ``split.json``).

Decoding: worker processes decode every image once (modes converted to RGB, or L for ``in_channels=1``;
other sizes resized bilinearly to ``image_size``, default the first readable image's size) into uint8
tensors, and the result is written to a cache file (safetensors, :func:`cache_dir`), so the next run,
and every other process of a ``--parallel`` sweep, reads one file instead of decoding thousands. The
cache is keyed by the folder's absolute path, the image size and mode, and every file's relative path,
size and modification time: a file added, removed or changed makes a new key. An image that cannot be
decoded is reported by path (a warning, and ``DataSplits.skipped``) and left out before the split is
drawn.

With ``--limit`` (or ``eval_limit``) and no cache of the whole folder yet, only the images the run uses
are decoded: the split is drawn on the file list's labels, then those files are decoded (and not
cached). A file among them that cannot be decoded is then left out of its split after the draw.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from initscope.experiments.data.base import DataSource, Images, register_source
from initscope.experiments.data.splits import square
from initscope.progress import progress_bar

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
SPLIT_FOLDERS = ("train", "test")
# Decoding in the loading process is quicker than starting workers for a small folder.
_MIN_FILES_FOR_WORKERS = 500
_CACHE_FORMAT = "initscope-folder/1"


def cache_dir() -> Path | None:
    """Where decoded folders are cached: ``$INITSCOPE_CACHE_DIR``, else ``$XDG_CACHE_HOME/initscope``, else
    ``~/.cache/initscope``; each under ``folders/``. ``INITSCOPE_CACHE_DIR=off`` turns the cache off (None)."""
    given = os.environ.get("INITSCOPE_CACHE_DIR")
    if given is not None and given.strip().lower() in ("off", "none", "0", ""):
        return None
    base = Path(given).expanduser() if given else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / \
        "initscope"
    return base / "folders"


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


@dataclass
class Listing:
    """A folder's images before decoding: absolute paths and labels, the train (or only) part and the test part."""

    folder: Path
    classes: list[str]
    files: list[str]
    labels: list[int]
    test_files: list[str] | None = None
    test_labels: list[int] | None = None

    def all_files(self) -> list[str]:
        return self.files + (self.test_files or [])

    def relative(self, files: list[str]) -> list[str]:
        return [os.path.relpath(f, self.folder) for f in files]

    def key(self, size: tuple[int, int] | None, mode: str) -> str:
        """The cache key: the folder, the size and mode, and every file's path, size and modification time."""
        stats = []
        for f in self.all_files():
            st = os.stat(f)
            stats.append([os.path.relpath(f, self.folder), st.st_size, st.st_mtime_ns])
        doc = {"format": _CACHE_FORMAT, "folder": str(self.folder.resolve()), "size": size, "mode": mode,
               "classes": self.classes, "split": self.test_files is not None, "files": stats}
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:24]


def _image_files(folder: Path, classes: list[str]) -> tuple[list[str], list[int]]:
    files, labels = [], []
    for k, c in enumerate(classes):
        if not (folder / c).is_dir():
            continue
        for f in sorted((folder / c).rglob("*")):
            if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
                files.append(str(f))
                labels.append(k)
    return files, labels


def _decode_all(files: list[str], size: tuple[int, int] | None, mode: str, progress: bool,
                what: str) -> tuple[list[torch.Tensor | None], tuple[int, int]]:
    """Every file decoded (None where unreadable), by worker processes for many files; and the size used."""
    if size is None:  # the first readable image sets the size
        size = (0, 0)
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
        task = bar.add_task(f"decoding {len(files)} images of {what}", total=len(files))
        for batch in loader:
            for i, img in batch:
                images[i] = img
            bar.advance(task, len(batch))
    return images, size


@register_source("folder")
class Folder(DataSource):
    summary = ("an ImageFolder tree PATH/<class>/<image>, or PATH/train/<class>/... and PATH/test/<class>/... (its "
               "split kept), under --data-root or where the command runs")
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
    def subfolders(folder: Path) -> list[str]:
        return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))

    @classmethod
    def classes(cls, folder: Path, spec: str) -> list[str]:
        """The class sub-folders of ``folder`` (of its ``train/`` where it has its own split; none is refused)."""
        subs = cls.subfolders(folder)
        if set(SPLIT_FOLDERS) <= set(subs):
            others = [s for s in subs if s not in SPLIT_FOLDERS]
            if others:
                raise ValueError(f"{spec}: has train/ and test/ and also {', '.join(s + '/' for s in others)}; "
                                 "validation is drawn from train/ (stratified, seeded): move the other folder(s) "
                                 "out, or into train/")
            classes = cls.subfolders(folder / "train")
            strays = [c for c in cls.subfolders(folder / "test") if c not in classes]
            if strays:
                raise ValueError(f"{spec}: test/ has class folder(s) that train/ lacks: {', '.join(strays)}")
            subs = classes
        if not subs:
            raise ValueError(f"{spec}: no class sub-folders (expected PATH/<class>/<image>); or a split of its own, "
                             "PATH/train/<class>/<image> and PATH/test/<class>/<image>")
        return subs

    @staticmethod
    def refuse_one_class(classes: list[str], spec: str) -> None:
        """One class is nothing to classify: the run would train to the end and fail in the metrics."""
        if len(classes) == 1:
            raise ValueError(f"{spec}: one class sub-folder ({classes[0]!r}); classification needs at least two "
                             "(PATH/<class>/<image>, one folder per class)")

    def check(self, path: Path, root) -> None:
        spec = f"folder:{path}"
        self.refuse_one_class(self.classes(self.resolve(path, root), spec), spec)

    def listing(self, path: Path, root) -> Listing:
        """The folder's image files and labels, without decoding any."""
        folder = self.resolve(path, root)
        spec = f"folder:{path}"
        classes = self.classes(folder, spec)
        if set(SPLIT_FOLDERS) <= set(self.subfolders(folder)):
            files, labels = _image_files(folder / "train", classes)
            test_files, test_labels = _image_files(folder / "test", classes)
            if not test_files:
                raise ValueError(f"{spec}: no images ({', '.join(IMAGE_SUFFIXES)}) under test/")
            listing = Listing(folder, classes, files, labels, test_files, test_labels)
        else:
            files, labels = _image_files(folder, classes)
            listing = Listing(folder, classes, files, labels)
        if not files:
            raise ValueError(f"{spec}: no images ({', '.join(IMAGE_SUFFIXES)}) under "
                             f"{'train/' if listing.test_files is not None else ''}{', '.join(classes)}")
        self.refuse_one_class(classes, spec)
        return listing

    # -- the cache ------------------------------------------------------------------------------------

    @staticmethod
    def _cache_path(listing: Listing, size: tuple[int, int] | None, mode: str) -> Path | None:
        where = cache_dir()
        if where is None:
            return None
        return where / f"{listing.folder.resolve().name}-{listing.key(size, mode)}.safetensors"

    @staticmethod
    def _read_cache(path: Path | None) -> tuple[dict[str, torch.Tensor], dict] | None:
        if path is None or not path.is_file():
            return None
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get("folder", "null"))
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception:  # noqa: BLE001 - a damaged cache is decoded again and rewritten
            return None
        if not isinstance(meta, dict) or meta.get("format") != _CACHE_FORMAT:
            return None
        return tensors, meta

    @staticmethod
    def _write_cache(path: Path | None, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        if path is None:
            return
        from safetensors.torch import save

        from initscope.fileio import atomic_write

        try:
            atomic_write(path, lambda: save(tensors, metadata={"folder": json.dumps(meta)}))
        except OSError as exc:  # a read-only home or a full disk: the run goes on without a cache
            warnings.warn(f"could not cache the decoded folder in {path} ({exc}); set INITSCOPE_CACHE_DIR to a "
                          "writable folder to decode it once", stacklevel=3)

    # -- loading --------------------------------------------------------------------------------------

    def labels(self, path: Path, *, root, image_size, in_channels) -> Images | None:
        listing = self.listing(path, root)
        mode = "L" if in_channels == 1 else "RGB"
        size = None if image_size is None else square(image_size, (0, 0))
        cache = self._cache_path(listing, size, mode)
        if cache is not None and cache.is_file():
            return None  # decoded already: every image is one read away
        test = None
        if listing.test_files is not None:
            test = (torch.empty(0), torch.tensor(listing.test_labels, dtype=torch.long))
        return Images(torch.empty(0), torch.tensor(listing.labels, dtype=torch.long), listing.classes, test=test,
                      files=listing.relative(listing.files), test_files=listing.relative(listing.test_files or []))

    def load(self, path: Path, *, root, image_size, in_channels, progress,
             rows: tuple[list[int], list[int]] | None = None) -> Images:
        listing = self.listing(path, root)
        spec = f"folder:{path}"
        mode = "L" if in_channels == 1 else "RGB"
        size = None if image_size is None else square(image_size, (0, 0))
        if rows is not None:
            return self._load_rows(listing, rows, size, mode, spec, progress)
        cache = self._cache_path(listing, size, mode)
        cached = self._read_cache(cache)
        if cached is None:
            cached = self._decode_into_cache(listing, size, mode, spec, progress, cache)
        tensors, meta = cached
        for f in meta["skipped"]:
            warnings.warn(f"{spec}: skipping unreadable image {f}", stacklevel=2)
        test = (tensors["test_x"], tensors["test_y"]) if "test_x" in tensors else None
        return Images(tensors["x"], tensors["y"], listing.classes, test=test, files=meta["files"],
                      skipped=meta["skipped"], test_files=meta.get("test_files", []))

    def _decode_into_cache(self, listing: Listing, size, mode: str, spec: str, progress: bool,
                           cache: Path | None) -> tuple[dict[str, torch.Tensor], dict]:
        """Decode every image of the folder; write the cache; the tensors and their metadata."""
        images, size = _decode_all(listing.all_files(), size, mode, progress, spec)
        n = len(listing.files)
        skipped = [f for f, img in zip(listing.all_files(), images) if img is None]
        keep = [i for i in range(n) if images[i] is not None]
        if not keep:
            raise ValueError(f"{spec}: none of the {n} images could be decoded")
        tensors = {"x": torch.stack([images[i] for i in keep]),
                   "y": torch.tensor([listing.labels[i] for i in keep], dtype=torch.long)}
        meta = {"format": _CACHE_FORMAT, "files": listing.relative([listing.files[i] for i in keep]),
                "skipped": skipped, "size": list(size), "mode": mode}
        if listing.test_files is not None:
            keep_t = [i for i in range(len(listing.test_files)) if images[n + i] is not None]
            if not keep_t:
                raise ValueError(f"{spec}: none of the {len(listing.test_files)} images under test/ could be decoded")
            tensors["test_x"] = torch.stack([images[n + i] for i in keep_t])
            tensors["test_y"] = torch.tensor([listing.test_labels[i] for i in keep_t], dtype=torch.long)
            meta["test_files"] = listing.relative([listing.test_files[i] for i in keep_t])
        self._write_cache(cache, tensors, meta)
        return tensors, meta

    def _load_rows(self, listing: Listing, rows: tuple[list[int], list[int]], size, mode: str, spec: str,
                   progress: bool) -> Images:
        """Only the images ``rows`` names (pool and test indices), decoded now and not cached."""
        pool, test = sorted(set(rows[0])), sorted(set(rows[1]))
        wanted = [listing.files[i] for i in pool] + [listing.test_files[i] for i in test if listing.test_files]
        images, size = _decode_all(wanted, size, mode, progress, spec)
        skipped = [f for f, img in zip(wanted, images) if img is None]
        for f in skipped:
            warnings.warn(f"{spec}: skipping unreadable image {f}", stacklevel=3)
        kept_pool = [p for p, img in zip(pool, images) if img is not None]
        if not kept_pool:
            raise ValueError(f"{spec}: none of the {len(pool)} images this run uses could be decoded")
        x = torch.stack([img for img in images[:len(pool)] if img is not None])
        y = torch.tensor(listing.labels, dtype=torch.long)
        test_pair, kept_test = None, []
        if listing.test_files is not None:
            t_images = images[len(pool):]
            kept_test = [t for t, img in zip(test, t_images) if img is not None]
            t_x = torch.stack([img for img in t_images if img is not None]) if kept_test else \
                torch.empty(0, *x.shape[1:], dtype=torch.uint8)
            test_pair = (t_x, torch.tensor(listing.test_labels, dtype=torch.long))
        return Images(x, y, listing.classes, test=test_pair, files=listing.relative(listing.files), skipped=skipped,
                      rows=(kept_pool, kept_test), test_files=listing.relative(listing.test_files or []))


def warm_cache(source: str, *, root: str | Path | None, image_size: int | None, in_channels: int | None = None,
               progress: bool = False) -> bool:
    """Decode a ``folder:`` source into its cache now (before the processes of a ``--parallel`` sweep start, so
    that they read it rather than each decode it); True when there is a cache to read. Other sources: False."""
    from initscope.experiments.data.base import parse_data

    ref = parse_data(source)
    if not isinstance(ref.source, Folder) or cache_dir() is None:
        return False
    src: Folder = ref.source
    listing = src.listing(ref.arg, root)
    mode = "L" if in_channels == 1 else "RGB"
    size = None if image_size is None else square(image_size, (0, 0))
    cache = src._cache_path(listing, size, mode)
    if src._read_cache(cache) is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the runs report unreadable images themselves
            src._decode_into_cache(listing, size, mode, f"folder:{ref.arg}", progress, cache)
    return cache is not None and cache.is_file()
