"""Sliding-window geometry, one spatial axis at a time.

Convolution and pooling windows are rectangles, so everything initscope needs about them factorizes
over axes: the number of (input, output) pairs a conv joins (the ε of ASV), the per-position fan-in
and fan-out maps, and the window-membership matrices of pooling. An :class:`Axis` describes one
axis; a d-dimensional op is a tuple of them.

Nothing here loops over output positions: counts are closed forms per kernel tap, and matrices are
built by index arithmetic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property, lru_cache

import torch
from torch import Tensor

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
DTYPE = torch.float64


def conv_out_length(length: int, kernel: int, stride: int, dilation: int, pad_lo: int, pad_hi: int) -> int:
    """Output length of a convolution along one axis (``torch.nn.Conv*d`` semantics)."""
    return (length + pad_lo + pad_hi - dilation * (kernel - 1) - 1) // stride + 1


def pool_out_length(length: int, kernel: int, stride: int, padding: int, dilation: int, ceil_mode: bool) -> int:
    """Output length of max/avg pooling along one axis (``torch.nn.MaxPool*d`` semantics)."""
    span = length + 2 * padding - dilation * (kernel - 1) - 1
    out = (-(-span // stride) if ceil_mode else span // stride) + 1
    # In ceil mode the last window must start inside the input or its left padding.
    if ceil_mode and (out - 1) * stride >= length + padding:
        out -= 1
    return out


@dataclass(frozen=True)
class Axis:
    """One axis of a convolution: which input index each kernel tap of each output reads.

    Args:
        length: input length ``L``.
        kernel: kernel size ``K``.
        stride, dilation: as in ``torch.nn.Conv*d``.
        pad_lo, pad_hi: padding before and after (they differ for ``padding="same"`` with even kernels).
        mode: padding mode; taps on ``zeros`` padding read nothing, the other modes read a real input.
    """

    length: int
    kernel: int
    stride: int = 1
    dilation: int = 1
    pad_lo: int = 0
    pad_hi: int = 0
    mode: str = "zeros"

    def __post_init__(self) -> None:
        if self.mode not in PADDING_MODES:
            raise ValueError(f"padding mode {self.mode!r} is not supported; valid modes: {PADDING_MODES}")
        if self.out < 1:
            raise ValueError(
                f"kernel {self.kernel} (dilation {self.dilation}) does not fit an input of length {self.length} "
                f"with padding ({self.pad_lo}, {self.pad_hi})"
            )

    @cached_property
    def out(self) -> int:
        return conv_out_length(self.length, self.kernel, self.stride, self.dilation, self.pad_lo, self.pad_hi)

    @cached_property
    def identity(self) -> bool:
        """Each output reads exactly its own input position (a 1-wide kernel, stride 1, no padding)."""
        return self.kernel == 1 and self.stride == 1 and self.pad_lo == 0 and self.pad_hi == 0

    @staticmethod
    @lru_cache(maxsize=4096)
    def of(length: int, kernel: int, stride: int = 1, dilation: int = 1, pad_lo: int = 0, pad_hi: int = 0,
           mode: str = "zeros") -> "Axis":
        """The Axis with these parameters, one object per process: its tap tables are built once.

        Networks repeat a few geometries many times (ResNet-50's 53 convs use 11 axes), and every
        plan traces the model anew; sharing the Axis shares its cached selection and count matrices.
        """
        return Axis(length, kernel, stride, dilation, pad_lo, pad_hi, mode)

    def tap_count(self) -> int:
        """Number of (output, tap) pairs that read a real input: the per-axis factor of ε.

        For zero padding, tap ``k`` of output ``o`` reads ``o*s - p + k*d``, which is inside the input
        for ``o`` in ``[ceil((p - k d)/s), floor((L - 1 + p - k d)/s)]``; the count is a closed form per tap.
        The other padding modes read a real (reflected, replicated, wrapped) input at every tap.
        """
        return self._tap_count

    @cached_property
    def _tap_count(self) -> int:
        # Computed once per Axis (axes are shared, see Axis.of).
        if self.mode != "zeros":
            return self.out * self.kernel
        k = torch.arange(self.kernel, dtype=torch.int64)
        lo = torch.div(self.pad_lo - k * self.dilation + self.stride - 1, self.stride, rounding_mode="floor")
        hi = torch.div(self.length - 1 + self.pad_lo - k * self.dilation, self.stride, rounding_mode="floor")
        n = hi.clamp(max=self.out - 1) - lo.clamp(min=0) + 1
        return int(n.clamp(min=0).sum())

    @cached_property
    def taps(self) -> Tensor:
        """``(K, O)`` int64: the input index read by tap k of output o, or -1 where it reads zero padding."""
        o = torch.arange(self.out).unsqueeze(0)
        k = torch.arange(self.kernel).unsqueeze(1)
        idx = o * self.stride - self.pad_lo + k * self.dilation
        n = self.length
        if self.mode == "zeros":
            return torch.where((idx >= 0) & (idx < n), idx, torch.full_like(idx, -1))
        if self.mode == "replicate":
            return idx.clamp(0, n - 1)
        if self.mode == "circular":
            return idx.remainder(n)
        # reflect (without repeating the edge), as torch.nn.functional.pad
        period = 2 * (n - 1) if n > 1 else 1
        r = idx.remainder(period)
        return torch.where(r < n, r, period - r)

    @cached_property
    def selection(self) -> Tensor:
        """``(K, O, L)`` float64: ``S[k, o, i] = 1`` where tap k of output o reads input i."""
        taps = self.taps
        s = torch.zeros(self.kernel, self.out, self.length + 1, dtype=DTYPE)
        s.scatter_(2, torch.where(taps < 0, self.length, taps).unsqueeze(2), 1.0)
        return s[:, :, : self.length]

    @cached_property
    def reads(self) -> Tensor:
        """``(K, L)`` float64: how many outputs read input i through tap k."""
        return self.selection.sum(1)

    @cached_property
    def counts(self) -> Tensor:
        """``(O, L)`` float64: how many taps join output o to input i (the ones-kernel conv, as a matrix)."""
        return self.selection.sum(0)


@dataclass(frozen=True)
class Windows:
    """One axis of a pooling op: the input positions in each window, and each window's divisor.

    ``member[o, i]`` is 1 where input i lies in window o; ``divisor[o]`` is what an average pool
    divides by (PyTorch's ``count_include_pad`` and ``divisor_override`` rules).
    """

    member: Tensor
    divisor: Tensor

    @property
    def out(self) -> int:
        return self.member.shape[0]

    @property
    def length(self) -> int:
        return self.member.shape[1]

    @property
    def size(self) -> Tensor:
        """``(O,)`` number of real inputs in each window."""
        return self.member.sum(1)

    @property
    def weights(self) -> Tensor:
        """``(O, L)`` averaging weights: ``member / divisor``."""
        return self.member / self.divisor.unsqueeze(1)

    @staticmethod
    def sliding(
        length: int,
        kernel: int,
        stride: int,
        padding: int = 0,
        dilation: int = 1,
        ceil_mode: bool = False,
        count_include_pad: bool = True,
    ) -> "Windows":
        if padding > kernel // 2:
            raise ValueError(f"pooling padding {padding} must be at most half the kernel size {kernel}")
        out = pool_out_length(length, kernel, stride, padding, dilation, ceil_mode)
        if out < 1:
            raise ValueError(f"pooling window {kernel} does not fit an input of length {length}")
        start = torch.arange(out) * stride - padding
        idx = start.unsqueeze(1) + torch.arange(kernel).unsqueeze(0) * dilation
        valid = (idx >= 0) & (idx < length)
        member = torch.zeros(out, length + 1, dtype=DTYPE)
        member.scatter_(1, torch.where(valid, idx, length), 1.0)
        member = member[:, :length]
        # Average pooling's divisor: the window clipped to the padded input, or to the input alone.
        end = torch.minimum(start + kernel, torch.tensor(length + padding))
        padded = (end - start).to(DTYPE)
        real = (end.clamp(max=length) - start.clamp(min=0)).to(DTYPE)
        return Windows(member, padded if count_include_pad else real)

    @staticmethod
    def adaptive(length: int, out: int) -> "Windows":
        o = torch.arange(out)
        start = torch.div(o * length, out, rounding_mode="floor")
        end = torch.div((o + 1) * length + out - 1, out, rounding_mode="floor")
        i = torch.arange(length)
        member = ((i.unsqueeze(0) >= start.unsqueeze(1)) & (i.unsqueeze(0) < end.unsqueeze(1))).to(DTYPE)
        return Windows(member, (end - start).to(DTYPE))

    def override(self, divisor: float) -> "Windows":
        return Windows(self.member, torch.full_like(self.divisor, float(divisor)))


def prod(values) -> int:
    return int(math.prod(values))
