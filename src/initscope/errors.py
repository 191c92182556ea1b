"""Errors initscope raises: each names what was wrong and what to do about it."""

from __future__ import annotations


class InitscopeError(Exception):
    """Base class of initscope's errors."""


class TraceError(InitscopeError):
    """torch.fx could not trace the model."""


class UnknownOpError(InitscopeError):
    """An op in the traced graph has no rule."""


class PlanMismatchError(InitscopeError, ValueError):
    """A plan was applied to a model it was not made for."""


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
