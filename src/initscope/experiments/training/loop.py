"""One training run: data, model, initialization, optimizer; train, validate, keep the best; test it.

:func:`train` reads top to bottom in phases. Setup: seeds, device, data, model, the initialization
(``initscope.init_``), optimizer. Then per epoch: the schedule's learning rate, a pass over the
shuffled (and, with ``augment``, augmented: :mod:`.augment`) train split, validation (and the test split
after the epochs of ``test_at``), the best-validation checkpoint and the resume state, and the early
stop: with ``patience`` > 0 the run ends once that many epochs passed without a better validation
accuracy (never before ``min_epochs``), and says at which epoch it stopped. At the end the
best-validation weights are loaded and scored on the test split (accuracy, macro precision, recall,
F1, loss). A non-finite loss ends the run as ``diverged`` with its epoch: a result, not an exception.
The run's wall time and CPU time (this process, every thread; summed over the attempts of a resumed run)
and the device it ran on are in its result.

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
import functools
import json
import math
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
from initscope.errors import ConfigError
from initscope.experiments.training.checkpoint import (BEST_FILE, STATE_FILE, CheckpointError, check_state,
                                                       load_state, read_weights, set_aside, state_write,
                                                       weights_write)
from initscope.experiments.training.augment import Feeder, batch_seed, augment_batch, epoch_order
from initscope.experiments.training.metrics import classification_metrics
from initscope.experiments.training.optim import lr_at, make_optimizer, small_weights_note
from initscope.fileio import BackgroundWriter, atomic_write_text
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
    notes: list[str] = field(default_factory=list)  # what happened besides the result (a checkpoint set aside)
    stopped_epoch: int | None = None  # the early stop's epoch; None when the run trained every epoch
    wall_seconds: float | None = None  # setup, training and test, summed over the run's attempts
    cpu_seconds: float | None = None  # this process's CPU time over the same (every thread)
    device: str | None = None  # what it ran on: "cpu", "cuda:0 <name>, AMP float16"
    threads: int | None = None  # torch's intra-op threads

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
        extra = {"fixup_scalars": True} if config.fixup_scalars else {}
        return models.create(config.model, width=config.width, in_channels=in_channels, num_classes=num_classes,
                             norm=config.norm, head=config.head, **extra)
    kw: dict[str, Any] = {"num_classes": num_classes}
    if config.norm == "none":
        kw["norm_layer"] = nn.Identity
    elif config.norm != "default":
        raise ValueError(f"unknown norm {config.norm!r}; valid: default, none")
    model = set_in_channels(models.create(config.model, **kw), in_channels)
    return with_head(model, config.head, config.norm)


def batch_norms(model: nn.Module) -> list[str]:
    """The names of ``model``'s BatchNorm layers (any dimension)."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def check_batch_size(config: "RunConfig", model: nn.Module) -> None:
    """Refuse a run whose every training step would hand BatchNorm one sample.

    BatchNorm in train mode normalizes each channel over the batch; one sample leaves nothing to
    normalize over, and PyTorch refuses it. With ``batch_size=1`` (or ``limit=1``) every step is such a
    step: the run would train nothing. A model without BatchNorm (``norm="none"``) trains with batches of one.

    Raises:
        ConfigError: naming the run, the layer, and what to change.
    """
    if config.batch_size > 1 and config.limit != 1:
        return
    norms = batch_norms(model)
    if norms:
        what = "batch_size 1" if config.batch_size == 1 else "limit 1 (one training image)"
        raise ConfigError(
            f"run {config.run_id} ({config.model}): {what}, but the model has {len(norms)} BatchNorm layer(s) "
            f"({norms[0]}, ...): BatchNorm in train mode normalizes each channel over the batch and cannot with "
            "one sample, so no step could train. Use a batch of 2 or more, or norm=none (--norm none)")


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int,
            generator: torch.Generator | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Mini-batches of in-memory tensors, in a permutation drawn from ``generator`` (in order without).

    Indexing tensors already in memory skips the DataLoader's per-sample collation; a final train batch
    of one sample is dropped when the batches are larger (BatchNorm cannot normalize a single sample;
    :func:`check_batch_size` refuses batches of one for models with BatchNorm).
    """
    for idx in epoch_order(len(x), batch_size, generator):
        idx = idx.to(x.device)
        yield x[idx], y[idx]


def early_stop(history: list[dict[str, float]], best_epoch: int | None, patience: int, min_epochs: int) -> bool:
    """Whether a run with this history stops now: ``patience`` > 0, at least ``min_epochs`` epochs done, and
    ``patience`` epochs since the best validation accuracy (or since the start, when no epoch had one)."""
    done = len(history)
    return patience > 0 and done >= min_epochs and done - (best_epoch or 0) >= patience


def device_text(device: torch.device, amp: bool) -> str:
    """The device a run trains on, as the store records it: ``cpu`` or ``cuda:0 <GPU name>, AMP float16``."""
    if device.type != "cuda":
        return device.type
    index = device.index if device.index is not None else torch.cuda.current_device()
    return f"cuda:{index} {torch.cuda.get_device_name(index)}" + (", AMP float16" if amp else "")


def init_options(config: "RunConfig") -> dict[str, Any]:
    """The plan options a run sets (``distribution``, ``residual``); the method's own defaults otherwise. A
    method that draws its own way (orthogonal, LSUV: ``fixed_distribution``) keeps it: a sweep's ``distribution``
    is the law of the methods that draw i.i.d. weights (the Glorot/He paper's uniform Glorot and He beside LSUV)."""
    opts = {k: getattr(config, k) for k in ("distribution", "residual") if getattr(config, k) is not None}
    if getattr(METHODS[config.method], "fixed_distribution", False):
        opts.pop("distribution", None)
    return opts


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


def _probe_at_end(probe, step: int, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """The trained weights probed once more after the last step (unless that step was a probed one), so a
    run with ``probe_every`` has the distributions at initialization and at the end."""
    if probe.due(step):
        return
    from initscope.probe.callback import probe as run_probe

    # In training mode, as at initialization and at every probe during training: the figures then set
    # like beside like, and the plan's predictions stay the ones made for that mode (in eval mode the
    # probe would plan the trained model again, and warn that its stds moved: they were trained). The
    # batch's statistics must not move the running ones that the test reads, so they are put back.
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    was_training = model.training
    model.train()
    try:
        probe.record(step, run_probe(model, x, y, loss_fn=F.cross_entropy, plan=probe.plan, layers=probe.layers,
                                     quantities=probe.quantities, **probe.options))
    finally:
        model.train(was_training)
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])


