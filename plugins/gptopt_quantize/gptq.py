"""GPTQ (Frantar et al., 2022, arXiv 2210.17323) for one weight matrix: the core's one OBS solver
(:func:`gptopt_core.obs_solve`: Cholesky form of the inverse Hessian, lazy batch updates of 128 columns, as the
reference code IST-DASLab/gptq ``gptq.py``) with a rule that rounds each column to its group's grid.

Differences from the reference, each chosen so that the result is the textbook column-by-column algorithm
(``tests/test_gptq.py`` checks equality with one) and lands on a :class:`gptopt_core.kit.grids.WeightGrid`:

* groups are contiguous input columns; without act-order a group's scale is fitted when its first column is
  reached, on the weights *as updated so far* (the reference fits on a copy that lacks the updates from earlier
  columns of the same 128-column block); the lazy block size is a multiple of the group size so a group never
  straddles two blocks;
* with act-order the scales are fitted on the weights before any update ("static groups" in the reference), so
  the groups stay contiguous in the stored order and need no index table;
* scales are fp16-exact (``gptopt_core.kit.grids.fit_group``), as every storage format keeps them;
* with a pruning ``mask`` the pruned weights are quantized to zero (zero is on every grid: ``lo <= 0 <= hi``) and
  their error is compensated like any other column's, as SparseGPT does with a fixed mask (the reference
  ``sparsegpt.py`` with ``wbits``): the remaining weights are updated in full, pruned ones included, and those are
  set back to zero when their column is reached. Dynamic group scales are fitted on the kept weights only.
"""
from __future__ import annotations

from gptopt_core.kit.groupsize import GroupSize
from gptopt_core.kit.obs import ColumnRule, GroupScales, lazy_batch, obs_solve, prepare_obs
from gptopt_core.kit.observers import get_observer


def hessian_weighting(H, observer: str, gs: int):
    """``importance(c)`` for :class:`gptopt_core.GroupScales`: an observer registered with ``importance=True``
    (``hmse``: the mse search) gets each column's error weighted by ``H``'s diagonal (the group starting at column
    ``c``); the others get none."""
    import torch

    if not get_observer(observer).importance:
        return None
    hdiag = torch.diag(H).clone()
    return lambda c: hdiag[c:c + gs]


def column_order(W, H, M, act_order: bool):
    """``(W, H, M, perm)``: with act-order the columns by decreasing Hessian diagonal (``perm``), else as they are
    (``perm`` ``None``)."""
    import torch

    if not act_order:
        return W, H, M, None
    perm = torch.argsort(torch.diag(H), descending=True)
    return W[:, perm], H[perm][:, perm], None if M is None else M[:, perm], perm


class GptqRule(ColumnRule):
    """Round each column to its group's grid (``group_of[c]``: the group of the column now at ``c``); with
    ``dynamic`` fit a group's scale at its first column on the weights as updated so far (kept ones only); keep
    the pruned weights of ``M`` at zero."""

    def __init__(self, scales: GroupScales, M, group_of, dynamic: bool):
        self.scales, self.M, self.group_of, self.dynamic = scales, M, group_of, dynamic

    def column(self, W1, i: int, col: int):
        g, gs, M = self.group_of[col], self.scales.gs, self.M
        if self.dynamic and self.scales.starts(col):
            group = W1[:, i:i + gs]
            self.scales.fit(g, group if M is None else group * M[:, col:col + gs])
        q = self.scales.round(W1[:, i], g)
        return q if M is None else q * M[:, col]


def gptq_quantize(W, H, bits: int, group_size=None, symmetric: bool = True,
                  act_order: bool = False, dampening: float = 0.01, block_size: int = 128, observer: str = "minmax",
                  mask=None):
    """Quantize ``W`` ``(out, in)`` given the layer's input Hessian ``H = 2/n·X^T X`` ``(in, in)``.

    ``group_size``: a :class:`gptopt_core.GroupSize` (or an int; ``None``: per channel).
    ``observer``: a registered :class:`gptopt_core.Observer` (``"minmax"``, ``"mse"``; ``"hmse"`` or any with
    ``importance=True`` gets ``H``'s diagonal, the columns' mean squared activation, to weight each column's error).
    ``mask``: bool ``(out, in)``, ``False`` where a weight is pruned: those come out exactly zero (see above).
    Computes in ``W``'s dtype (float32 for models; the tests use float64).
    :returns: ``(Q, grid, info)``: ``Q`` the de-quantized weights (on ``grid`` exactly), the
        :class:`~gptopt_core.kit.grids.WeightGrid`, and ``{"loss": sum of (w - q)^2 / [H^-1]_jj / 2, "dampening"}``.
    """
    import torch

    W, H = prepare_obs(W, H)
    M = None if mask is None else mask.to(device=W.device, dtype=W.dtype)
    if M is not None:
        W = W * M
    columns = W.shape[1]
    groups = GroupSize.of(group_size)
    if not groups.divides(columns):
        raise ValueError(f"group size {groups} does not divide the input width {columns}")
    gs = groups.columns(columns)
    scales = GroupScales(columns, bits, groups, symmetric, observer, hessian_weighting(H, observer, gs))
    dynamic = not groups.per_channel and not act_order
    if not dynamic:  # act-order or per channel: every scale fitted before any update
        scales.fit_all(W)
    W, H, M, perm = column_order(W, H, M, act_order)
    group_of = [c // gs for c in range(columns)] if perm is None else (perm // gs).tolist()
    B = lazy_batch(columns, gs if dynamic else None, block_size=block_size)
    Q, loss, damp = obs_solve(W, H, GptqRule(scales, M, group_of, dynamic), dampening, B)
    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    return Q, scales.grid(), {"loss": loss, "dampening": damp}
