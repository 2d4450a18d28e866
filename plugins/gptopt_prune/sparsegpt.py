"""SparseGPT (Frantar & Alistarh, 2023, arXiv 2301.00774): prune (and optionally quantize) one weight matrix with
second-order weight updates: the core's one OBS solver (:func:`gptopt_core.obs_solve`, blocked as in the reference
code IST-DASLab/sparsegpt ``sparsegpt.py``) with a rule that picks the mask and zeroes (and rounds) each column.

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

from typing import Optional

from gptopt_core.kit.groupsize import GroupSize
from gptopt_core.kit.obs import ColumnRule, GroupScales, lazy_batch, obs_solve, prepare_obs


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
    return lazy_batch(columns, m, group_size, block_size=block_size)


class SparseRule(ColumnRule):
    """SparseGPT's column rule: per lazy batch (unstructured) drop the ``sparsity`` share of weights with the lowest
    ``w^2 / U_jj^2``, or per ``M`` columns (N:M) the ``M - N`` lowest of each row; the pruned weights become zero
    and, with ``scales``, the kept ones are rounded to their group's grid (fitted at a group's first column on its
    kept weights when ``dynamic``). ``pruned``: the bool mask (True = dropped) built so far."""

    def __init__(self, shape, device, sparsity, nm, scales: Optional[GroupScales], dynamic: bool):
        import torch

        self.pruned = torch.zeros(shape, dtype=torch.bool, device=device)
        self.sparsity, self.nm, self.scales, self.dynamic = sparsity, nm, scales, dynamic

    def start_batch(self, W1, d1, i1: int) -> None:
        rows, count = W1.shape
        self.d1 = d1
        if self.nm is None:
            self.pruned[:, i1:i1 + count] = drop_lowest(W1 ** 2 / (d1 ** 2)[None, :],
                                                        round(self.sparsity * rows * count))
        self.pruned1 = self.pruned[:, i1:i1 + count]  # a view: N:M marks it column group by column group

    def column(self, W1, i: int, col: int):
        pruned1 = self.pruned1
        if self.nm is not None and i % self.nm[1] == 0:
            n, m = self.nm
            score = W1[:, i:i + m] ** 2 / (self.d1[i:i + m] ** 2)[None, :]
            pruned1.scatter_(1, i + score.topk(m - n, dim=1, largest=False).indices, True)
        if self.dynamic and self.scales.starts(col):
            gs = self.scales.gs
            self.scales.fit(col // gs, W1[:, i:i + gs].masked_fill(pruned1[:, i:i + gs], 0))
        q = W1[:, i].masked_fill(pruned1[:, i], 0)
        return q if self.scales is None else self.scales.round(q, col // self.scales.gs)


def sparsegpt_prune(W, H, sparsity: Optional[float] = None, nm: Optional[tuple[int, int]] = None,
                    bits: Optional[int] = None, group_size=None, symmetric: bool = True,
                    dampening: float = 0.01, block_size: int = 128):
    """Prune ``W`` ``(out, in)`` given the layer's input Hessian ``H = 2/n·X^T X``.

    :param sparsity: fraction of weights to zero (unstructured), or ``None`` with ``nm``.
    :param nm: ``(N, M)``: keep ``N`` of every ``M`` consecutive input weights.
    :param bits: also quantize the kept weights to ``bits`` (per ``group_size`` columns, a
        :class:`gptopt_core.GroupSize` or an int; ``None``: per channel).
    :returns: ``(W_new, keep, grid, info)``: the new weights, the bool mask (True = kept), the
        :class:`~gptopt_core.kit.grids.WeightGrid` (``None`` without ``bits``), ``{"loss", "dampening"}``.
    """
    W, H = prepare_obs(W, H)
    columns = W.shape[1]
    if nm is not None and columns % nm[1]:
        raise ValueError(f"the input width {columns} is not a multiple of M={nm[1]}")
    groups = GroupSize.of(group_size)
    scales, dynamic = None, False
    if bits:
        if not groups.divides(columns):
            raise ValueError(f"group size {groups} does not divide the input width {columns}")
        scales = GroupScales(columns, bits, groups, symmetric)
        dynamic = not groups.per_channel
        if not dynamic:  # per channel: fitted now, on the weights before pruning, as the reference
            scales.fit_all(W)
    B = lazy_batch(columns, nm[1] if nm else None, scales.gs if dynamic else None, block_size=block_size)
    rule = SparseRule(W.shape, W.device, sparsity, nm, scales, dynamic)
    Q, loss, damp = obs_solve(W, H, rule, dampening, B)
    return Q, ~rule.pruned, None if scales is None else scales.grid(), {"loss": loss, "dampening": damp}
