"""Checks before a sweep trains anything: its folders can be written and their disk has room.

A sweep that finds out at the end of its first run that it cannot save the checkpoint has wasted the
run; one that fills the disk half-way through a checkpoint leaves a truncated temporary file behind.
Both are cheaper to refuse up front, with the path and the reason.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from initscope.errors import PreflightError

# What a sweep needs free at the least: a few checkpoints and resume states of the papers' models
# (ResNet-50 with Adam state is ~400 MB), and the database's growth.
MIN_FREE_MB = 512.0


def check_output(out: str | Path, db: str | Path | None = None, *, min_free_mb: float = MIN_FREE_MB) -> None:
    """Refuse, before training, an output folder or database folder that cannot be created or written,
    an existing database file that is read-only, or a disk with less than ``min_free_mb`` MiB free
    (``db=None``: the output folder only, for a single ``initscope train``).

    Creates the folders (as the sweep would); writes and removes one small probe file in each.

    Raises:
        PreflightError: naming the path, what is wrong, and what to do.
    """
    out = Path(out)
    folders = [("output folder", out)]
    if db is not None:
        db = Path(db)
        folders.append(("database folder", db.parent))
    for what, folder in folders:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise PreflightError(f"{what} {folder} cannot be created ({exc.strerror or exc}); "
                                 "pick another with --out / --db") from None
        try:
            fd, probe = tempfile.mkstemp(prefix=".initscope-write-check.", dir=folder)
            try:
                os.write(fd, b"initscope")
            finally:
                os.close(fd)
                os.unlink(probe)
        except OSError as exc:
            raise PreflightError(f"{what} {folder} is not writable ({exc.strerror or exc}); "
                                 "fix its permissions or pick another with --out / --db") from None
        free_mb = shutil.disk_usage(folder).free / 2**20
        if free_mb < min_free_mb:
            raise PreflightError(f"{what} {folder}: only {free_mb:.0f} MiB free on its disk, a sweep needs at least "
                                 f"{min_free_mb:.0f} MiB (checkpoints, resume states, the database); free some "
                                 "space or pick another disk with --out / --db")
    if db is not None and db.exists() and not os.access(db, os.W_OK):
        raise PreflightError(f"database {db} is read-only; make it writable or pick another with --db")
