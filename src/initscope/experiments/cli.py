"""``initscope train``: one training run from flags (the sweep runs many; see ``initscope sweep``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch
import typer


def train_cmd(
    data: str = typer.Option("digits", "--data", help="digits, synthetic, mnist, fashion-mnist, cifar10, cifar100 or folder:PATH"),
    data_root: Optional[str] = typer.Option(None, "--data-root", help="where the torchvision sets lie"),
    model: str = typer.Option("plain34", "--model", "-m", help="see `initscope.models.list_models()`"),
    width: int = typer.Option(16, "--width", help="stem channels (64 = the papers' plain34/ResNet; 32 = MobileNet 1.0)"),
    norm: str = typer.Option("default", "--norm", help="default or none (BatchNorm-free)"),
    head: str = typer.Option("default", "--head", help="default or paper (256-unit linear + BatchNorm + ReLU)"),
    method: str = typer.Option("kaiming-forward", "--method", help="see `initscope methods`"),
    optimizer: str = typer.Option("adam", "--optimizer", help="sgd, sgd-nesterov, adadelta, adagrad, rmsprop, adam, adamw"),
    lr: float = typer.Option(1e-3, "--lr"),
    schedule: str = typer.Option("constant", "--schedule", help="constant, step or cosine"),
    step_epochs: str = typer.Option("", "--step-epochs", help="epochs where the step schedule decays, e.g. 30,60"),
    step_gamma: float = typer.Option(0.1, "--step-gamma"),
    epochs: int = typer.Option(5, "--epochs"),
    batch_size: int = typer.Option(64, "--batch-size"),
    seed: int = typer.Option(0, "--seed"),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="resize images to this square size"),
    normalize: str = typer.Option("minus-one-one", "--normalize", help="minus-one-one or mean-subtract"),
    weight_decay: float = typer.Option(0.0, "--weight-decay"),
    limit: Optional[int] = typer.Option(None, "--limit", help="use this many train images (stratified)"),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda"),
    probe_every: int = typer.Option(0, "--probe-every", help="probe every N steps (0 = off)"),
    out: Path = typer.Option(Path("runs"), "--out", help="folder for checkpoints and result.json"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="continue a killed run from its last epoch"),
    threads: int = typer.Option(0, "--threads", help="torch CPU threads (0: torch's default); 1 on a shared machine"),
) -> None:
    """Train one model with one initialization; print the per-epoch history and the test metrics."""
    from rich.console import Console
    from rich.table import Table

    from initscope.errors import InitscopeError
    from initscope.experiments.preflight import PreflightError, check_output
    from initscope.experiments.train import RunConfig, train

    console = Console()
    if threads > 0:
        # On a machine whose cores other processes also use, OpenMP threads spin-waiting on each other can
        # slow every step many times over; one thread each avoids it.
        torch.set_num_threads(threads)
    try:
        steps = tuple(int(s) for s in step_epochs.replace(" ", "").split(",") if s)
    except ValueError:
        raise typer.BadParameter(f"{step_epochs!r} is not a list of epochs: write it like 30,60") from None
    try:
        config = RunConfig(data=data, data_root=data_root, model=model, width=width, norm=norm, head=head,
                           method=method, optimizer=optimizer, lr=lr, schedule=schedule, step_epochs=steps,
                           step_gamma=step_gamma, epochs=epochs, batch_size=batch_size, seed=seed,
                           image_size=image_size, normalize=normalize, weight_decay=weight_decay, limit=limit,
                           device=device, probe_every=probe_every)
        check_output(out)  # an unwritable folder or a full disk: an error now, not at the first checkpoint
        result = train(config, out_dir=out, progress=progress, resume=resume)
    except (InitscopeError, ValueError, TypeError, FileNotFoundError, RuntimeError, PreflightError) as exc:
        console.print(f"[red]error:[/red] {exc}", markup=True, highlight=False)
        raise typer.Exit(2) from None
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 reports for all
        return
    table = Table("epoch", "lr", "train loss", "train acc", "val loss", "val acc", "s",
                  title=f"{config.model} · {config.method} · {config.optimizer} lr {config.lr:g} · {config.data}")
    for h in result.history:
        mark = " *" if h["epoch"] == result.best_epoch else ""
        table.add_row(f"{h['epoch']}{mark}", f"{h['lr']:.3g}", f"{h['train_loss']:.4f}", f"{h['train_accuracy']:.4f}",
                      f"{h['val_loss']:.4f}", f"{h['val_accuracy']:.4f}", f"{h['seconds']:.1f}")
    console.print(table)
    if result.status == "diverged":
        console.print(f"diverged: non-finite loss in epoch {result.diverged_epoch}", highlight=False)
    if result.test:
        t = result.test
        console.print(f"test (best validation epoch {result.best_epoch}): accuracy {t['accuracy']:.4f}  precision "
                      f"{t['precision']:.4f}  recall {t['recall']:.4f}  F1 {t['f1']:.4f}  loss {t['loss']:.4f}",
                      highlight=False)
    console.print(f"run {result.run_id}: {result.status}; saved under {out / result.run_id}", highlight=False)
