"""One training run: data, model, initialization, optimizer; train, validate, keep the best; test it.

:func:`train` reads top to bottom in phases. Setup: seeds, device, data, model, the initialization
(``initscope.init_``), optimizer. Then per epoch: the schedule's learning rate, a pass over the
shuffled train split, validation, the best-validation checkpoint and the resume state. At the end the
best-validation weights are loaded and scored on the test split (accuracy, macro precision, recall,
F1, loss). A non-finite loss ends the run as ``diverged`` with its epoch: a result, not an exception.

A run is repeatable to the bit on the CPU: ``torch.manual_seed(seed)`` before the model is built, the
initialization drawn from its own ``torch.Generator``, the shuffling from another, and
deterministic algorithms on during the run. On a GPU (``device="auto"`` with CUDA there) the run uses
automatic mixed precision (``torch.autocast`` to float16 and a ``GradScaler``).

Under ``torchrun --nproc_per_node=N`` the run is data-parallel (DistributedDataParallel, gloo on the
CPU, NCCL on GPUs): rank 0 plans the initialization and broadcasts it, each rank trains on its shard of
every epoch, and only rank 0 writes; see :mod:`initscope.experiments.training.distributed`.

A :class:`~initscope.experiments.config.RunConfig` is checked when it is made, so ``train`` starts
from a configuration that can run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

import initscope
from initscope.experiments.data import load_data
from initscope.experiments.training import distributed
from initscope.experiments.training.checkpoint import load_state, load_weights, save_state, save_weights
from initscope.experiments.training.metrics import classification_metrics
from initscope.experiments.training.optim import lr_at, make_optimizer
from initscope.methods import METHODS
from initscope.progress import progress_bar

if TYPE_CHECKING:  # the loop reads a config; it never builds or checks one
    from initscope.experiments.config import RunConfig

# The bar reads the loss (a device sync on a GPU) this many times per epoch, not every step.
_BAR_UPDATES_PER_EPOCH = 20
STATUSES = ("finished", "diverged", "failed")


@dataclass
class RunResult:
    """What a run gives: its status, per-epoch history, best epoch and test metrics."""

    run_id: str
    config: "RunConfig"
    status: str
    error: str | None = None
    diverged_epoch: int | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int | None = None
    test: dict[str, float] = field(default_factory=dict)
    checkpoint: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["config"] = self.config.to_dict()
        d["checkpoint"] = None if self.checkpoint is None else str(self.checkpoint)
        return d


# ---------------------------------------------------------------------------------------------- helpers


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when there is a GPU, else the CPU; anything else is passed to ``torch.device``
    (the config has checked that it is a device torch knows)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_model(config: "RunConfig", in_channels: int, num_classes: int) -> nn.Module:
    """The model of ``config`` for the data's channels and classes.

    initscope's registered models take ``width``, ``norm`` and ``head``; any other torchvision name or
    ``module:callable`` gets ``num_classes`` only (and ``norm_layer=nn.Identity`` for ``norm="none"``),
    then its first conv is rebuilt for ``in_channels``.
    """
    from initscope import models
    from initscope.models.zoo import set_in_channels, with_head

    if models.is_registered(config.model):
        return models.create(config.model, width=config.width, in_channels=in_channels, num_classes=num_classes,
                             norm=config.norm, head=config.head)
    kw: dict[str, Any] = {"num_classes": num_classes}
    if config.norm == "none":
        kw["norm_layer"] = nn.Identity
    elif config.norm != "default":
        raise ValueError(f"unknown norm {config.norm!r}; valid: default, none")
    model = set_in_channels(models.create(config.model, **kw), in_channels)
    return with_head(model, config.head, config.norm)


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int,
            generator: torch.Generator | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Mini-batches of in-memory tensors, in a permutation drawn from ``generator`` (in order without).

    Indexing tensors already in memory skips the DataLoader's per-sample collation; a final train batch
    of one sample is dropped (BatchNorm cannot normalize a single sample).
    """
    n = len(x)
    if generator is None:
        for s in range(0, n, batch_size):
            yield x[s:s + batch_size], y[s:s + batch_size]
        return
    order = torch.randperm(n, generator=generator).to(x.device)
    for s in range(0, n, batch_size):
        idx = order[s:s + batch_size]
        if len(idx) > 1 or n == 1:
            yield x[idx], y[idx]


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int, amp: bool = False) -> torch.Tensor:
    """The model's logits (float32) for all of ``x``, in eval mode, batch by batch."""
    model.eval()
    out = []
    step = max(batch_size, 256)  # no gradients kept: larger batches cost no more memory than training
    autocast = torch.autocast("cuda", dtype=torch.float16) if amp else contextlib.nullcontext()
    for s in range(0, len(x), step):
        with autocast:
            out.append(model(x[s:s + step]).float())
    return torch.cat(out)


