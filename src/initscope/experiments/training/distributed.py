"""Data-parallel training under ``torchrun``: the process group, one initialization for every rank, the
shards of each epoch, and which rank writes.

``torchrun --nproc_per_node=N -m initscope train ...`` starts N processes with ``WORLD_SIZE``, ``RANK``
and ``LOCAL_RANK`` set; :func:`train` reads them through :func:`setup`. Then:

- the process group uses NCCL on GPUs (one GPU per process, ``cuda:LOCAL_RANK``) and gloo on the CPU;
- rank 0 alone plans and applies the initialization, and :func:`broadcast_module` copies its
  parameters and buffers to every other rank, so all start from the same weights;
- every epoch, every rank draws the same permutation of the train split (the shuffling generator is
  seeded alike) and takes the interleaved shard ``perm[rank::N]`` of its first ``N * floor(n / N)``
  items (:func:`shard_batches`): the shards partition the epoch, and every rank takes the same number
  of steps, as DistributedDataParallel needs;
- DistributedDataParallel averages the gradients, so the ranks' weights stay equal step by step;
  :func:`weights_digest` and :func:`check_in_sync` confirm it at the end of a run;
- only rank 0 writes: checkpoints, the resume state, ``result.json``, the results store.

The training loss and accuracy of an epoch are summed over all ranks (:func:`all_sum`). Validation runs
on every rank (equal weights give equal numbers, so every rank reaches the same divergence verdict
without another collective); the test split is scored on rank 0 alone.

initscope's own collectives (the broadcasts, the sums, the final check) run on a process group of their
own, ``DistEnv.group``, which :func:`teardown` destroys. Not on the default group: DistributedDataParallel
keeps references to the default group that outlive the wrapper (torch 2.14: 11 taken, 1 given back), so
that group's gloo threads are never joined and are still alive when the interpreter finalizes. A thread
that then drops the last tensors of a finished collective needs the GIL to free them, finds the
interpreter gone and aborts the process ("terminate called without an active exception"): rank 1 of a
CPU run, 12 runs in 70 on two loaded cores, when its last collective was on that group. Our own group is
destroyed, and its threads joined, while Python is alive.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands in a torchrun job (``world_size == 1``: not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    owns_group: bool = False  # this process created the default group, and destroys it at the end
    group: dist.ProcessGroup | None = field(default=None, compare=False, repr=False)  # initscope's collectives'

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """The rank that writes results (rank 0, or the only process)."""
        return self.rank == 0


def env_from_environ(environ: dict[str, str] | None = None) -> DistEnv:
    """The ranks torchrun set in ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK`` (a single process without them)."""
    e = os.environ if environ is None else environ
    try:
        world, rank, local = int(e.get("WORLD_SIZE", 1)), int(e.get("RANK", 0)), int(e.get("LOCAL_RANK", 0))
    except ValueError as exc:
        raise ValueError(f"WORLD_SIZE, RANK and LOCAL_RANK must be integers: {exc}") from None
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is not a rank of WORLD_SIZE={world}")
    return DistEnv(rank=rank, world_size=world, local_rank=local)


def setup(device: torch.device) -> tuple[DistEnv, torch.device]:
    """Join the torchrun job, if there is one: the process group (NCCL for CUDA, else gloo), a group of
    initscope's own for its collectives (see the module's docstring), and this rank's device
    (``cuda:LOCAL_RANK`` on GPUs). Without torchrun, returns a single-process env and ``device``."""
    env = env_from_environ()
    if not env.enabled:
        return env, device
    if device.type == "cuda":
        device = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend=backend, rank=env.rank, world_size=env.world_size)
    group = dist.new_group(backend=backend)
    return DistEnv(env.rank, env.world_size, env.local_rank, dist.get_backend(), owns, group), device


def teardown(env: DistEnv) -> None:
    """Destroy initscope's own group, joining its threads, then leave the default group if this process
    created it (the last collective, :func:`check_in_sync`, has already brought the ranks together)."""
    if env.group is not None and dist.is_initialized():
        dist.destroy_process_group(env.group)
    if env.owns_group and dist.is_initialized():
        dist.destroy_process_group()


@torch.no_grad()
def broadcast_module(module: nn.Module, env: DistEnv, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers into every rank's ``module`` (in place)."""
    if not env.enabled:
        return
    for t in [*module.parameters(), *module.buffers()]:
        dist.broadcast(t.data, src=src, group=env.group)


@torch.no_grad()
def sync_buffers(module: nn.Module, env: DistEnv, src: int = 0) -> None:
    """Copy rank ``src``'s buffers (BatchNorm's running statistics) to every rank, in place.

    Each rank updates its running statistics from its own shard; DDP re-broadcasts rank 0's at the start
    of every forward, so after an epoch's last step the ranks differ until this is called (before they
    evaluate or save).
    """
    if not env.enabled:
        return
    for t in module.buffers():
        dist.broadcast(t.data, src=src, group=env.group)


def wrap(module: nn.Module, env: DistEnv, device: torch.device) -> nn.Module:
    """``module`` under DistributedDataParallel for training steps (``module`` itself when not distributed).

    Keep using the bare module for evaluation and checkpoints: its parameters are the ones DDP trains,
    and its state_dict has no ``module.`` prefix.
    """
    if not env.enabled:
        return module
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


def shard_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, generator: torch.Generator,
                  env: DistEnv) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's mini-batches of one epoch: the permutation every rank draws alike from ``generator``,
    cut to ``world * floor(n / world)`` items, the interleaved shard ``[rank::world]``, in batches.

    Every rank gets the same number of batches of the same sizes (a last batch of one sample is dropped
    on every rank alike, as BatchNorm cannot normalize one sample).
    """
    n = len(x)
    order = torch.randperm(n, generator=generator)
    order = order[: n - n % env.world_size][env.rank::env.world_size].to(x.device)
    m = len(order)
    for s in range(0, m, batch_size):
        idx = order[s:s + batch_size]
        if len(idx) > 1 or m == 1:
            yield x[idx], y[idx]


def all_sum(env: DistEnv, *values: torch.Tensor) -> list[torch.Tensor]:
    """Each tensor summed over the ranks (the tensors themselves when not distributed)."""
    if not env.enabled:
        return list(values)
    out = []
    for v in values:
        v = v.clone()
        dist.all_reduce(v, op=dist.ReduceOp.SUM, group=env.group)
        out.append(v)
    return out


def weights_digest(module: nn.Module) -> str:
    """SHA-256 of the module's state (names, dtypes, shapes and bytes of every tensor, in order)."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def check_in_sync(module: nn.Module, env: DistEnv) -> list[str]:
    """Every rank's :func:`weights_digest`, gathered; raises RuntimeError when they differ (the ranks drifted
    apart: a bug, never a result to keep)."""
    digest = weights_digest(module)
    if not env.enabled:
        return [digest]
    digests: list[str | None] = [None] * env.world_size
    dist.all_gather_object(digests, digest, group=env.group)
    if len(set(digests)) != 1:
        raise RuntimeError(f"data-parallel ranks ended with different weights: {digests}")
    return [str(d) for d in digests]


def write_sync_record(run_dir: str | Path, env: DistEnv, digests: list[str]) -> Path:
    """Rank 0's note beside the results, ``ddp.json``: world size, backend, and every rank's weights digest."""
    path = Path(run_dir) / "ddp.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(".ddp.json.tmp")
    tmp.write_text(json.dumps({"world_size": env.world_size, "backend": env.backend, "weights_sha256": digests},
                              indent=1))
    os.replace(tmp, path)
    return path
