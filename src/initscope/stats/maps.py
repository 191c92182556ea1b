"""Linear algebra on per-position maps and on spatial covariances, one axis at a time.

A ones-kernel convolution of a second-moment map is, per axis, a matrix of tap counts; pooling is,
per axis, a matrix of window weights. Windows are rectangles, so a d-dimensional op is the product
of its per-axis matrices, applied axis after axis.

For covariances a convolution is different: output positions p and q read input ``p + t`` and
``q + t`` through the *same* weight ``w_t``, so ``E[u_p u_q] = σ² Σ_t K(p + t, q + t)`` — one sum over
taps, not two. That sum still factorizes over axes (:func:`tied_taps`).
"""

from __future__ import annotations

import torch
from torch import Tensor


def apply_axes(x: Tensor, mats: list[Tensor]) -> Tensor:
    """Contract the last ``len(mats)`` dims of ``x`` with ``(out, in)`` matrices, one per axis."""
    d = len(mats)
    for i, m in enumerate(mats):
        # The last two dims as matrix products (every 1-d and 2-d map): a third of tensordot's cost.
        if i == d - 1:
            x = x @ m.mT
        elif i == d - 2:
            x = m @ x
        else:
            dim = x.ndim - d + i
            x = torch.movedim(torch.tensordot(x, m, dims=([dim], [1])), -1, dim)
    return x


def apply_axes_t(x: Tensor, mats: list[Tensor]) -> Tensor:
    """The transpose of :func:`apply_axes`: contract with each ``(out, in)`` matrix's transpose."""
    return apply_axes(x, [m.transpose(0, 1) for m in mats])


def _pair(k: Tensor, d: int, axis: int, left: Tensor, right: Tensor) -> Tensor:
    """Apply ``left`` to spatial axis ``axis`` and ``right`` to its partner ``d + axis`` of a covariance."""
    k = torch.movedim(torch.tensordot(k, left, dims=([axis], [1])), -1, axis)
    return torch.movedim(torch.tensordot(k, right, dims=([d + axis], [1])), -1, d + axis)


def sandwich(k: Tensor, mats: list[Tensor]) -> Tensor:
    """``P K Pᵀ`` for ``P`` the product of per-axis matrices: the covariance after a linear map."""
    d = len(mats)
    for i, m in enumerate(mats):
        k = _pair(k, d, i, m, m)
    return k


def sandwich_t(k: Tensor, mats: list[Tensor]) -> Tensor:
    """``Pᵀ K P``: covariance of a gradient sent back through the linear map ``P``."""
    return sandwich(k, [m.transpose(0, 1) for m in mats])


def tied_taps(k: Tensor, taps: list[Tensor]) -> Tensor:
    """``Σ_t S_t K S_tᵀ`` with ``S_t`` the tap selections: the covariance after a ones-kernel conv.

    ``taps[i]`` is axis i's ``(K_i, O_i)`` index of the input position each tap of each output reads,
    -1 on zero padding (:attr:`initscope.geometry.Axis.taps`). A tap picks one input per output, so
    ``(S_t K S_tᵀ)[o, o'] = K[idx_t(o), idx_t(o')]``: a gather per axis, with a zero row and column
    standing in for the padding.
    """
    d = len(taps)
    for i, t in enumerate(taps):
        k = torch.movedim(k, (i, d + i), (0, 1))
        n = k.shape[0]
        padded = k.new_zeros((n + 1, n + 1, *k.shape[2:]))
        padded[:n, :n] = k
        idx = torch.where(t < 0, n, t)
        k = torch.movedim(padded[idx[:, :, None], idx[:, None, :]].sum(0), (0, 1), (i, d + i))
    return k


def tied_taps_t(g: Tensor, taps: list[Tensor], lengths: list[int]) -> Tensor:
    """``Σ_t S_tᵀ G S_t``: the gradient covariance sent back through a ones-kernel conv.

    The transpose of :func:`tied_taps`: every ``G[o, o']`` is added at ``(idx_t(o), idx_t(o'))``
    (reads of the padding fall into a dropped extra row and column). ``lengths`` are the input sizes.
    """
    d = len(taps)
    for i, (t, n) in enumerate(zip(taps, lengths)):
        g = torch.movedim(g, (i, d + i), (0, 1))
        kk, o = t.shape
        idx = torch.where(t < 0, n, t)
        rows = idx[:, :, None].expand(kk, o, o)
        cols = idx[:, None, :].expand(kk, o, o)
        out = g.new_zeros((n + 1, n + 1, *g.shape[2:]))
        out.index_put_((rows, cols), g.unsqueeze(0).expand(kk, *g.shape), accumulate=True)
        g = torch.movedim(out[:n, :n], (0, 1), (i, d + i))
    return g


def flat(k: Tensor, positions: int) -> Tensor:
    return k.reshape(positions, positions)


def correlation(k: Tensor, positions: int) -> Tensor:
    """Correlation matrix of a covariance given as ``(*spatial, *spatial)``."""
    m = k.reshape(positions, positions)
    s = m.diagonal().clamp(min=1e-300).sqrt()
    return (m / torch.outer(s, s)).clamp(-1.0, 1.0)


def with_diagonal(k: Tensor, positions: int, diag: Tensor) -> Tensor:
    """A copy of the covariance ``k`` with its diagonal replaced by ``diag`` (any shape of ``positions``)."""
    m = k.reshape(positions, positions).clone()
    m.diagonal().copy_(diag.reshape(positions))
    return m.reshape(k.shape)


def diagonal(k: Tensor, spatial: torch.Size) -> Tensor:
    d = int(spatial.numel())
    return k.reshape(d, d).diagonal().reshape(spatial)
