"""Files that survive a kill, a power loss, a full disk and a second writer: every file initscope writes
for a user to keep goes through here.

- :func:`atomic_write`: the bytes go to a temporary file in the same folder, are flushed to the disk
  (``fsync``), and only then renamed over the target, and the folder is flushed so that the rename itself
  is on the disk. A reader, or the next process after a crash or a power loss, finds the old file or the
  new one, never an empty or half-written one: without the first ``fsync`` a file system may commit the
  rename before the data (ext4's delayed allocation does), which leaves exactly the empty file a resume
  then cannot read.
- :func:`disk_error`: an ``OSError`` raised while writing, as the error a user can act on: a full disk
  or quota (``ENOSPC``, ``EDQUOT``) is a :class:`~initscope.errors.DiskFullError` naming the file; a
  read-only file system or a folder that is a file says which path.
- :class:`FolderLock`: an exclusive lock on a folder for one writer at a time (``flock`` on a lock file
  inside it): refused at once, with who holds it, or waited for.
- :class:`BackgroundWriter`: such writes on a thread of their own, while the caller goes on (the training
  loop's checkpoints), with what must wait for the file run on the caller's thread once it is there.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from initscope.errors import DiskFullError, OutputError

# A full disk and an exhausted quota are the same to the user: free space, or write elsewhere.
_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def disk_error(exc: OSError, path: str | Path, what: str = "writing") -> OSError:
    """``exc`` (raised while ``what`` ``path``) as an error that names the file and says what to do.

    A full disk becomes :class:`DiskFullError`; a read-only file system, a denied permission or a path
    through a file become :class:`OutputError`; anything else is returned unchanged.
    """
    reason = exc.strerror or str(exc)
    if exc.errno in _FULL:
        return DiskFullError(f"{what} {path}: {reason} (the disk or quota is full); free some space and run "
                             "the same command again, it resumes where it stopped")
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return OutputError(f"{what} {path}: {reason}; write to a folder you can write to")
    if exc.errno in (errno.ENOTDIR, errno.EEXIST, errno.EISDIR):
        return OutputError(f"{what} {path}: {reason} (a file where a folder is needed, or the reverse); "
                           "pick another path")
    return exc


def fsync_dir(folder: str | Path) -> None:
    """Flush a folder's entries (a rename or a new file in it) to the disk; a no-op where folders cannot
    be opened (Windows), where the rename is durable by other means."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems (network, FUSE) refuse fsync on a folder: nothing more to do
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, data: bytes | Callable[[], bytes]) -> Path:
    """Write ``data`` (bytes, or a function that makes them) to ``path`` atomically and durably.

    Raises:
        DiskFullError, OutputError: see :func:`disk_error`; the target is then as it was before and no
            temporary file is left behind.
    """
    path = Path(path)
    payload = data() if callable(data) else data  # made first: a failure here leaves nothing behind
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise disk_error(exc, path) from exc
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())  # the bytes on the disk before the name points at them
        os.replace(tmp, path)
        fsync_dir(path.parent)  # and the rename on the disk too
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise disk_error(exc, path) from exc
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """:func:`atomic_write` of UTF-8 text."""
    return atomic_write(path, text.encode("utf-8"))


class FolderLock:
    """One writer at a time in ``folder``: an exclusive, non-blocking ``flock`` on ``folder/.initscope.lock``.

    The lock belongs to the open file, so the operating system drops it when the holder exits or is
    killed: a stale lock never blocks anyone. Where ``fcntl`` does not exist (Windows) the lock is a
    no-op.

    Args:
        folder: the folder to lock (created if missing).
        what: what the holder is doing, for the refusal (``"initscope compare"``).
        wait: wait for the holder to finish instead of refusing (for a lock held a few seconds).

    Raises:
        OutputError: on entering, when another process holds the lock and ``wait`` is False (its pid is named).
    """

    NAME = ".initscope.lock"

    def __init__(self, folder: str | Path, what: str, *, wait: bool = False) -> None:
        self.folder, self.what, self.wait = Path(folder), what, wait
        self._fd: int | None = None

    def __enter__(self) -> "FolderLock":
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            return self
        path = self.folder / self.NAME
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise disk_error(exc, path) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if self.wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "another process"
            os.close(fd)
            raise OutputError(f"{self.folder} is being written by {holder} ({self.what}); wait for it to "
                              "finish, or write to another folder") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the lock; the file stays, empty of meaning
            self._fd = None


class BackgroundWriter:
    """Writes on one background thread, one write at a time, and runs each write's follow-up on the caller's
    thread once that write is on the disk.

    The training loop hands it an epoch's checkpoint (its tensors copied already) and trains the next epoch
    while the file is written: a durable write of a few megabytes costs tens of milliseconds, a tenth of a
    short epoch. What must only happen once the file is there (storing the epoch's row, which a resumed run
    takes as done) is the write's ``then``, run by :meth:`poll` or :meth:`wait` on the caller's thread,
    never by the writer's. A write's error (a full disk) is raised there too, by the next call.

    Use as a context manager: leaving waits for the write in flight (so no thread outlives the run), and
    drops its follow-up when an error is already on its way out.
    """

    def __init__(self, name: str = "initscope-writer") -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._pending: tuple[Future, Callable[[], None] | None] | None = None

    def submit(self, write: Callable[[], object], then: Callable[[], None] | None = None) -> None:
        """Start ``write`` once the write before it is done (and its follow-up run; its error raised here)."""
        self.wait()
        self._pending = (self._pool.submit(write), then)

    def poll(self) -> None:
        """Run the follow-up of a write that has finished (or raise its error); never blocks."""
        if self._pending is not None and self._pending[0].done():
            self.wait()

    def wait(self) -> None:
        """Block until the write in flight is on the disk, then run its follow-up; raises the write's error."""
        if self._pending is None:
            return
        future, then = self._pending
        self._pending = None  # taken first: a follow-up that raises is not run twice
        future.result()
        if then is not None:
            then()

    def __enter__(self) -> "BackgroundWriter":
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        try:
            if exc_type is None:
                self.wait()
            elif self._pending is not None:  # the run is failing already: let the write end, drop the rest
                self._pending[0].exception()
                self._pending = None
        finally:
            self._pool.shutdown(wait=True)
