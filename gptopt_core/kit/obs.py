"""The one OBS solver: the column-by-column second-order update GPTQ (Frantar et al., 2022, arXiv 2210.17323) and
SparseGPT (Frantar & Alistarh, 2023, arXiv 2301.00774) share, blocked as in their reference code (IST-DASLab
``gptq.py`` / ``sparsegpt.py``: the upper Cholesky factor ``U`` of the damped inverse Hessian, lazy batches).

:func:`obs_solve` walks the columns of ``W`` ``(out, in)`` in order; for each column a :class:`ColumnRule` says
what the column becomes (rounded to a grid, pruned, both); the column's error ``(w - q) / U_jj`` is spread over the
columns of its lazy batch at once and over the later columns once per batch (``W[:, i2:] -= Err1 @ U[i1:i2, i2:]``).
What differs between the callers is the rule:

* quantize's GPTQ (``gptopt_quantize.gptq``): round each column to its group's grid (:class:`GroupScales`), a
  fixed pruning mask kept at zero, columns optionally in act-order (the caller permutes ``W`` and ``H``);
* prune's SparseGPT (``gptopt_prune.sparsegpt``): choose the mask per lazy batch (:meth:`ColumnRule.start_batch`,
  adaptive mask selection) or per ``M`` columns (N:M), optionally round the kept weights (joint quantization).

A rule's hooks see the batch's working copy ``W1`` (updated in place by the solver), so a group's scale fitted at
its first column sees the weights as updated so far. The batch size (:func:`lazy_batch`) is a multiple of every
unit a rule reads ahead (a quantization group, ``M``), so none straddles two batches.
"""
from __future__ import annotations

import math

from .calibration import inverse_hessian_cholesky
from .grids import fake_quantize, fit_group, grid_from_groups
from .groupsize import GroupSize

__all__ = ["ColumnRule", "GroupScales", "obs_solve", "prepare_obs", "lazy_batch"]


def prepare_obs(W, H):
    """Copies of ``W`` (out, in) and ``H`` (in, in, in ``W``'s dtype) with dead inputs (``H_jj == 0``) handled as
    in the reference code: their weights zeroed, their diagonal set to 1."""
    import torch

    W = W.clone()
    H = H.to(W.dtype).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    return W, H


def lazy_batch(columns: int, *units, block_size: int = 128) -> int:
    """Columns per lazy batch: about ``block_size``, a multiple of every non-``None`` unit (at most ``columns``)."""
    unit = 1
    for u in units:
        if u:
            unit = math.lcm(unit, u)
    return min(columns, unit * max(1, block_size // unit))


class ColumnRule:
    """What the solver does to each column; subclass and override :meth:`column` (and :meth:`start_batch`)."""

    def start_batch(self, W1, d1, i1: int) -> None:
        """A lazy batch begins at column ``i1``: ``W1`` its columns as updated so far, ``d1`` the diagonal of ``U``
        over them (SparseGPT picks the batch's mask here from ``W1**2 / d1**2``)."""

    def column(self, W1, i: int, col: int):
        """The new values ``q`` ``(out,)`` of column ``col`` (``W1[:, i]``, as updated so far); the solver spreads
        ``(W1[:, i] - q) / U_jj`` over the later columns."""
        raise NotImplementedError


def obs_solve(W, H, rule: ColumnRule, dampening: float = 0.01, block_size: int = 128):
    """Run the OBS column loop on ``W`` ``(out, in)`` (updated in place: pass a copy, e.g. :func:`prepare_obs`'s)
    with the Hessian ``H`` ``(in, in)`` and ``rule``; ``block_size`` columns per lazy batch.

    :returns: ``(Q, loss, dampening)``: the new weights (every column as ``rule`` set it), ``sum (w - q)^2 / U_jj^2
        / 2`` over the columns (the OBS error), and the dampening :func:`gptopt_core.inverse_hessian_cholesky` used.
    """
    import torch

    columns = W.shape[1]
    U, damp = inverse_hessian_cholesky(H, dampening)
    Q = torch.zeros_like(W)
    loss = torch.zeros((), dtype=W.dtype, device=W.device)
    for i1 in range(0, columns, block_size):
        i2 = min(i1 + block_size, columns)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        rule.start_batch(W1, torch.diag(U1), i1)
        for i in range(i2 - i1):
            w = W1[:, i]
            q = rule.column(W1, i, i1 + i)
            Q1[:, i] = q
            err = (w - q) / U1[i, i]
            W1[:, i:].addr_(err, U1[i, i:], alpha=-1)
            Err1[:, i] = err
        Q[:, i1:i2] = Q1
        loss += (Err1 * Err1).sum() / 2
        if i2 < columns:
            W[:, i2:].addmm_(Err1, U[i1:i2, i2:], alpha=-1)
    return Q, float(loss), damp


class GroupScales:
    """One ``(scale, zero)`` per group of ``group_size`` columns for a rule that rounds: fitted up front
    (:meth:`fit_all`: per channel, act-order) or by the rule at each group's first column (:meth:`fit_at`, on the
    weights as updated so far); :meth:`round` puts a column on its group's grid; :meth:`grid` is the
    :class:`~gptopt_core.kit.grids.WeightGrid` (groups in the stored column order).

    ``importance(c)``: the per-column weights of the group starting at column ``c`` for an observer with
    ``importance=True`` (``hmse``), or ``None``.
    """

    def __init__(self, columns: int, bits: int, group_size, symmetric: bool = True, observer: str = "minmax",
                 importance=None):
        self.group_size = GroupSize.of(group_size)
        self.gs = self.group_size.columns(columns)
        self.group_size.check(columns)
        self.bits, self.symmetric, self.observer = bits, symmetric, observer
        self.importance = importance or (lambda c: None)
        n = columns // self.gs
        self.scales, self.zeros = [None] * n, [None] * n

    def fit(self, g: int, W) -> None:
        """Fit group ``g`` on ``W`` ``(out, group columns)`` (pruned weights already zeroed)."""
        self.scales[g], self.zeros[g] = fit_group(W, self.bits, self.symmetric, self.observer,
                                                  self.importance(g * self.gs))

    def fit_all(self, W) -> None:
        for g in range(len(self.scales)):
            self.fit(g, W[:, g * self.gs:(g + 1) * self.gs])

    def starts(self, col: int) -> bool:
        """Whether column ``col`` is the first of its group."""
        return col % self.gs == 0

    def round(self, w, g: int):
        return fake_quantize(w, self.scales[g], self.zeros[g], self.bits, self.symmetric)

    def grid(self):
        return grid_from_groups(self.bits, self.group_size, self.symmetric, self.scales, self.zeros)