def _resumable_state(run_dir: Path, config: "RunConfig", notes: list[str], *,
                     writer: bool) -> dict[str, Any] | None:
    """The resume state in ``run_dir`` when there is one that loads and fits this run, else None.

    A state that does not load (truncated, empty, garbage, a pickle: never unpickled, it could run
    code), does not fit the run, or whose best checkpoint (``best.safetensors``) is missing, damaged or
    from another epoch is set aside (renamed, by the ``writer`` rank only) and a line is added to
    ``notes``; the run then starts over.
    """
    def aside(path: Path, why: str) -> None:
        moved = set_aside(path) if writer and path.exists() else path
        notes.append(f"{path.name} {why}; set aside as {moved.name}; the run starts over from epoch 1")

    state_path = run_dir / STATE_FILE
    if not state_path.exists():
        return None
    try:
        state = load_state(state_path)
        check_state(state, config.epochs)
    except CheckpointError as exc:
        aside(state_path, f"could not be used ({str(exc).removeprefix(f'{state_path}: ')})")
        return None
    if state["best_epoch"] is not None:
        best_path = run_dir / BEST_FILE
        try:
            epoch = read_weights(best_path)[1].get("epoch")
            if epoch != state["best_epoch"]:
                raise CheckpointError(f"it holds epoch {epoch}, the resume state's best is epoch {state['best_epoch']}")
        except CheckpointError as exc:
            why = str(exc).removeprefix(f"{best_path}: ")
            notes.append(f"{BEST_FILE}, the best checkpoint the resume state needs, could not be used ({why})")
            if best_path.exists() and writer:
                notes[-1] += f"; set aside as {set_aside(best_path).name}"
            aside(state_path, "cannot resume without it")
            return None
    return state


