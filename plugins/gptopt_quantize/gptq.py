"""GPTQ (Frantar et al., 2022, arXiv 2210.17323) for one weight matrix, blocked as in the reference code
(IST-DASLab/gptq ``gptq.py``: Cholesky form of the inverse Hessian, lazy batch updates of 128 columns).

Differences from the reference, each chosen so that the result is the textbook column-by-column algorithm
(``tests/test_gptq.py`` checks equality with one) and lands on a :class:`gptopt_core.grids.WeightGrid`:

* groups are contiguous input columns; without act-order a group's scale is fitted when its first column is
  reached, on the weights *as updated so far* (the reference fits on a copy that lacks the updates from earlier
  columns of the same 128-column block); the lazy block size is a multiple of the group size so a group never
  straddles two blocks;
* with act-order the scales are fitted on the weights before any update ("static groups" in the reference), so
  the groups stay contiguous in the stored order and need no index table;
* scales are fp16-exact (``gptopt_core.grids.fit_group``), as every storage format keeps them;
* with a pruning ``mask`` the pruned weights are quantized to zero (zero is on every grid: ``lo <= 0 <= hi``) and
  their error is compensated like any other column's, as SparseGPT does with a fixed mask (the reference
  ``sparsegpt.py`` with ``wbits``): the remaining weights are updated in full, pruned ones included, and those are
  set back to zero when their column is reached. Dynamic group scales are fitted on the kept weights only.
"""
from __future__ import annotations

from typing import Optional

from gptopt_core import fake_quantize, fit_group, get_observer, grid_from_groups, inverse_hessian_cholesky


def prepare(W, H):
    """Copies of ``W`` (out, in) and ``H`` (in, in) with dead inputs (``H_jj == 0``) handled as in the reference:
    their weights are zeroed and their diagonal set to 1."""
    import torch

    W = W.clone()
    H = H.to(W.dtype).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    return W, H


def lazy_block_size(columns: int, group_size: Optional[int], act_order: bool, block_size: int = 128) -> int:
    """Columns per lazy batch: ``block_size``, or a multiple of the group size when groups are fitted on the fly."""
    if group_size is None or act_order:
        return min(block_size, columns)
    return group_size * max(1, block_size // group_size)


def hessian_weighting(H, observer: str, gs: int):
    """``(observer, importance)``: an observer registered with ``importance=True`` (``hmse``: the mse search) gets
    each column's error weighted by ``H``'s diagonal (``importance(c)`` gives the group starting at column ``c``);
    the others get none."""
    import torch

    if not get_observer(observer).importance:
        return observer, lambda c: None
    hdiag = torch.diag(H).clone()
    return observer, lambda c: hdiag[c:c + gs]


def static_scales(W, gs: int, bits: int, symmetric: bool, observer: str, fit: bool,
                  importance=lambda c: None) -> tuple[list, list]:
    """One ``(scale, zero)`` slot per group; filled now when ``fit`` (act-order or per-channel: scales fitted before
    any update), else left ``None`` for the loop to fit as it reaches each group."""
    n_groups = W.shape[1] // gs
    scales, zeros = [None] * n_groups, [None] * n_groups
    if fit:
        for g in range(n_groups):
            scales[g], zeros[g] = fit_group(W[:, g * gs:(g + 1) * gs], bits, symmetric, observer, importance(g * gs))
    return scales, zeros


def column_order(W, H, M, gs: int, act_order: bool):
    """``(W, H, M, perm, group_of)``: with act-order the columns by decreasing Hessian diagonal (``perm``), else as
    they are (``perm`` ``None``); ``group_of[c]`` is the group of the column now at ``c``."""
    import torch

    if not act_order:
        return W, H, M, None, [c // gs for c in range(W.shape[1])]
    perm = torch.argsort(torch.diag(H), descending=True)
    return W[:, perm], H[perm][:, perm], None if M is None else M[:, perm], perm, (perm // gs).tolist()


def gptq_quantize(W, H, bits: int, group_size: Optional[int] = None, symmetric: bool = True,
                  act_order: bool = False, dampening: float = 0.01, block_size: int = 128, observer: str = "minmax",
                  mask=None):
    """Quantize ``W`` ``(out, in)`` given the layer's input Hessian ``H = 2/n·X^T X`` ``(in, in)``.

    ``observer``: a registered :class:`gptopt_core.Observer` (``"minmax"``, ``"mse"``; ``"hmse"`` or any with
    ``importance=True`` gets ``H``'s diagonal, the columns' mean squared activation, to weight each column's error).
    ``mask``: bool ``(out, in)``, ``False`` where a weight is pruned: those come out exactly zero (see above).
    Computes in ``W``'s dtype (float32 for models; the tests use float64).
    :returns: ``(Q, grid, info)``: ``Q`` the de-quantized weights (on ``grid`` exactly), the
        :class:`~gptopt_core.grids.WeightGrid`, and ``{"loss": sum of (w - q)^2 / [H^-1]_jj / 2, "dampening"}``.
    """
    import torch

    W, H = prepare(W, H)
    M = None if mask is None else mask.to(device=W.device, dtype=W.dtype)
    if M is not None:
        W = W * M
    rows, columns = W.shape
    gs = group_size or columns
    if columns % gs:
        raise ValueError(f"group size {group_size} does not divide the input width {columns}")
    observer, imp = hessian_weighting(H, observer, gs)
    scales, zeros = static_scales(W, gs, bits, symmetric, observer, act_order or group_size is None, imp)
    W, H, M, perm, group_of = column_order(W, H, M, gs, act_order)
    U, damp = inverse_hessian_cholesky(H, dampening)
    Q = torch.zeros_like(W)
    loss = torch.zeros((), dtype=W.dtype, device=W.device)
    B = lazy_block_size(columns, group_size, act_order, block_size)
    dynamic = group_size is not None and not act_order
    for i1 in range(0, columns, B):
        i2 = min(i1 + B, columns)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            g = group_of[col]
            if dynamic and col % gs == 0:
                group = W1[:, i:i + gs]
                scales[g], zeros[g] = fit_group(group if M is None else group * M[:, col:col + gs], bits,
                                                symmetric, observer, imp(col))
            w = W1[:, i]
            d = U1[i, i]
            q = fake_quantize(w, scales[g], zeros[g], bits, symmetric)
            if M is not None:
                q = q * M[:, col]
            Q1[:, i] = q
            err = (w - q) / d
            W1[:, i:].addr_(err, U1[i, i:], alpha=-1)
            Err1[:, i] = err
        Q[:, i1:i2] = Q1
        loss += (Err1 * Err1).sum() / 2
        if i2 < columns:
            W[:, i2:].addmm_(Err1, U[i1:i2, i2:], alpha=-1)
    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    grid = grid_from_groups(bits, group_size, symmetric, scales, zeros)
    return Q, grid, {"loss": float(loss), "dampening": damp}
