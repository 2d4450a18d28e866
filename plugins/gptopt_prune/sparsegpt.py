"""SparseGPT (Frantar & Alistarh, 2023, arXiv 2301.00774): prune (and optionally quantize) one weight matrix with
second-order weight updates, blocked as in the reference code (IST-DASLab/sparsegpt ``sparsegpt.py``).

Per lazy block of columns the unstructured mask drops the weights with the smallest ``w^2 / U_jj^2`` (``U`` the
upper Cholesky factor of the damped inverse Hessian: adaptive mask selection); N:M picks the ``M - N`` smallest
of every ``M`` columns when their first column is reached. Every column's error is spread over the columns not
yet processed (OBS update), so the kept weights compensate for the pruned ones. With ``bits`` the kept weights
are also rounded to an integer grid (joint sparsification and quantization, as in the paper): group scales are
fitted when a group's first column is reached, on the group's kept weights as updated so far; pruned weights are
the grid's exact zero. ``tests/test_sparsegpt.py`` checks equality with a textbook column-by-column version.

Unlike the reference, the unstructured mask drops exactly ``round(sparsity * rows * columns)`` weights of each
lazy block (the reference's ``<=`` threshold drops one more plus ties).
"""
from __future__ import annotations

import math
from typing import Optional

from gptopt_core import fake_quantize, fit_group, grid_from_groups, inverse_hessian_cholesky


def drop_lowest(score, k: int):
    """Bool mask (True = drop) of exactly the ``k`` lowest entries of ``score`` (any shape)."""
    import torch

    flat = score.flatten()
    drop = torch.zeros(flat.numel(), dtype=torch.bool, device=score.device)
    if k > 0:
        drop[flat.topk(k, largest=False).indices] = True
    return drop.reshape(score.shape)


def lazy_block_size(columns: int, m: Optional[int], group_size: Optional[int], block_size: int = 128) -> int:
    """Columns per lazy batch: a multiple of M and of the quantization group, about ``block_size``."""
    unit = 1
    for u in (m, group_size):
        if u:
            unit = math.lcm(unit, u)
    return min(columns, unit * max(1, block_size // unit))


def _start(W, H, nm, bits, group_size, symmetric):
    """Copies of ``W`` and ``H`` with dead inputs (zero Hessian diagonal) zeroed, the group width, and one
    ``(scale, zero)`` slot per group (per channel: fitted now, on the weights before pruning, as the reference)."""
    import torch

    W = W.clone()
    H = H.to(W.dtype).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    columns = W.shape[1]
    if nm is not None and columns % nm[1]:
        raise ValueError(f"the input width {columns} is not a multiple of M={nm[1]}")
    gs = group_size or columns
    if bits and columns % gs:
        raise ValueError(f"group size {group_size} does not divide the input width {columns}")
    n_groups = columns // gs
    scales, zeros = [None] * n_groups, [None] * n_groups
    if bits and group_size is None:
        scales[0], zeros[0] = fit_group(W, bits, symmetric)
    return W, H, gs, scales, zeros


def sparsegpt_prune(W, H, sparsity: Optional[float] = None, nm: Optional[tuple[int, int]] = None,
                    bits: Optional[int] = None, group_size: Optional[int] = None, symmetric: bool = True,
                    dampening: float = 0.01, block_size: int = 128):
    """Prune ``W`` ``(out, in)`` given the layer's input Hessian ``H = 2/n·X^T X``.

    :param sparsity: fraction of weights to zero (unstructured), or ``None`` with ``nm``.
    :param nm: ``(N, M)``: keep ``N`` of every ``M`` consecutive input weights.
    :param bits: also quantize the kept weights to ``bits`` (per ``group_size`` columns, or per channel).
    :returns: ``(W_new, keep, grid, info)``: the new weights, the bool mask (True = kept), the
        :class:`~gptopt_core.grids.WeightGrid` (``None`` without ``bits``), ``{"loss", "dampening"}``.
    """
    import torch

    W, H, gs, scales, zeros = _start(W, H, nm, bits, group_size, symmetric)
    rows, columns = W.shape
    dynamic = bool(bits) and group_size is not None
    U, damp = inverse_hessian_cholesky(H, dampening)
    pruned = torch.zeros(W.shape, dtype=torch.bool, device=W.device)
    loss = torch.zeros((), dtype=W.dtype, device=W.device)
    B = lazy_block_size(columns, nm[1] if nm else None, group_size if bits else None, block_size)
    for i1 in range(0, columns, B):
        i2 = min(i1 + B, columns)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        d1 = torch.diag(U1)
        if nm is None:
            pruned1 = drop_lowest(W1 ** 2 / (d1 ** 2)[None, :], round(sparsity * rows * count))
        else:
            pruned1 = torch.zeros(W1.shape, dtype=torch.bool, device=W.device)
        for i in range(count):
            col = i1 + i
            if nm is not None and i % nm[1] == 0:
                n, m = nm
                score = W1[:, i:i + m] ** 2 / (d1[i:i + m] ** 2)[None, :]
                pruned1.scatter_(1, i + score.topk(m - n, dim=1, largest=False).indices, True)
            if dynamic and col % gs == 0:
                g = col // gs
                kept = W1[:, i:i + gs].masked_fill(pruned1[:, i:i + gs], 0)
                scales[g], zeros[g] = fit_group(kept, bits, symmetric)
            w = W1[:, i]
            d = U1[i, i]
            q = w.masked_fill(pruned1[:, i], 0)
            if bits:
                q = fake_quantize(q, scales[col // gs], zeros[col // gs], bits, symmetric)
            Q1[:, i] = q
            err = (w - q) / d
            W1[:, i:].addr_(err, U1[i, i:], alpha=-1)
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        pruned[:, i1:i2] = pruned1
        loss += (Err1 * Err1).sum() / 2
        if i2 < columns:
            W[:, i2:].addmm_(Err1, U[i1:i2, i2:], alpha=-1)
    grid = grid_from_groups(bits, group_size, symmetric, scales, zeros) if bits else None
    return W, ~pruned, grid, {"loss": float(loss), "dampening": damp}
