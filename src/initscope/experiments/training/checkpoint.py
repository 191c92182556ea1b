"""Checkpoints that cannot carry code, written so that a kill or a power loss never leaves half of one.

Both files of a run folder are safetensors: ``best.safetensors`` (the best-validation weights, readable
without initscope) and ``state.pt`` (the resume state, under the name it always had: model, optimizer,
loss scaler, random generators as tensors; epoch, history and the rest as JSON in the file's metadata,
with tensors referenced by name). Nothing in either is unpickled, so a file planted in an output folder
(which may sit on a shared file system for Ray) cannot run code when a run resumes; a pickled
``state.pt`` (as earlier releases wrote it, with ``torch.save``) is never loaded, only set aside.

Every write goes through :func:`initscope.fileio.atomic_write`: a temporary file in the same folder,
``fsync``, ``os.replace``, ``fsync`` of the folder. A reader sees the old file or the new one, and after
a power loss the file is never empty.

A checkpoint that does not load anyway (truncated, garbage, from another model) raises
:class:`CheckpointError`; the training loop then sets it aside (:func:`set_aside`), notes it in the run,
and starts the run over, so a damaged file never fails a run forever.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from initscope.errors import InitscopeError
from initscope.fileio import atomic_write

STATE_FILE = "state.pt"  # the name earlier releases gave their pickled state; the bytes are safetensors now
BEST_FILE = "best.safetensors"
_FORMAT = "initscope-state/1"
# How a pickle begins: torch.save's zip archive, or a bare pickle (protocol 2 and later start with PROTO).
_PICKLE_MAGIC = (b"PK\x03\x04", b"\x80")


class CheckpointError(InitscopeError, ValueError):
    """A checkpoint file that cannot be loaded: missing, truncated, not safetensors, or not what it should hold."""


# -- the resume state: tensors apart, the rest as JSON ---------------------------------------------------


def _split(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """``obj`` as JSON-ready data, each tensor replaced by ``{"__tensor__": name}`` and put in ``tensors``.

    Dicts whose keys are not all strings (an optimizer's state, keyed by parameter index) and tuples are
    tagged, so that :func:`_join` gives back exactly what was saved.
    """
    if isinstance(obj, torch.Tensor):
        name = f"t{len(tensors)}"
        # a copy of its own: safetensors refuses tensors that share storage, and a view's strides
        tensors[name] = obj.detach().to("cpu").contiguous().clone()
        return {"__tensor__": name}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _split(v, tensors) for k, v in obj.items()}
        return {"__dict__": [[_split(k, tensors), _split(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_split(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_split(v, tensors) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"a resume state holds {type(obj).__name__!r}, which it cannot store: only tensors, numbers, "
                    "strings, None, lists, tuples and dicts")


def _join(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of :func:`_split`."""
    if isinstance(obj, list):
        return [_join(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        if set(obj) == {"__tuple__"}:
            return tuple(_join(v, tensors) for v in obj["__tuple__"])
        if set(obj) == {"__dict__"}:
            return {_hashable(_join(k, tensors)): _join(v, tensors) for k, v in obj["__dict__"]}
        return {k: _join(v, tensors) for k, v in obj.items()}
    return obj


def _hashable(key: Any) -> Any:
    if isinstance(key, (list, dict, torch.Tensor)):
        raise ValueError(f"a dict key of type {type(key).__name__} in a resume state")
    return key


def save_state(state: dict[str, Any], path: str | Path) -> Path:
    """Write a resume state (tensors, numbers, strings, lists, tuples, dicts) as safetensors, atomically
    and durably; bit for bit what :func:`load_state` gives back."""
    return state_write(state, path)()


def state_write(state: dict[str, Any], path: str | Path) -> Callable[[], Path]:
    """:func:`save_state` taken now and done later: the tensors are copied at once (so training may go on
    and change them), the file is made and written when the returned function is called, on a background
    thread for instance (:class:`initscope.fileio.BackgroundWriter`)."""
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    skeleton = _split(state, tensors)
    # JSON writes inf and nan as Infinity and NaN, which Python's json reads back (best_acc starts at -inf)
    meta = {"format": _FORMAT, "state": json.dumps(skeleton, allow_nan=True)}
    return lambda: atomic_write(path, lambda: save(tensors, metadata=meta))


def load_state(path: str | Path) -> dict[str, Any]:
    """A resume state written by :func:`save_state`; no code is run whatever the file holds.

    Raises:
        CheckpointError: the file is missing, not safetensors, truncated, or not a resume state.
    """
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if meta.get("format") != _FORMAT:
            raise ValueError(f"not an initscope resume state (format {meta.get('format')!r}, expected {_FORMAT!r})")
        state = _join(json.loads(meta["state"]), tensors)
    except Exception as exc:  # noqa: BLE001 - whatever the bytes are, the answer is "cannot be loaded"
        # asked only now: a safetensors header's length may begin with the same bytes as a pickle
        if is_pickle(path):
            raise CheckpointError(f"{path}: a pickle (the resume state of an earlier release, or a planted "
                                  "file); not loaded, since unpickling it could run code") from None
        raise CheckpointError(f"{path}: {_reason(exc)}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not an initscope resume state (it holds a {type(state).__name__})")
    return state


def is_pickle(path: str | Path) -> bool:
    """Whether the file begins as a pickle or a ``torch.save`` archive does (read, never unpickled)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError:
        return False
    return any(head.startswith(m) for m in _PICKLE_MAGIC)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError):
        return "missing"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# -- weights -----------------------------------------------------------------------------------------------


def save_weights(model: nn.Module, path: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Write ``model``'s state (parameters and buffers) as safetensors, atomically and durably; metadata as
    JSON strings."""
    return weights_write(model.state_dict(), path, metadata)()


def weights_write(state: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, Any] | None = None, *,
                  copy: bool = True) -> Callable[[], Path]:
    """:func:`save_weights` of a state dict, taken now (the tensors copied) and written when the returned
    function is called. ``copy=False``: the tensors are the caller's own copies already, never changed
    afterwards (the training loop's best weights), and are written as they are once on the CPU."""
    from safetensors.torch import save

    # safetensors refuses shared or non-contiguous storage: give it plain contiguous copies
    tensors = {k: (v.detach().to("cpu").contiguous().clone() if copy else v.detach().to("cpu").contiguous())
               for k, v in state.items()}
    meta = {k: json.dumps(v) for k, v in (metadata or {}).items()}
    return lambda: atomic_write(path, lambda: save(tensors, metadata=meta))


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and the (JSON-decoded) metadata of a weights file.

    Raises:
        CheckpointError: the file is missing, truncated or not safetensors.
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        return tensors, {k: json.loads(v) for k, v in meta.items()}
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"{path}: {_reason(exc)}") from None


def load_weights(model: nn.Module, path: str | Path) -> dict[str, Any]:
    """Load safetensors weights into ``model``; returns the metadata (JSON-decoded).

    Raises:
        CheckpointError: the file cannot be read, or does not hold this model's weights.
    """
    tensors, meta = read_weights(path)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    try:
        model.load_state_dict({k: v.to(device) for k, v in tensors.items()})
    except RuntimeError as exc:  # other keys or shapes: another model's file
        raise CheckpointError(f"{path}: not this model's weights ({str(exc).splitlines()[0]})") from None
    return meta


# -- damaged files -----------------------------------------------------------------------------------------


def set_aside(path: str | Path) -> Path:
    """Rename a checkpoint that cannot be used to ``NAME.set-aside-<time>`` (kept for inspection, never
    read again); returns the new path."""
    path = Path(path)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    target = path.with_name(f"{path.name}.set-aside-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.set-aside-{stamp}-{n}")
    os.replace(path, target)
    return target


def check_state(state: dict[str, Any], epochs: int) -> None:
    """Refuse a loaded resume state that is not one of this run's (keys, epoch, history, best epoch).

    Raises:
        CheckpointError: saying what does not fit.
    """
    need = ("model", "optimizer", "scaler", "shuffle", "torch_rng", "history", "best_epoch", "best_acc", "epoch")
    missing = [k for k in need if k not in state]
    if missing:
        raise CheckpointError(f"the resume state lacks {', '.join(missing)}")
    epoch, best = state["epoch"], state["best_epoch"]
    if isinstance(epoch, bool) or not isinstance(epoch, int) or not 1 <= epoch <= epochs:
        raise CheckpointError(f"the resume state's epoch {epoch!r} is not one of this run's 1..{epochs}")
    if not isinstance(state["history"], list) or len(state["history"]) != epoch:
        raise CheckpointError(f"the resume state's history does not have {epoch} epochs")
    if best is not None and (isinstance(best, bool) or not isinstance(best, int) or not 1 <= best <= epoch):
        raise CheckpointError(f"the resume state's best epoch {best!r} is not one of its epochs 1..{epoch}")
    if not isinstance(state["best_acc"], float) or (best is not None and not math.isfinite(state["best_acc"])):
        raise CheckpointError(f"the resume state's best accuracy {state['best_acc']!r} is not a number")
    for key in ("shuffle", "torch_rng"):
        if not isinstance(state[key], torch.Tensor) or state[key].dtype != torch.uint8:
            raise CheckpointError(f"the resume state's {key} is not a generator state")
