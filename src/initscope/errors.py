"""Every error initscope raises: each names what was wrong and what to do about it.

All of them are :class:`InitscopeError`, so ``except initscope.InitscopeError`` catches anything the
library refuses; each also derives from the built-in type a caller would expect (a bad value is a
``ValueError``, an unwritable folder an ``OSError``).
"""

from __future__ import annotations


class InitscopeError(Exception):
    """Base class of initscope's errors."""


class TraceError(InitscopeError):
    """torch.fx could not trace the model."""


class UnknownOpError(InitscopeError):
    """An op in the traced graph has no rule."""


class PlanMismatchError(InitscopeError, ValueError):
    """A plan was applied to a model it was not made for."""


class ProbeError(InitscopeError, RuntimeError):
    """The model (or the loss) raised during a probe; the message says where, and the model is as it was."""


class ConfigError(InitscopeError, ValueError):
    """A run or sweep configuration that cannot run: the message names the key or value and lists the valid ones."""


# The name sweeps have always raised; a sweep's configuration error is a configuration error.
SweepConfigError = ConfigError


class PreflightError(InitscopeError, OSError):
    """An output folder or database cannot be written, or its disk is (nearly) full."""


class OutputError(InitscopeError, OSError):
    """A file or folder initscope was asked to write cannot be: read-only, a file where a folder is needed,
    or held by another writer. The message names the path."""


class DiskFullError(OutputError):
    """The disk (or the quota) filled up while writing; the message names the file. A sweep stops and gives
    its run back, so the same command resumes it once there is space."""


class StoreError(InitscopeError, OSError):
    """A results database that cannot be used: not an SQLite file, damaged, not an initscope store, or a
    folder. The message names the file; the file is left as it was."""


def node_location(node) -> str:
    """The user's source line that created an fx node, when fx recorded it."""
    trace = getattr(node, "stack_trace", None) or ""
    lines = [ln.strip() for ln in trace.strip().splitlines() if ln.strip()]
    # fx appends its own frames last; the user's frame is the last one outside torch.fx.
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("File ") and "torch/fx" not in lines[i] and "initscope" not in lines[i]:
            code = lines[i + 1] if i + 1 < len(lines) and not lines[i + 1].startswith("File ") else ""
            return f"{lines[i]}: {code}".rstrip(": ")
    return ""