def _split_tensors(ds, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = ds.tensors
    return x.to(device), y.to(device)


def _planned_from(config: "RunConfig", input_shape: tuple[int, ...], x_train: torch.Tensor) -> dict[str, Any]:
    """What the initialization is planned from: the input shape (i.i.d. N(0, 1) inputs), or, for a method
    that sets its scale on data (``needs_data``, such as LSUV), the first batch of the train
    split, on the CPU where the model is built."""
    if getattr(METHODS[config.method], "needs_data", False):
        return {"example_input": x_train[:config.batch_size].cpu()}
    return {"input_shape": input_shape}


def _probe_callback(config: "RunConfig", run_dir: Path | None):
    """The probe's callback when a run asks for it (``probe_every > 0``): it measures every layer's
    distributions at steps 0, N, 2N, ... (step 0 = the initialization) in its own forward and backward pass."""
    if config.probe_every <= 0:
        return None
    try:
        from initscope.probe import ProbeCallback
    except ImportError as exc:
        raise RuntimeError(f"probe callback not available (initscope.probe.ProbeCallback: {exc}); "
                           "run with probe_every=0") from exc
    return ProbeCallback(every=config.probe_every, seed=config.seed)


# ---------------------------------------------------------------------------------------------- the run


def train(config: "RunConfig", *, out_dir: Path | None = None, progress: bool = True,
          on_epoch: Callable[[dict], None] | None = None, resume: bool = True) -> RunResult:
    """Train ``config``; return its :class:`RunResult`.

    Args:
        config: the run.
        out_dir: where ``<run_id>/`` gets ``best.safetensors`` (the best-validation weights), ``state.pt``
            (the resume state after every epoch), ``result.json``, for folders ``split.json``, and with
            ``probe_every > 0`` ``probe.parquet`` (the probe's rows, with a ``step`` column; on resume
            only the steps after it); None keeps everything in memory.
        progress: show a progress bar (epoch, step, loss, samples per second).
        on_epoch: called with each epoch's history row as soon as it is done.
        resume: continue from ``out_dir/<run_id>/state.pt`` when there is one.

    Examples:
        >>> from initscope.experiments.config import RunConfig
        >>> r = train(RunConfig(data="synthetic", width=4, epochs=1), progress=False)
        >>> r.status, sorted(r.test)
        ('finished', ['accuracy', 'f1', 'loss', 'precision', 'recall'])
    """
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    dist_env = distributed.DistEnv()
    try:
        # -- setup: device, seeds, data ------------------------------------------------------------
        run_id = config.run_id
        run_dir = Path(out_dir) / run_id if out_dir is not None else None
        # under torchrun: join the process group; this rank's device; only rank 0 writes (see distributed.py)
        dist_env, device = distributed.setup(resolve_device(config.device))
        amp = device.type == "cuda"  # float16 autocast + loss scaling on a GPU; full precision on the CPU
        if device.type == "cpu":  # bit-for-bit repeatable; on a GPU it would cost cuDNN its fastest kernels
            torch.use_deterministic_algorithms(True, warn_only=True)
        torch.manual_seed(config.seed)
        shuffle = torch.Generator().manual_seed(config.seed)
        data = load_data(config.data, root=config.data_root, seed=config.seed, image_size=config.image_size,
                         normalize=config.normalize, limit=config.limit, progress=progress)
        if run_dir is not None and data.files and dist_env.is_main:
            data.save_split(run_dir / "split.json")
        x_train, y_train = _split_tensors(data.train, device)
        x_val, y_val = _split_tensors(data.val, device)

        # -- setup: model, initialization, optimizer ------------------------------------------------
        model = build_model(config, data.in_channels, data.num_classes)
        if dist_env.is_main:  # planned once; the other ranks get these weights by broadcast below
            initscope.init_(model, config.method, **_planned_from(config, data.input_shape, x_train),
                            generator=torch.Generator().manual_seed(config.seed))
        model.to(device)
        opt = make_optimizer(config.optimizer, model.parameters(), config.lr, config.weight_decay)
        scaler = torch.amp.GradScaler(device.type, enabled=amp)
        autocast = torch.autocast("cuda", dtype=torch.float16) if amp else contextlib.nullcontext()
        probe = _probe_callback(config, run_dir) if dist_env.is_main else None

        # -- resume: the state after the last finished epoch, if a killed run left one ----------------
        history: list[dict[str, float]] = []
        best_epoch, best_acc, best_state, start = None, -math.inf, None, 0
        state_path = run_dir / "state.pt" if run_dir is not None else None
        best_path = run_dir / "best.safetensors" if run_dir is not None and dist_env.is_main else None
        if resume and state_path is not None and state_path.exists():
            st = load_state(state_path)
            model.load_state_dict(st["model"])
            opt.load_state_dict(st["optimizer"])
            scaler.load_state_dict(st["scaler"])
            shuffle.set_state(st["shuffle"])
            torch.set_rng_state(st["torch_rng"])
            history, best_epoch, best_acc, start = st["history"], st["best_epoch"], st["best_acc"], st["epoch"]
        distributed.broadcast_module(model, dist_env)
        net = distributed.wrap(model, dist_env, device)  # DDP for the training steps; `model` for the rest

        status, diverged_epoch = "finished", None
        steps_per_epoch = max(1, math.ceil(len(x_train) // dist_env.world_size / config.batch_size))
        bar_every = max(1, steps_per_epoch // _BAR_UPDATES_PER_EPOCH)
        step = start * steps_per_epoch
        with progress_bar("loss", "rate", enabled=progress and dist_env.is_main, transient=True) as bar:
            task = bar.add_task(f"{run_id} epoch {start + 1}/{config.epochs}", total=steps_per_epoch,
                                loss="loss -", rate="- img/s")
            if probe is not None and start == 0:  # step 0: the initialization itself
                probe(0, model, x_train[:config.batch_size], y_train[:config.batch_size], F.cross_entropy)
            for epoch in range(start, config.epochs):
                t0 = time.perf_counter()
                # -- schedule: this epoch's learning rate --
                lr = lr_at(epoch, config.lr, config.schedule, epochs=config.epochs,
                           step_epochs=config.step_epochs, step_gamma=config.step_gamma)
                for group in opt.param_groups:
                    group["lr"] = lr
                bar.reset(task, total=steps_per_epoch, description=f"{run_id} epoch {epoch + 1}/{config.epochs}")

                # -- train: forward, backward, step; loss and hits summed on the device --
                model.train()
                loss_sum = torch.zeros((), device=device)
                hits = torch.zeros((), device=device, dtype=torch.long)
                seen = 0
                epoch_batches = (distributed.shard_batches(x_train, y_train, config.batch_size, shuffle, dist_env)
                                 if dist_env.enabled else batches(x_train, y_train, config.batch_size, shuffle))
                for i, (xb, yb) in enumerate(epoch_batches):
                    with autocast:
                        logits = net(xb)
                        loss = F.cross_entropy(logits, yb)
                    opt.zero_grad(set_to_none=True)
                    if amp:  # float16 gradients underflow without loss scaling
                        scaler.scale(loss).backward()
                        scaler.step(opt)
                        scaler.update()
                    else:
                        loss.backward()
                        opt.step()
                    loss_sum += loss.detach() * len(yb)
                    hits += (logits.detach().argmax(1) == yb).sum()
                    seen += len(yb)
                    step += 1
                    if probe is not None and step % config.probe_every == 0:
                        probe(step, model, xb, yb, F.cross_entropy)
                    if (i + 1) % bar_every == 0:
                        # .item() syncs the device: only on bar updates. A NaN or inf in any step
                        # makes the running sum non-finite, so this also catches divergence.
                        mean_loss = loss_sum.item() / seen
                        if not math.isfinite(mean_loss) and not dist_env.enabled:  # ranks must step alike
                            break
                        bar.update(task, completed=i + 1, loss=f"loss {mean_loss:.4f}",
                                   rate=f"{seen / (time.perf_counter() - t0):.0f} img/s")
                if dist_env.enabled:  # the epoch's numbers over every rank's shard
                    loss_sum, hits, seen_all = distributed.all_sum(dist_env, loss_sum, hits,
                                                                   torch.tensor(seen, device=device))
                    seen = int(seen_all)
                    distributed.sync_buffers(model, dist_env)  # rank 0's BatchNorm statistics, as DDP uses them
                train_loss, train_acc = loss_sum.item() / max(1, seen), hits.item() / max(1, seen)

                # -- validate --
                val_logits = predict(model, x_val, config.batch_size, amp)
                val_loss = float(F.cross_entropy(val_logits, y_val))
                val_acc = float((val_logits.argmax(1) == y_val).float().mean())
                if not (math.isfinite(train_loss) and math.isfinite(val_loss)):
                    status, diverged_epoch = "diverged", epoch + 1
                    break
                row = {"epoch": epoch + 1, "train_loss": train_loss, "train_accuracy": train_acc,
                       "val_loss": val_loss, "val_accuracy": val_acc, "lr": lr,
                       "seconds": time.perf_counter() - t0}
                history.append(row)

                # -- checkpoint: the best validation accuracy so far (first one on ties), and the resume state --
                if val_acc > best_acc:
                    best_epoch, best_acc = epoch + 1, val_acc
                    if best_path is not None:
                        save_weights(model, best_path, {"config": config.to_dict(), "epoch": epoch + 1,
                                                        "val_accuracy": val_acc})
                    else:
                        best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                if state_path is not None and dist_env.is_main:
                    save_state({"model": model.state_dict(), "optimizer": opt.state_dict(),
                                "scaler": scaler.state_dict(), "shuffle": shuffle.get_state(),
                                "torch_rng": torch.get_rng_state(), "history": history, "best_epoch": best_epoch,
                                "best_acc": best_acc, "epoch": epoch + 1, "config": config.to_dict()}, state_path)
                if on_epoch is not None and dist_env.is_main:
                    on_epoch(dict(row))

        if probe is not None:
            if run_dir is not None:  # beside the results, for the report's figures
                probe.save(run_dir / "probe.parquet")
            probe.close()

        if dist_env.enabled:  # every rank must hold rank 0's weights now; rank 0 records the check
            digests = distributed.check_in_sync(model, dist_env)
            if run_dir is not None and dist_env.is_main:
                distributed.write_sync_record(run_dir, dist_env, digests)

        # -- test: the best-validation weights on the test split (rank 0's job under torchrun) --
        test: dict[str, float] = {}
        if best_epoch is not None and dist_env.is_main:
            if best_path is not None:
                load_weights(model, best_path)
            else:
                model.load_state_dict(best_state)
            x_test, y_test = _split_tensors(data.test, device)
            test = classification_metrics(predict(model, x_test, config.batch_size, amp).cpu(), y_test.cpu(),
                                          data.num_classes)
        result = RunResult(run_id=run_id, config=config, status=status, diverged_epoch=diverged_epoch,
                           history=history, best_epoch=best_epoch, test=test,
                           checkpoint=best_path if best_epoch is not None else None)
        if run_dir is not None and dist_env.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            tmp = run_dir / ".result.json.tmp"
            tmp.write_text(json.dumps(result.to_dict(), indent=1))
            os.replace(tmp, run_dir / "result.json")
        return result
    finally:
        torch.use_deterministic_algorithms(deterministic_before)
        distributed.teardown(dist_env)