# ---------------------------------------------------------------------------------------------- the run


def train(config: "RunConfig", *, out_dir: Path | None = None, progress: bool = True,
          on_epoch: Callable[[dict], None] | None = None, resume: bool = True) -> RunResult:
    """Train ``config``; return its :class:`RunResult`.

    Args:
        config: the run.
        out_dir: where ``<run_id>/`` gets ``best.safetensors`` (the best-validation weights), ``state.pt``
            (the resume state after every epoch, safetensors: no pickle, see :mod:`.checkpoint`),
            ``result.json``, for folders ``split.json``, and with
            ``probe_every > 0`` ``probe.parquet`` (the probe's rows, with a ``step`` column; on resume
            only the steps after it); None keeps everything in memory.
        progress: show a progress bar (epoch, step, loss, samples per second).
        on_epoch: called with each epoch's history row once it is done, and with ``out_dir`` once its
            checkpoint is on the disk (written on a thread of its own while the next epoch trains), so that a
            row stored by the caller is an epoch a resumed run does not train again.
        resume: continue from ``out_dir/<run_id>/state.pt`` when there is one; one that cannot be used
            is set aside and the run starts over (see the result's ``notes``).

    Raises:
        ConfigError: the run cannot train (BatchNorm with batches of one sample).
        DiskFullError: a checkpoint could not be written for want of space (nothing half-written stays).

    Examples:
        >>> from initscope.experiments.config import RunConfig
        >>> r = train(RunConfig(data="synthetic", width=4, epochs=1), progress=False)
        >>> r.status, sorted(r.test)
        ('finished', ['accuracy', 'f1', 'loss', 'precision', 'recall'])
    """
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    dist_env = distributed.DistEnv()
    wall0, cpu0 = time.perf_counter(), time.process_time()
    feeder: Feeder | None = None
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
        data = load_data(config.data, root=config.data_root, seed=config.seed, image_size=config.image_size,
                         normalize=config.normalize, limit=config.limit, eval_limit=config.eval_limit,
                         progress=progress)
        if run_dir is not None and data.files and dist_env.is_main:
            data.save_split(run_dir / "split.json")
        x_train, y_train = _split_tensors(data.train, device)
        x_val, y_val = _split_tensors(data.val, device)

        # -- setup: model, initialization, optimizer ------------------------------------------------
        def fresh() -> tuple[nn.Module, torch.optim.Optimizer, torch.amp.GradScaler, torch.Generator]:
            # seeded here, not only above: loading a folder draws from the global generator (the
            # DataLoader's base seed) on a cache miss, and a restart after a damaged checkpoint builds again
            torch.manual_seed(config.seed)
            model = build_model(config, data.in_channels, data.num_classes)
            check_batch_size(config, model)
            if dist_env.is_main:  # planned once; the other ranks get these weights by broadcast below
                initscope.init_(model, config.method, **_planned_from(config, data.input_shape, x_train),
                                generator=torch.Generator().manual_seed(config.seed), **init_options(config))
            model.to(device)
            opt = make_optimizer(config.optimizer, model.parameters(), config.lr, config.weight_decay)
            scaler = torch.amp.GradScaler(device.type, enabled=amp)
            return model, opt, scaler, torch.Generator().manual_seed(config.seed)

        model, opt, scaler, shuffle = fresh()
        autocast = torch.autocast("cuda", dtype=torch.float16) if amp else contextlib.nullcontext()
        probe = _probe_callback(config, run_dir) if dist_env.is_main else None

        # -- resume: the state after the last finished epoch, if a killed run left one ----------------
        history: list[dict[str, float]] = []
        notes: list[str] = []
        best_epoch, best_acc, best_state, start = None, -math.inf, None, 0
        spent = {"wall": 0.0, "cpu": 0.0}  # earlier attempts' wall and CPU seconds (a resumed run)
        state_path = run_dir / STATE_FILE if run_dir is not None else None
        best_path = run_dir / BEST_FILE if run_dir is not None and dist_env.is_main else None
        st = _resumable_state(run_dir, config, notes, writer=dist_env.is_main) if resume and run_dir else None
        if st is not None:
            try:
                model.load_state_dict(st["model"])
                opt.load_state_dict(st["optimizer"])
                scaler.load_state_dict(st["scaler"])
                shuffle.set_state(st["shuffle"])
                torch.set_rng_state(st["torch_rng"])
            except (RuntimeError, ValueError, KeyError, TypeError) as exc:  # another model's state: start over
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                moved = set_aside(state_path) if dist_env.is_main else state_path
                notes.append(f"{STATE_FILE} does not fit this run ({first}); set aside as {moved.name}; the run "
                             "starts over from epoch 1")
                model, opt, scaler, shuffle = fresh()  # the failed load may have written part of them
            else:
                history, best_epoch, best_acc, start = st["history"], st["best_epoch"], st["best_acc"], st["epoch"]
                if best_epoch is not None and dist_env.is_main:  # checked by _resumable_state: that epoch's
                    best_state = read_weights(run_dir / BEST_FILE)[0]
                spent = {"wall": float(st.get("wall_seconds", 0.0)), "cpu": float(st.get("cpu_seconds", 0.0))}
        if start == 0:  # what the initialization and the optimizer make of each other, said once per run
            note = small_weights_note(model, config.optimizer, config.lr)
            if note is not None:
                notes.append(note)
        distributed.broadcast_module(model, dist_env)
        net = distributed.wrap(model, dist_env, device)  # DDP for the training steps; `model` for the rest

        status, diverged_epoch, stopped_epoch = "finished", None, None
        if not dist_env.enabled:
            feeder = Feeder(x_train, y_train, config.batch_size, config.augment, config.seed,
                            workers=config.workers, device=device)
        x_test = y_test = None
        steps_per_epoch = max(1, math.ceil(len(x_train) // dist_env.world_size / config.batch_size))
        bar_every = max(1, steps_per_epoch // _BAR_UPDATES_PER_EPOCH)
        step = start * steps_per_epoch
        # checkpoints are written by rank 0 on a thread of their own (see BackgroundWriter)
        writer = BackgroundWriter("initscope-checkpoint") if state_path is not None and dist_env.is_main else None
        with progress_bar("loss", "rate", enabled=progress and dist_env.is_main, transient=True) as bar, \
                (writer or contextlib.nullcontext()):
            task = bar.add_task(f"{run_id} epoch {start + 1}/{config.epochs}", total=steps_per_epoch,
                                loss="loss -", rate="- img/s")
            if probe is not None and start == 0:  # step 0: the initialization itself
                probe(0, model, x_train[:config.batch_size], y_train[:config.batch_size], F.cross_entropy)
            for epoch in range(start, config.epochs):
                # a resumed run that had stopped already trains nothing more
                if early_stop(history, best_epoch, config.patience, config.min_epochs):
                    stopped_epoch = len(history)
                    break
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
                epoch_batches = (_augmented_shards(config, epoch, x_train, y_train, shuffle, dist_env)
                                 if dist_env.enabled else feeder.epoch(epoch, shuffle))
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
                        if writer is not None:  # the last epoch's checkpoint written: store its row
                            writer.poll()
                        # .item() syncs the device: only on bar updates. A NaN or inf in any step
                        # makes the running sum non-finite, so this also catches divergence.
                        mean_loss = loss_sum.item() / seen
                        if not math.isfinite(mean_loss) and not dist_env.enabled:  # ranks must step alike
                            break
                        bar.update(task, completed=i + 1, loss=f"loss {mean_loss:.4f}",
                                   rate=f"{seen / (time.perf_counter() - t0):.0f} img/s")
                if seen == 0 and not dist_env.enabled:  # a loss of 0 over no step would be recorded as a result
                    raise RuntimeError(f"run {run_id}: epoch {epoch + 1} had no training batch (train split of "
                                       f"{len(x_train)} images, batch_size {config.batch_size})")
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
                if epoch + 1 in config.test_at:  # the weights of this epoch on the test split (not the best ones)
                    if x_test is None:
                        x_test, y_test = _split_tensors(data.test, device)
                    test_logits = predict(model, x_test, config.batch_size, amp)
                    row["test_accuracy"] = float((test_logits.argmax(1) == y_test).float().mean())
                    row["test_loss"] = float(F.cross_entropy(test_logits, y_test))
                history.append(row)

                # -- checkpoint: the best validation accuracy so far (first one on ties), and the resume state --
                improved = val_acc > best_acc
                if improved:
                    best_epoch, best_acc = epoch + 1, val_acc
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                if writer is not None:
                    # copied now, written while the next epoch trains; the row is stored only once both
                    # files are on the disk, since a resumed run takes a stored epoch as done
                    meta = {"config": config.to_dict(), "epoch": epoch + 1, "val_accuracy": val_acc}
                    # best_state is a fresh copy that is replaced, never changed: written without another
                    writes = [weights_write(best_state, best_path, meta, copy=False)] if improved else []
                    writes.append(state_write(
                        {"model": model.state_dict(), "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
                         "shuffle": shuffle.get_state(), "torch_rng": torch.get_rng_state(), "history": history,
                         "best_epoch": best_epoch, "best_acc": best_acc, "epoch": epoch + 1,
                         "config": config.to_dict(), "wall_seconds": spent["wall"] + time.perf_counter() - wall0,
                         "cpu_seconds": spent["cpu"] + time.process_time() - cpu0}, state_path))
                    writer.submit(lambda writes=writes: [w() for w in writes],
                                  then=None if on_epoch is None else functools.partial(on_epoch, dict(row)))
                elif on_epoch is not None and dist_env.is_main:
                    on_epoch(dict(row))

                # -- early stop: patience epochs without a better validation accuracy --
                if epoch + 1 < config.epochs and early_stop(history, best_epoch, config.patience, config.min_epochs):
                    stopped_epoch = epoch + 1
                    break

        if probe is not None:
            if status == "finished":
                _probe_at_end(probe, step, model, x_train[:config.batch_size], y_train[:config.batch_size])
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
            model.load_state_dict(best_state)
            if x_test is None:
                x_test, y_test = _split_tensors(data.test, device)
            test = classification_metrics(predict(model, x_test, config.batch_size, amp).cpu(), y_test.cpu(),
                                          data.num_classes)
        result = RunResult(run_id=run_id, config=config, status=status, diverged_epoch=diverged_epoch,
                           history=history, best_epoch=best_epoch, test=test,
                           checkpoint=best_path if best_epoch is not None else None, notes=notes,
                           stopped_epoch=stopped_epoch, wall_seconds=spent["wall"] + time.perf_counter() - wall0,
                           cpu_seconds=spent["cpu"] + time.process_time() - cpu0, device=device_text(device, amp),
                           threads=torch.get_num_threads())
        if run_dir is not None and dist_env.is_main:
            atomic_write_text(run_dir / "result.json", json.dumps(result.to_dict(), indent=1))
        return result
    finally:
        if feeder is not None:
            feeder.close()
        torch.use_deterministic_algorithms(deterministic_before)
        distributed.teardown(dist_env)


def _augmented_shards(config: "RunConfig", epoch: int, x: torch.Tensor, y: torch.Tensor, shuffle: torch.Generator,
                      env: distributed.DistEnv) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Under torchrun: this rank's shard of the epoch, augmented with a seed per (epoch, batch, rank)."""
    for i, (xb, yb) in enumerate(distributed.shard_batches(x, y, config.batch_size, shuffle, env)):
        if config.augment != "none":
            g = torch.Generator().manual_seed(batch_seed(config.seed, epoch, i * env.world_size + env.rank))
            xb = augment_batch(xb, config.augment, g)
        yield xb, yb
