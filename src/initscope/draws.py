"""Drawing the unit-scale weights of a model while its plan is still being computed.

Every distribution initscope draws from is a fixed unit-scale law times the layer's std
(:func:`initscope.sampling.unit_draw_`), so the random part of an initialization does not depend on
the plan. :func:`initscope.init_` therefore draws it in a background thread while the plan is
propagated (torch releases the GIL inside the draw kernels), when the machine has a core to spare
(:data:`MIN_CORES`), and the plan only scales the draws into the weights. The draws come from a copy of the generator's state, taken in the order
:meth:`InitPlan.apply` would take them; the real generator is advanced to the copy's final state
only when the draws are used, so ``init_(model, m, generator=g)`` writes bit for bit what
``plan(model, m).apply(model, generator=g)`` writes, and leaves ``g`` in the same state.
"""

from __future__ import annotations

import os
import threading

import torch
from torch import Tensor, nn

from initscope.methods.classic import default_bias_bound
from initscope.rules.registry import is_weight_module
from initscope.sampling import unit_draw_
from initscope.threads import ThreadHold

# Drawing ahead keeps a second copy of every weight until the plan is written: not for huge models.
MAX_BYTES = 2 << 30
# The thread needs a core of its own. Two are enough once the propagation keeps to one (see
# Prefetch): torch's draw kernels are serial, and the propagation's ops are too small to gain from
# intra-op threads.
MIN_CORES = 2


# Draw buffers are kept for the next init_ of a model with the same weight shapes (another seed,
# another method of a sweep): new memory costs a page fault per 4 KiB on first write, and on a large
# model that, not the plan, is what init_ waited for (docs/theory.md, "Planning speed", has the
# measurements). At most this much is kept; release_buffers() frees it.
POOL_BYTES = 512 << 20
_pool: dict[tuple, list[Tensor]] = {}
_pool_bytes = 0
_pool_lock = threading.Lock()


def _key(t: Tensor, dtype: torch.dtype | None = None) -> tuple:
    return tuple(t.shape), t.stride(), dtype or t.dtype, t.device


def draw_dtype(t: Tensor) -> torch.dtype:
    """The dtype a unit draw for ``t`` is made in: its own for float32 and float64, else float32.

    torch has no QR (the orthogonal draw) in float16 or bfloat16 on the CPU; a float32 draw rounded
    once to the weight's dtype is as good a draw, and every law is drawn the same way.
    """
    return t.dtype if t.dtype in (torch.float32, torch.float64) else torch.float32


def _buffer_like(t: Tensor) -> Tensor:
    """An uninitialized tensor laid out as ``t`` in its draw dtype (so a draw fills it in the order it
    would fill ``t``)."""
    global _pool_bytes
    dtype = draw_dtype(t)
    with _pool_lock:
        kept = _pool.get(_key(t, dtype))
        if kept:
            buf = kept.pop()
            _pool_bytes -= buf.numel() * buf.element_size()
            return buf
    return torch.empty_strided(t.shape, t.stride(), dtype=dtype, device=t.device)


def draw_unit(weight: Tensor, distribution: str, generator: torch.Generator | None) -> Tensor:
    """A unit-scale draw for ``weight`` (:func:`initscope.sampling.unit_draw_`) in a buffer of its own."""
    return unit_draw_(_buffer_like(weight), distribution, generator)


def draw_default_bias(weight: Tensor, bias: Tensor, generator: torch.Generator | None) -> Tensor:
    """What ``reset_parameters`` draws for the bias of a layer with weight ``weight``, in a buffer."""
    bound = default_bias_bound(weight)
    return _buffer_like(bias).uniform_(-bound, bound, generator=generator)


def recycle(tensors: list[Tensor]) -> None:
    """Give draw buffers back to the pool for the next call."""
    _recycle(tensors)


def _recycle(tensors: list[Tensor]) -> None:
    global _pool_bytes
    with _pool_lock:
        for t in tensors:
            size = t.numel() * t.element_size()
            if _pool_bytes + size > POOL_BYTES:
                break
            _pool.setdefault(_key(t), []).append(t)
            _pool_bytes += size


