"""Checkpoints written atomically: a temporary file in the same folder, then ``os.replace``.

A reader (or a sweep killed mid-write) sees the old file or the new one, never half of one:
``os.replace`` within one file system is atomic. The weights go to safetensors (no pickle; readable
without initscope); the resume state (optimizer, epoch, history, random generators) to ``torch.save``.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn


def _atomic(path: Path, write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_weights(model: nn.Module, path: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Write ``model``'s state (parameters and buffers) as safetensors, atomically; metadata as JSON strings."""
    from safetensors.torch import save_file

    # safetensors refuses shared or non-contiguous storage: give it plain contiguous copies
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    meta = {k: json.dumps(v) for k, v in (metadata or {}).items()}
    return _atomic(Path(path), lambda tmp: save_file(state, tmp, metadata=meta))


def load_weights(model: nn.Module, path: str | Path) -> dict[str, Any]:
    """Load safetensors weights into ``model``; returns the metadata (JSON-decoded)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    model.load_state_dict(load_file(str(path), device=str(device)))
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return {k: json.loads(v) for k, v in meta.items()}


def save_state(state: dict[str, Any], path: str | Path) -> Path:
    """``torch.save`` of a resume state, atomically."""
    return _atomic(Path(path), lambda tmp: torch.save(state, tmp))


def load_state(path: str | Path) -> dict[str, Any]:
    """A resume state written by :func:`save_state`."""
    return torch.load(path, map_location="cpu", weights_only=False)