def release_buffers() -> None:
    """Free the draw buffers :func:`initscope.init_` keeps between calls (at most :data:`POOL_BYTES`)."""
    global _pool_bytes
    with _pool_lock:
        _pool.clear()
        _pool_bytes = 0


def spare_core() -> bool:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return cores >= MIN_CORES


def _rng_state(generator: torch.Generator | None) -> torch.Tensor:
    return (generator if generator is not None else torch.default_generator).get_state()


class Prefetch:
    """Unit-scale draws for every Conv/Linear weight of ``model``, in parameter order, made in a thread.

    Only CPU models are drawn ahead (a CUDA generator's stream is per device and cheap to run
    inline); for anything else :meth:`take` returns None and the plan draws as usual.
    """

    def __init__(self, model: nn.Module, distribution: str, default_bias: bool, generator: torch.Generator | None) -> None:
        self.generator = generator
        self.layers: list[tuple[str, Tensor, Tensor | None]] = []
        for name, module in model.named_modules():
            if is_weight_module(module) and isinstance(getattr(module, "weight", None), nn.Parameter):
                bias = module.bias if default_bias and isinstance(getattr(module, "bias", None), nn.Parameter) else None
                self.layers.append((f"{name}.weight" if name else "weight", module.weight, bias))
        lazy = any(isinstance(p, nn.parameter.UninitializedParameter) for p in model.parameters())
        size = 0 if lazy else sum(w.numel() * w.element_size() for _, w, _ in self.layers)
        self.enabled = bool(self.layers) and not lazy and size <= MAX_BYTES and all(w.device.type == "cpu" for _, w, _ in self.layers)
        self.enabled = self.enabled and (generator is None or generator.device.type == "cpu")
        # Elementwise laws only: an orthogonal draw is a QR, whose last bits depend on how many
        # threads LAPACK runs, and the propagation beside it keeps torch to one.
        self.enabled = self.enabled and distribution != "orthogonal"
        self.draws: dict[str, tuple[Tensor, Tensor | None]] = {}
        self.error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._hold: ThreadHold | None = None
        if self.enabled:
            # While drawing, the calling thread (the propagation) runs its ops on one intra-op
            # thread: OpenMP workers it would wake spin on after each op and take the draws' core
            # (docs/theory.md, "Planning speed").
            self._hold = ThreadHold(1)
            self._copy = torch.Generator()
            self._copy.set_state(_rng_state(generator))
            self._thread = threading.Thread(target=self._run, args=(distribution,), daemon=True)
            self._thread.start()

    def _run(self, distribution: str) -> None:
        try:
            with torch.no_grad():
                for path, weight, bias in self.layers:
                    w = draw_unit(weight, distribution, self._copy)
                    b = None if bias is None else draw_default_bias(weight, bias, self._copy)
                    self.draws[path] = (w, b)
        except BaseException as exc:  # reported by take(); the plan then draws inline
            self.error = exc

    def order(self) -> list[tuple[str, bool]]:
        return [(path, bias is not None) for path, _, bias in self.layers]

    def take(self, order: list[tuple[str, bool]]) -> dict[str, tuple[Tensor, Tensor | None]] | None:
        """The draws, if they are exactly the ones applying the plan would make.

        ``order`` lists, in the order the plan writes them, each weight's path and whether a bias
        is drawn right after it.
        """
        if self._thread is None:
            return None
        self._thread.join()
        self._restore_threads()
        if self.error is not None or order != self.order():
            return None
        # Handed over: the caller writes from them and recycles them.
        draws, self.draws = self.draws, {}
        return draws

    def commit(self) -> None:
        """Advance the real generator past the draws that were used."""
        (self.generator if self.generator is not None else torch.default_generator).set_state(self._copy.get_state())

    def discard(self) -> None:
        """Join the thread, give back torch's threads, and keep the buffers for the next call (those the
        plan wrote from it recycles itself)."""
        if self._thread is not None:
            self._thread.join()
        self._restore_threads()
        _recycle([t for pair in self.draws.values() for t in pair if t is not None])
        self.draws = {}

    def _restore_threads(self) -> None:
        if self._hold is not None:
            self._hold.release()
        self._hold = None
